"""train.py refuses what it cannot do right, and does right what it accepts: numeric flags, the learning-rate
schedule under data parallelism, the fused optimizer, fp16 loss scaling across skipped updates, resumes that would
not continue the run, concurrent runs, half-written checkpoints, empty evaluations."""

import copy
import json
import re
import resource
import subprocess
import sys

import pytest
import torch

from helpers import FAST, TRAIN, env, run, summary


def train(args, timeout=600):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, env=env())


@pytest.mark.parametrize("flag,value", [
    ("--num_epochs", "-1"), ("--num_epochs", "0"), ("--grad_clip", "-1"), ("--grad_clip", "0"),
    ("--learning_rate", "-0.001"), ("--learning_rate", "nan"), ("--warmup_steps", "-5"), ("--ema_decay", "-0.5"),
    ("--ema_decay", "1.0"), ("--weight_decay", "-1"), ("--skip_grad_norm", "0"), ("--max_eval_batches", "0"),
    ("--max_steps", "0"), ("--sample_seconds", "0"), ("--num_workers", "-1"), ("--log_every", "0"),
    ("--dropout", "1.5"), ("--stop_after_steps", "0"), ("--batch_size", "0"),
])
def test_every_numeric_flag_is_validated(flag, value, capsys):
    from training.data import DataArguments
    from training.train import ModelArguments, TrainArguments
    from training.utils import parse_arguments

    with pytest.raises(SystemExit) as exit_:  # train.py's own parser: a usage error, before anything runs
        parse_arguments((ModelArguments, DataArguments, TrainArguments), [flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "expected" in err


@pytest.mark.parametrize("flag,value", [("--max_batches", "0"), ("--batch_size", "0"), ("--seconds", "-1")])
def test_evaluate_validates_its_numeric_flags(tmp_path, flag, value, capsys):
    from training.data import DataArguments
    from training.evaluate import EvaluateArguments
    from training.utils import parse_arguments

    with pytest.raises(SystemExit) as exit_:  # evaluate.py's own parser
        parse_arguments((EvaluateArguments, DataArguments), ["--model", str(tmp_path), flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_an_empty_evaluation_is_an_error_not_zero_bits():
    from training.metrics import nll_bits

    model = torch.nn.Module()
    model.dummy = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="no sample was evaluated"):
        nll_bits(model, [], max_batches=None)


def _schedule(accelerator, model, **args):
    """train.py's optimizer and scheduler for `model`, over a 10-batch loader."""
    from training.arguments import TrainArguments
    from training.train import make_schedule

    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=1)
    optimizer, scheduler, _, _ = make_schedule(accelerator, model, loader, TrainArguments(**args))
    return optimizer, scheduler


def test_the_optimizer_is_torchs_fused_adamw_and_updates_as_the_per_tensor_one():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    optimizer, _ = _schedule(Accelerator(cpu=True), model, learning_rate=1e-2, weight_decay=0.1, warmup_steps=0)
    assert optimizer.defaults["fused"] is True
    per_tensor = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1,
                                   foreach=False)
    for _ in range(5):
        x = torch.randn(8, 6)
        for m, opt in ((model, optimizer), (reference, per_tensor)):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_skipped_fp16_updates_keep_the_loss_scaler_usable():
    # a real GradScaler (CPU autocast has none, so it is given to the accelerator before prepare): after a skipped
    # update the scaler must still be updated, or the next unscale_ raises; with train.py's fused optimizer, which
    # takes the scaler's found-inf flag into its kernel
    from accelerate import Accelerator
    from torch.optim.swa_utils import AveragedModel

    from training.checkpoints import Progress
    from training.train import apply_update

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = torch.nn.Linear(4, 1)
    optimizer, scheduler = _schedule(accelerator, model, learning_rate=1e-2, warmup_steps=0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    class Run:
        pass

    run_ = Run()
    run_.accelerator, run_.model, run_.optimizer, run_.scheduler = accelerator, model, optimizer, scheduler
    run_.ema, run_.progress = AveragedModel(model), Progress()
    run_.args = type("Args", (), {"skip_grad_norm": 1e-12})()  # every update is skipped

    def clipped_grad_norm():  # what accelerator.clip_grad_norm_ does under fp16: unscale_, then clip
        accelerator.scaler.unscale_(optimizer.optimizer)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 200.0)

    for _ in range(3):
        accelerator.backward(model(torch.randn(8, 4)).square().mean())  # scaled by the scaler
        assert apply_update(run_, clipped_grad_norm()) is False
    assert run_.progress.skipped == 3
    run_.args.skip_grad_norm = 1e9
    before = [p.detach().clone() for p in model.parameters()]
    accelerator.backward(model(torch.randn(8, 4)).square().mean())
    assert apply_update(run_, clipped_grad_norm()) is True
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _common(cache_dir):
    return ["--dataset", str(cache_dir / "spoken_digits_v1"), *FAST, "--eval_every", "100", "--max_eval_batches",
            "1", "--save_every", "2"]


@pytest.mark.slow
def test_resume_refuses_changed_settings_and_says_what_changed(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [*_common(cache_dir), "--output_dir", str(out), "--max_steps", "6", "--dropout", "0.1"]
    run([*args, "--stop_after_steps", "2"])
    proc = train([*args, "--batch_size", "2", "--resume_from_checkpoint", "latest"])
    assert proc.returncode == 2 and "batch_size: 4 in the checkpoint, 2 now" in proc.stderr, proc.stderr[-2000:]
    # the stored settings against others, as train.py compares them
    from training.checkpoints import check_resume
    from training.utils import UsageError

    checkpoint = out / "checkpoints" / "step_00000002"
    stored = json.loads((checkpoint / "run_args.json").read_text())
    for path, value, named in [(("config", "dropout"), 0.3, "config.dropout: 0.1 in the checkpoint, 0.3 now"),
                               (("data", "seq_len"), 800, "data.seq_len: 1200 in the checkpoint, 800 now"),
                               (("num_processes",), 2, "num_processes: 1 in the checkpoint, 2 now"),
                               (("lr_schedule",), "cosine", "lr_schedule: 'constant' in the checkpoint")]:
        changed = json.loads(json.dumps(stored))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(UsageError, match=re.escape(named)):
            check_resume(checkpoint, changed)
    check_resume(checkpoint, stored)  # the same settings pass
    run([*args, "--resume_from_checkpoint", "latest", "--max_steps", "8"])  # a constant schedule may be extended
    assert summary(out)["steps"] == 8


def test_one_run_at_a_time_per_output_dir(tmp_path):
    # the lock train.py's main process takes (an OS lock: a second holder, in any process, is refused)
    from training.output_dir import try_lock

    first, error = try_lock(tmp_path / "run")
    assert first is not None and error is None
    second, error = try_lock(tmp_path / "run")
    assert second is None and "in use by another train.py" in error
    assert (tmp_path / "run" / ".train.lock").exists()  # the refused one leaves the holder's file alone
    first.release()  # released, and its file removed
    assert not (tmp_path / "run" / ".train.lock").exists()
    third, error = try_lock(tmp_path / "run")
    assert third is not None and error is None
    third.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def _tone_sc09(root):
    """A few 0.1 s tones laid out as SC09 (digit folders, the two lists)."""
    import numpy as np
    import soundfile

    for digit in ("zero", "one", "two"):
        (root / digit).mkdir(parents=True)
        for i in range(3):
            t = np.arange(1600) / 16000
            soundfile.write(root / digit / f"s{i}_nohash_0.wav", 0.5 * np.sin(2 * np.pi * 300 * (i + 1) * t), 16000)
    (root / "validation_list.txt").write_text("zero/s1_nohash_0.wav\none/s1_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("two/s2_nohash_0.wav\n")
    return root


def test_a_setup_error_leaves_the_output_dir_unclaimed(tmp_path, capsys):
    # --streaming without --max_steps is refused in setup; the folder used to keep poolformer_run.json (and the lock
    # file), so the same folder was then refused as "holds another run"
    from training.train import main

    data, out = _tone_sc09(tmp_path / "sc09"), tmp_path / "run"
    argv = ["--dataset", str(data), "--streaming", "--output_dir", str(out), "--log_with", "none", "--seq_len", "800",
            "--cache_dir", str(tmp_path / "cache")]
    for attempt in range(2):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--streaming trains for --max_steps" in err and "holds another run" not in err, attempt
        assert not (out / "poolformer_run.json").exists() and not (out / ".train.lock").exists()
    # a refused resume into a new folder leaves no folder behind
    with pytest.raises(SystemExit) as exit_:
        main(["--dataset", str(data), "--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", "latest"])
    assert exit_.value.code == 2 and "holds no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_cut_short_by_the_disk_leaves_nothing_half_written(tmp_path):
    # a real accelerate checkpoint of a 1 MB model, written while files may not grow past 64 KB (as on a full disk:
    # writes fail with EFBIG): a clear error, no temporary folder, the earlier checkpoint untouched
    from accelerate import Accelerator

    from training.checkpoints import Progress, save_checkpoint

    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    accelerator.prepare(torch.nn.Linear(512, 512))  # the model save_state writes (1 MB)
    args = type("Args", (), {"output_dir": str(tmp_path / "run"), "checkpoints_total_limit": 3})()
    progress = Progress()
    progress.step = 2
    first = save_checkpoint(accelerator, args, progress, "run-id", {"seed": 0})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    progress.step = 4
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limit[1]))
    try:
        with pytest.raises(RuntimeError, match="step 4 could not be written .* earlier checkpoints are intact"):
            save_checkpoint(accelerator, args, progress, "run-id", {"seed": 0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
