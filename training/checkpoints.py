"""Checkpoints of a training run: written atomically with a manifest of their files (sizes and sha256), rotated
within one run, verified before a resume, and stored with the settings a resume must keep (the run's fingerprint).

accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)` is not used for naming and
rotation: it writes into the final folder (a crash leaves a half-written checkpoint that looks complete), numbers
folders by save count rather than optimizer step, and rotates every checkpoint in the folder, including another
run's, where ours are renamed into place only once complete, named by step and rotated within their own run.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from training.utils import UsageError

MANIFEST = "manifest.json"  # in every checkpoint: its run, step and files (bytes, sha256)
RUN_ARGS = "run_args.json"  # in every checkpoint: the settings that a resume must keep (`run_fingerprint`)


class Progress:
    """Training position, saved in every checkpoint so that a resumed run continues with the next batch."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch, self.skipped = 0, 0, 0, 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict):
    """Written to a temporary file, then renamed: the file is complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(accelerator, args, progress, run_id, fingerprint, stream=None) -> Path:
    """accelerator.save_state into a temporary folder, the run's settings and a manifest of its files, then a rename:
    a checkpoint is complete or absent (a failed write, e.g. a full disk, removes its temporary folder and says so;
    the earlier checkpoints are untouched). Only this run's old checkpoints are rotated out. A streamed run's every
    process adds its stream's exact position (`stream_state_<rank>.pt`)."""
    root = Path(args.output_dir) / "checkpoints"
    final, tmp = root / f"step_{progress.step:08d}", root / f".tmp_step_{progress.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if stream is not None:
            save_stream_state(stream, tmp, accelerator)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / RUN_ARGS, fingerprint)
            files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json(tmp / MANIFEST, {"run_id": run_id, "step": progress.step, "files": files})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except Exception as e:  # a full disk shows as OSError, or as the safetensors writer's own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the checkpoint of step {progress.step} could not be written to {final} ({e}); the earlier "
                           "checkpoints are intact: resume with --resume_from_checkpoint latest once there is room") from e
    if accelerator.is_main_process:
        for old in run_checkpoints(args.output_dir, run_id)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_stream_state(stream, folder: Path, accelerator):
    """This process's stream state, tensors and plain values only, so that it loads with `weights_only`."""
    state = stream.state_dict()
    state["buffer"] = [torch.from_numpy(t) for t in state["buffer"]]
    path = Path(folder) / f"stream_state_{accelerator.process_index}.pt"
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def load_stream_state(folder, accelerator) -> dict:
    path = Path(folder) / f"stream_state_{accelerator.process_index}.pt"
    if not path.exists():
        raise UsageError(f"{folder} has no {path.name}: it was not written by a streamed run of this many processes")
    state = torch.load(path, weights_only=True)
    state["buffer"] = [t.numpy() for t in state["buffer"]]
    return state


def run_checkpoints(output_dir, run_id) -> list:
    """This run's complete checkpoints, oldest first."""
    found = []
    for path in (Path(output_dir) / "checkpoints").glob("step_*"):
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("run_id") == run_id:
            found.append((manifest["step"], path))
    return [path for _, path in sorted(found)]


def verify_checkpoint(path: Path) -> dict:
    """The manifest, after checking that every file it lists is there with its size and hash: a checkpoint that
    cannot be restored completely fails here, naming the file, instead of resuming with part of its state."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a complete checkpoint of train.py ({MANIFEST}: {e})") from None
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != meta["bytes"] or sha256(file) != meta["sha256"]:
            raise ValueError(f"checkpoint {path} is damaged: {name} differs from the one written at step "
                             f"{manifest['step']} (size or hash)")
    return manifest


def run_fingerprint(config, data_args, args, accelerator, max_steps: int, warmup: int) -> dict:
    """What a checkpoint's state and data position mean, stored with every checkpoint: a resume that changes any of
    it cannot continue the run exactly (the model would be another, the batches others, or the schedule another)."""
    execution_only = ("checkpoint_chunk_size", "activation_checkpointing", "scan_implementation", "scan_chunk_size",
                      "fused_rglru", "transformers_version", "_name_or_path")
    fingerprint = {
        "config": {k: v for k, v in config.to_dict().items() if k not in execution_only},
        "data": {k: v for k, v in asdict(data_args).items() if k not in ("cache_dir", "preprocessing_num_workers")},
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "warmup_steps": warmup,
        **{k: getattr(args, k) for k in ("batch_size", "gradient_accumulation_steps", "seed", "learning_rate",
                                          "weight_decay", "lr_schedule", "grad_clip", "skip_grad_norm", "ema_decay")},
    }
    if args.lr_schedule == "cosine":  # the cosine's length is part of the schedule; a constant one can be extended
        fingerprint["max_steps"] = max_steps
    return json.loads(json.dumps(fingerprint))  # as stored: lists, not tuples


def check_resume(checkpoint: Path, fingerprint: dict):
    """Refuse a resume whose settings differ from the checkpoint's, saying exactly what changed."""
    stored_file = Path(checkpoint) / RUN_ARGS
    if not stored_file.exists():
        raise UsageError(f"{checkpoint} has no {RUN_ARGS} (an older train.py wrote it): its settings cannot be checked, "
                         "so it cannot be resumed exactly")
    stored = json.loads(stored_file.read_text())

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(f"{prefix}{k}", v)])}

    then, now = flat(stored), flat(fingerprint)
    changed = [f"{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(then) | set(now))
               if then.get(k) != now.get(k)]
    if changed:
        raise UsageError(f"--resume_from_checkpoint {checkpoint}: the run's settings changed, so it cannot continue "
                         f"exactly: {'; '.join(changed)}. Resume with the checkpoint's settings, or start a new run.")
