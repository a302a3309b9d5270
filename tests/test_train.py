"""training/train.py end to end: the embedded default set, exact resume, 2-process data parallel, Hub push."""

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import FAST, ROOT, TRAIN, env, run, summary
from hub_server import HubServer


def tensorboard_scalars(out: Path, tag: str) -> dict:
    """{step: value} of a scalar the run logged with tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in Path(out, "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@pytest.mark.compat
@pytest.mark.integration
def test_embedded_default_loss_goes_down_and_exports(cache_dir, tmp_path):
    out = tmp_path / "run"
    run(["--cache_dir", str(cache_dir), "--output_dir", str(out), "--max_steps", "40", "--eval_every", "40",
         "--learning_rate", "3e-3", *FAST, "--batch_size", "8", "--max_eval_batches", "4"])
    s = summary(out)
    (step0, start), (step40, end) = s["val_history"][0], s["val_history"][-1]
    assert (step0, step40) == (0, 40) and s["protocol"] == "sc09" and s["items"]["train"] == 360
    assert end < start - 1.0, f"validation bits/sample only went from {start:.3f} to {end:.3f}"
    model = out / "model"
    assert {"model.safetensors", "config.json", "generation_config.json", "modeling_poolformer.py",
            "configuration_poolformer.py", "README.md"} <= {p.name for p in model.iterdir()}
    assert (model / "samples" / "sample_0.wav").exists()
    assert not (out / ".train.lock").exists()  # released and removed at the end
    card = (model / "README.md").read_text()
    assert "validation NLL" in card and "sample_0.wav" in card and "optimizer steps: 40" in card


@pytest.mark.compat
@pytest.mark.integration
def test_kill_and_resume_equals_uninterrupted(cache_dir, tmp_path):
    common = ["--dataset", str(cache_dir / "spoken_digits_v1"), *FAST, "--max_steps", "8", "--save_every", "100",
              "--eval_every", "100", "--max_eval_batches", "1", "--dropout", "0.1", "--lr_schedule", "cosine",
              "--gradient_accumulation_steps", "2", "--seed", "3"]
    run([*common, "--output_dir", str(tmp_path / "straight")])
    run([*common, "--output_dir", str(tmp_path / "split"), "--stop_after_steps", "3"])
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step_00000003"] and not (tmp_path / "split" / "model").exists()
    run([*common, "--output_dir", str(tmp_path / "split"), "--resume_from_checkpoint", "latest"])
    for rel in ("checkpoints/step_00000008/model.safetensors", "model/model.safetensors"):
        a, b = load_file(tmp_path / "straight" / rel), load_file(tmp_path / "split" / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-6, (rel, k)
    assert summary(tmp_path / "split")["steps"] == 8


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", str(cache_dir / "spoken_digits_v1"), *FAST, "--max_steps", "10000", "--save_every", "2",
            "--eval_every", "100000", "--max_eval_batches", "1", "--output_dir", str(out)]
    proc = subprocess.Popen([sys.executable, TRAIN, *args], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "resume with --resume_from_checkpoint latest" in output
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert steps and not list((out / "checkpoints").glob(".tmp*"))
    run([*args[:-2], "--output_dir", str(out), "--resume_from_checkpoint", "latest", "--max_steps", str(steps[-1] + 2)])
    assert summary(out)["steps"] == steps[-1] + 2


@pytest.mark.integration
def test_two_process_data_parallel_on_cpu(cache_dir, tmp_path):
    out = tmp_path / "ddp"
    data = ["--dataset", str(cache_dir / "spoken_digits_v1"), "--seq_len", "1200"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN, *data, *FAST,
           "--max_steps", "6", "--eval_every", "6", "--checkpoint_chunk_size", "500", "--output_dir", str(out),
           "--log_with", "tensorboard", "--log_every", "2", "--lr_schedule", "cosine", "--learning_rate", "1e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # the learning rate follows optimizer steps, not process steps (accelerate steps a prepared scheduler once per
    # process): warm-up over 2 steps, then the cosine down to 0 at step 6; logged every --log_every = 2 steps
    lrs = tensorboard_scalars(out, "train/lr")
    want = {s: 1e-3 * (s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))) for s in (2, 4, 6)}
    assert sorted(lrs) == [2, 4, 6] and all(abs(lrs[k] - v) < 1e-9 for k, v in want.items()), (lrs, want)
    # the 1201-step items ran in time chunks under DDP (checkpointing in time composes with gradient all-reduce)
    assert json.loads((out / "model" / "config.json").read_text())["checkpoint_chunk_size"] == 500
    s = summary(out)
    assert len(s["replica_checksums"]) == 2 and s["replica_checksums"][0] == s["replica_checksums"][1]
    # validation of 60 clips in batches of 4 on 2 ranks (the last batch evened out with repeats) equals one
    # process going through each clip once
    single = subprocess.run([sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", str(out / "model"),
                             *data, "--split", "validation", "--out", str(tmp_path / "eval.json")],
                            capture_output=True, text=True, timeout=600, env=env())
    assert single.returncode == 0, single.stderr[-3000:]
    alone = json.loads((tmp_path / "eval.json").read_text())
    assert alone["items"] == 60 and s["val_bits_per_sample"] == pytest.approx(alone["nll_bits_per_sample"], rel=1e-6)
    load = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r}, trust_remote_code=True)
        print(type(m).__name__, m(torch.full((1, 5), 128)).logits.shape)
    """)
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env(), cwd=tmp_path)
    assert "PoolformerForCausalLM torch.Size([1, 5, 256])" in loaded.stdout, loaded.stderr[-3000:]


@pytest.mark.compat
@pytest.mark.integration
def test_push_to_hub_and_load_back(cache_dir, tmp_path):
    server = HubServer().start()
    try:
        hub_env = dict(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_TOKEN="hf_test_token", HF_HUB_OFFLINE="0",
                       HF_HOME=str(tmp_path / "hf_home"))
        run(["--dataset", str(cache_dir / "spoken_digits_v1"), *FAST, "--max_steps", "2", "--eval_every", "2",
             "--max_eval_batches", "1", "--output_dir", str(tmp_path / "run"), "--push_to_hub",
             "--hub_model_id", "tester/poolformer-digits"], **hub_env)
        assert "model.safetensors" in server.repos["tester/poolformer-digits"].files
        pull = textwrap.dedent("""
            import torch
            from huggingface_hub import snapshot_download
            from transformers import AutoModelForCausalLM
            files = sorted(p.name for p in __import__("pathlib").Path(snapshot_download("tester/poolformer-digits")).iterdir())
            print("FILES", files)
            m = AutoModelForCausalLM.from_pretrained("tester/poolformer-digits", trust_remote_code=True)
            print("CLASS", type(m).__module__, type(m).__name__)
        """)
        proc = subprocess.run([sys.executable, "-c", pull], capture_output=True, text=True, cwd=tmp_path,
                              env=env(**hub_env))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "'model.safetensors'" in proc.stdout and "'modeling_poolformer.py'" in proc.stdout
        assert "CLASS transformers_modules" in proc.stdout and "PoolformerForCausalLM" in proc.stdout
    finally:
        server.stop()


@pytest.mark.integration
def test_bad_arguments_fail_before_training(tmp_path, capsys):
    from training.data import DataArguments
    from training.train import ModelArguments, TrainArguments
    from training.utils import parse_arguments

    for argv, message in [(["--dataset", str(tmp_path), "--protocol", "nope"], "--protocol"),
                          (["--model_config", str(tmp_path)], "no config.json"),
                          (["--checkpoint_chunk_size", "-1"], "--checkpoint_chunk_size")]:
        with pytest.raises(SystemExit) as exit_:
            parse_arguments((ModelArguments, DataArguments, TrainArguments), argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    # and the script itself: a usage error (exit 2) before training
    proc = subprocess.run([sys.executable, TRAIN, "--model_config", str(tmp_path)], capture_output=True, text=True,
                          env=env())
    assert proc.returncode == 2 and "no config.json" in proc.stderr


def _checkpoints(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_and_rotation_stays_within_a_run(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", str(cache_dir / "spoken_digits_v1"), *FAST, "--max_steps", "3", "--save_every", "1",
            "--checkpoints_total_limit", "2", "--eval_every", "100", "--max_eval_batches", "1", "--output_dir", str(out)]
    run(args)
    exported = (out / "model" / "model.safetensors").read_bytes()
    alien = tmp_path / "alien"
    shutil.copytree(out / "checkpoints" / "step_00000003", alien)  # a checkpoint of that run, for later

    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2 and "holds another run" in proc.stderr and "--overwrite_output_dir" in proc.stderr
    assert (out / "model" / "model.safetensors").read_bytes() == exported

    run([*args, "--overwrite_output_dir", "--stop_after_steps", "2", "--seed", "1"])  # a new run, preempted
    assert _checkpoints(out) == ["step_00000001", "step_00000002"] and not (out / "model").exists()
    # resuming the first run's checkpoint into the folder that now holds the second run is refused
    proc = subprocess.run([sys.executable, TRAIN, *args, "--resume_from_checkpoint", str(alien)], capture_output=True,
                          text=True, env=env(), timeout=300)
    assert proc.returncode == 2 and "holds another run" in proc.stderr and "would overwrite it" in proc.stderr
    shutil.copytree(alien, out / "checkpoints" / "step_00000099")  # another run's, at a higher step
    run([*args, "--resume_from_checkpoint", "latest", "--seed", "1"])  # resumes the new run, not step 99
    assert summary(out)["steps"] == 3
    # rotation removed this run's step 1 only
    assert _checkpoints(out) == ["step_00000002", "step_00000003", "step_00000099"]


@pytest.mark.slow
def test_a_damaged_checkpoint_fails_naming_the_file(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", str(cache_dir / "spoken_digits_v1"), *FAST, "--max_steps", "4", "--eval_every", "100",
            "--max_eval_batches", "1", "--dropout", "0.1", "--output_dir", str(out)]
    run([*args, "--stop_after_steps", "2"])
    ckpt = out / "checkpoints" / "step_00000002"
    rng = ckpt / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[: rng.stat().st_size // 2])  # truncated
    resume = [sys.executable, TRAIN, *args, "--resume_from_checkpoint", "latest"]
    proc = subprocess.run(resume, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2 and "random_states_0.pkl" in proc.stderr and "damaged" in proc.stderr
    (ckpt / "model.safetensors").unlink()
    proc = subprocess.run(resume, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2 and "model.safetensors is missing" in proc.stderr
    assert "pytorch_model.bin" not in proc.stderr


@pytest.mark.integration
def test_sigterm_to_the_launcher_checkpoints_and_leaves_no_process(cache_dir, tmp_path):
    # `accelerate launch` with one process exits at once on SIGTERM; the training process notices and stops cleanly
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN, "--dataset", str(cache_dir / "spoken_digits_v1"),
           *FAST, "--max_steps", "10000", "--save_every", "2", "--eval_every", "100000", "--max_eval_batches", "1",
           "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # to the launcher only
    output, _ = proc.communicate(timeout=300)  # returns once every writer of the pipe, the trainer too, is gone
    assert "resume with --resume_from_checkpoint latest" in output, output[-3000:]
    stopped = int(output.split("stopped at step ")[1].split()[0])
    assert (out / "checkpoints" / f"step_{stopped:08d}").is_dir()
    left = [p for p in Path("/proc").glob("[0-9]*") if str(out) in _cmdline(p)]
    assert not left, "a training process outlived its launcher"


def _cmdline(proc_dir):
    try:
        return (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.integration
def test_bf16_mixed_precision_run(cache_dir, tmp_path):
    """`--mixed_precision bf16` trains under bf16 autocast (the recurrence stays fp32 inside) and exports."""
    out = tmp_path / "run"
    run(["--cache_dir", str(cache_dir), "--output_dir", str(out), "--max_steps", "6", "--eval_every", "6",
         "--max_eval_batches", "2", "--mixed_precision", "bf16", *FAST])
    s = summary(out)
    assert s["mixed_precision"] == "bf16" and s["steps"] == 6 and s["skipped_updates"] == 0
    (_, start), (_, end) = s["val_history"][0], s["val_history"][-1]
    assert end < start, f"validation bits/sample went from {start:.3f} to {end:.3f}"
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("regional", [False, True])
def test_compiled_training_under_accelerate_dynamo_backend(cache_dir, tmp_path, regional):
    """`accelerate launch --dynamo_backend inductor` compiles the training forward (the scan an opaque op in it);
    with `--dynamo_use_regional_compilation` too (a residual stack is no ModuleList, which that would replace)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "inductor",
           *(["--dynamo_use_regional_compilation"] if regional else []), TRAIN, "--cache_dir", str(cache_dir),
           "--output_dir", str(out), "--max_steps", "4", "--eval_every", "4", "--max_eval_batches", "2", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    s = summary(out)
    assert (s["mixed_precision"], s["dynamo_backend"], s["steps"]) == ("bf16", "inductor", 4)


@pytest.mark.slow
def test_two_process_streamed_run_stops_resumes_and_equals_the_uninterrupted_one(cache_dir, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN]
    common = ["--dataset", str(cache_dir / "spoken_digits_v1"), *FAST, "--streaming", "--shuffle_buffer", "50",
              "--max_steps", "6", "--eval_every", "3", "--max_eval_batches", "2", "--dropout", "0.1", "--seed", "3"]

    def launched(*extra):
        proc = subprocess.run([*launch, *common, *extra], capture_output=True, text=True, timeout=600, env=env())
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    launched("--output_dir", str(tmp_path / "straight"))
    launched("--output_dir", str(tmp_path / "split"), "--stop_after_steps", "3")
    ckpt = tmp_path / "split" / "checkpoints" / "step_00000003"
    assert (ckpt / "stream_state_0.pt").exists() and (ckpt / "stream_state_1.pt").exists()
    launched("--output_dir", str(tmp_path / "split"), "--resume_from_checkpoint", "latest")
    a, b = load_file(tmp_path / "straight" / "model" / "model.safetensors"), load_file(
        tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert summary(tmp_path / "split")["val_history"][-1] == summary(tmp_path / "straight")["val_history"][-1]
