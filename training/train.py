"""Train a Poolformer on audio with Accelerate: one CPU, one GPU or many.

    accelerate launch training/train.py                                   # tiny model, built-in spoken digits
    accelerate launch training/train.py --model_config hub_configs/sc09 --dataset krandiash/sc09 \
        --batch_size 32 --max_steps 300000 --mixed_precision bf16 --output_dir runs/sc09

The thesis recipe: AdamW (0.9, 0.999, wd 1e-4), lr 2e-3 with 1000 warm-up steps then constant or cosine, grad-norm
clip 200, updates skipped when the grad norm is >= 1000 or not finite, an EMA of the weights (0.999, warmed up as
min(0.999, (1 + n) / (10 + n)) after n updates) used for validation, samples and export.

Nothing is lost: checkpoints are written atomically (with a manifest of their files' sizes and hashes, checked
before a resume) every --save_every steps and when the run is stopped (SIGTERM/SIGINT, to this process or to its
launcher); `--resume_from_checkpoint latest` continues exactly; a folder holding another run is refused unless
--overwrite_output_dir. The final EMA model is exported with `save_pretrained` (safetensors, modeling code,
generation config, a model card) and optionally pushed to the Hub. Samples never cost a run its model: when writing
them fails (during training or at export), the failure is logged with its traceback, the export completes (model,
model card, `train_summary.json` with `sample_errors`) and the run then exits with status 1.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from huggingface_hub import ModelCard, ModelCardData
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import GenerationConfig, get_scheduler

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, audio_generation_config, nats_to_bits
from modeling_poolformer.audio import save_spectrogram, write_wav
from training.data import AudioTokenStream, DataArguments, build_datasets, held_out_items
from training.metrics import nll_bits
from training.text_samples import data_card_line
from training.utils import at_least, check_flags, parse_arguments, positive, tune_cpu_allocator

ROOT = Path(__file__).resolve().parent.parent
RUN_FILE = "poolformer_run.json"  # in the output folder: which run owns it
MANIFEST = "manifest.json"  # in every checkpoint: its run, step and files (bytes, sha256)
RUN_ARGS = "run_args.json"  # in every checkpoint: the settings that a resume must keep (`run_fingerprint`)
LOCK_FILE = ".train.lock"  # in the output folder: held by the train.py that works there
logger = logging.getLogger("train")


@dataclass
class ModelArguments:
    model_config: str = field(default=str(ROOT / "hub_configs" / "tiny"),
                              metadata={"help": "folder with config.json (one of hub_configs/)"})
    dropout: Optional[float] = field(default=None, metadata={"help": "override the config's dropout"})
    checkpoint_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "train long --seq_len in checkpointed time chunks of this length (0 = off)"})

    def __post_init__(self):
        if not (Path(self.model_config) / "config.json").exists():
            raise ValueError(f"--model_config {self.model_config!r}: no config.json there")
        check_flags(self, [("dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
                           ("checkpoint_chunk_size", lambda v: isinstance(v, int) and v >= 0, "an int >= 0 (0 = off)")])


@dataclass
class TrainArguments:
    output_dir: str = "runs/poolformer"
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start over in an output_dir that holds another run (its checkpoints, model and summary are deleted)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "optimizer steps (overrides --num_epochs)"})
    num_epochs: Optional[float] = None
    batch_size: int = field(default=8, metadata={"help": "per process"})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "default: 1000, or a tenth of a shorter run"})
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 200.0
    skip_grad_norm: float = field(default=1000.0, metadata={"help": "skip the update when the grad norm is >= this"})
    ema_decay: float = 0.999
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = field(default=None, metadata={
        "help": "default: accelerate's config"})
    eval_every: int = 500
    max_eval_batches: Optional[int] = field(default=None, metadata={"help": "default: the whole validation split"})
    save_every: int = 1000
    checkpoints_total_limit: int = 3
    sample_every: int = field(default=0, metadata={"help": "write WAV samples every N steps (0: only at the end)"})
    num_samples: int = 4
    sample_seconds: float = 1.0
    sample_bytes: int = field(default=512, metadata={"help": "byte models: bytes per text sample"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "a checkpoint folder, or 'latest' (the newest of this output_dir's run)"})
    stop_after_steps: Optional[int] = field(default=None, metadata={
        "help": "checkpoint and exit after this many steps (as a preemption would)"})
    push_to_hub: bool = False
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "default: the output folder's name"})
    hub_token: Optional[str] = field(default=None, metadata={"help": "default: HF_TOKEN or the cached login"})
    hub_private: bool = False
    log_with: str = field(default="tensorboard", metadata={"help": "accelerate tracker(s): tensorboard, wandb, all, none"})
    log_every: int = field(default=10, metadata={
        "help": "log (and check for a stop request) every N steps: each check waits for the device"})
    num_workers: Optional[int] = field(default=None, metadata={
        "help": "DataLoader worker processes that decode audio (default: on CUDA, up to 8 per process from the CPUs "
                "there are; on the CPU 0, since training uses every core). --streaming reads in the main process"})
    seed: int = 0

    def __post_init__(self):
        check_flags(self, [
            *[(name, at_least(1), "an int >= 1") for name in (
                "batch_size", "gradient_accumulation_steps", "eval_every", "save_every", "num_samples", "sample_bytes",
                "checkpoints_total_limit", "max_steps", "max_eval_batches", "stop_after_steps", "log_every")],
            *[(name, at_least(0), "an int >= 0") for name in ("warmup_steps", "sample_every", "num_workers")],
            ("num_epochs", positive, "a number > 0"),
            ("learning_rate", positive, "a number > 0"),
            ("weight_decay", at_least(0), "a number >= 0"),
            ("grad_clip", positive, "a number > 0 (the grad-norm clip)"),
            ("skip_grad_norm", positive, "a number > 0 (updates with a larger grad norm are skipped)"),
            ("ema_decay", lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("sample_seconds", positive, "a number > 0"),
        ])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, with a manifest; rotation and `latest` within one run
# ---------------------------------------------------------------------------------------------------------------------


class Progress:
    """Training position, saved in every checkpoint so that a resumed run continues with the next batch."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch, self.skipped = 0, 0, 0, 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict):
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
            _write_json(tmp / RUN_ARGS, fingerprint)
            files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_json(tmp / MANIFEST, {"run_id": run_id, "step": progress.step, "files": files})
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
        if file.stat().st_size != meta["bytes"] or _sha256(file) != meta["sha256"]:
            raise ValueError(f"checkpoint {path} is damaged: {name} differs from the one written at step "
                             f"{manifest['step']} (size or hash)")
    return manifest


def lock_output_dir(accelerator, args) -> Optional["OutputLock"]:
    """One train.py at a time per output_dir: the main process takes the folder's lock (the others get None); a
    second train.py there is refused."""
    lock, error = None, None
    if accelerator.is_main_process:
        lock, error = _lock(Path(args.output_dir))
    error = broadcast_object_list([error])[0]
    if error:
        raise UsageError(error)
    return lock


def claim_output_dir(accelerator, args) -> tuple:
    """(the run id that will own output_dir, what of a previous run to clear). A new run in a folder holding another
    run's results is refused unless --overwrite_output_dir (which clears them); a resumed run continues its
    checkpoint's id, and resuming another run's checkpoint into a folder that holds a run is refused the same way.
    Nothing in the folder changes here: `take_output_dir` does that once the whole setup has succeeded, so a command
    refused in setup (a wrong flag, an unreadable dataset) leaves the folder as it was."""
    out = Path(args.output_dir)
    owner = json.loads((out / RUN_FILE).read_text())["run_id"] if (out / RUN_FILE).exists() else None
    previous = [p.name for p in (out / RUN_FILE, out / "checkpoints", out / "model", out / "train_summary.json")
                if p.exists()]
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            found = run_checkpoints(out, owner) if owner else []
            if not found:
                raise UsageError(f"--resume_from_checkpoint latest: {out} holds no checkpoint of its run")
            args.resume_from_checkpoint = str(found[-1])
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise UsageError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
        try:
            run_id = verify_checkpoint(path)["run_id"]
        except ValueError as e:
            raise UsageError(str(e)) from None
        if previous and owner != run_id and not args.overwrite_output_dir:
            raise UsageError(
                f"--output_dir {out} holds another run ({', '.join(previous)}); resuming {path} (run {run_id}) there "
                "would overwrite it. Pick another --output_dir, or --overwrite_output_dir to replace that run."
            )
        clear = previous if owner != run_id else []
    else:
        if previous and not args.overwrite_output_dir:
            raise UsageError(
                f"--output_dir {out} holds another run ({', '.join(previous)}). Continue it with "
                "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or pick another --output_dir."
            )
        run_id, clear = uuid.uuid4().hex, previous
    run_id = broadcast_object_list([run_id])[0]  # a new run's id is the main process's
    return run_id, clear


def take_output_dir(accelerator, args, run_id: str, clear: list):
    """The folder becomes the run's (at the end of a successful setup): the previous run's results are cleared when
    --overwrite_output_dir allowed it, temporary folders of checkpoints that were never completed (a crash or a
    full disk mid-write) are removed, and `poolformer_run.json` names the run."""
    out = Path(args.output_dir)
    accelerator.wait_for_everyone()  # every process has read the folder before the main process changes it
    if accelerator.is_main_process:
        if clear:
            logger.warning("--overwrite_output_dir: deleting the previous run's %s in %s", ", ".join(clear), out)
            keep = Path(args.resume_from_checkpoint).resolve() if args.resume_from_checkpoint else None
            for old in (out / "checkpoints").glob("*"):
                if keep is None or old.resolve() != keep:
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(out / "model", ignore_errors=True)
            (out / "train_summary.json").unlink(missing_ok=True)
        for stale in (out / "checkpoints").glob(".tmp_step_*"):
            logger.warning("removing %s: a checkpoint that was never completed", stale)
            shutil.rmtree(stale, ignore_errors=True)
        _write_json(out / RUN_FILE, {"run_id": run_id})
    accelerator.wait_for_everyone()


class OutputLock:
    """The output folder's lock (filelock's OS lock on `.train.lock`), held while train.py works there. `release`
    removes the file, then unlocks: a finished run leaves no lock file, and the folder it created for a refused
    command is removed again when it stayed empty."""

    def __init__(self, out: Path):
        from filelock import FileLock

        self.out, self.created = out, not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(out / LOCK_FILE))

    def release(self, remove_empty_folder: bool = False):
        if self.lock.is_locked:
            (self.out / LOCK_FILE).unlink(missing_ok=True)  # while still held: no other holder can see this file
            self.lock.release(force=True)
        if remove_empty_folder and self.created:
            try:
                self.out.rmdir()
            except OSError:  # something was written there
                pass


def _lock(out: Path) -> tuple:
    """(the held OutputLock, None) or (None, the error)."""
    from filelock import Timeout

    lock = OutputLock(out)
    try:
        lock.lock.acquire(timeout=0)
    except Timeout:
        lock.release(remove_empty_folder=True)
        return None, (f"--output_dir {out} is in use by another train.py (it holds {out / LOCK_FILE}): wait for it to "
                      "end, or pick another --output_dir")
    return lock, None


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


class UsageError(ValueError):
    """A problem with the arguments or the output folder, found before training: exit code 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Stopping: signals to this process, or its launcher going away
# ---------------------------------------------------------------------------------------------------------------------


class StopRequest:
    """Set by SIGTERM/SIGINT, or when the process that launched this one dies: `accelerate launch` exits on SIGTERM
    without passing it on, and a scheduler that sent it is about to kill the container. The training loop then
    finishes its step, checkpoints and exits; with several processes they agree on the step (an all-reduce)."""

    def __init__(self):
        self.reason = None
        self.parent = os.getppid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        launched = any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"))
        if launched:  # Linux: the kernel sends SIGTERM when the launcher dies (not when a shell does: nohup stays)
            try:
                import ctypes

                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass
        self.watch_parent = launched

    def _on_signal(self, signum, frame):
        self.reason = f"signal {signal.Signals(signum).name}"

    def requested(self, accelerator) -> bool:
        if self.reason is None and self.watch_parent and os.getppid() != self.parent:
            self.reason = "the launcher exited"
        flag = torch.tensor(float(self.reason is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
            if self.reason is None and flag.item():
                self.reason = "another process was stopped"
        return bool(flag.item())


# ---------------------------------------------------------------------------------------------------------------------
# Setup, loop, export
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    args: TrainArguments
    data_args: DataArguments
    model_args: ModelArguments
    accelerator: Accelerator
    run_id: str
    lock: Optional["OutputLock"]  # the output folder's lock (main process), released when the run ends
    fingerprint: dict
    protocol: str
    spec: object
    datasets: dict
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_dl: object
    val_dl: object
    progress: Progress
    max_steps: int
    num_params: int
    val_history: list
    sample_errors: list = field(default_factory=list)  # sample writing that failed: reported, exit 1 at the end


def make_accelerator(args: TrainArguments) -> Accelerator:
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.log_with == "none" else args.log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    return accelerator


def load_config(model_args: ModelArguments) -> PoolformerConfig:
    """The hub config with the command line's overrides."""
    config = PoolformerConfig.from_pretrained(model_args.model_config)
    if model_args.dropout is not None:
        config.dropout = model_args.dropout
    if model_args.checkpoint_chunk_size is not None:
        config.checkpoint_chunk_size = model_args.checkpoint_chunk_size
    return config


def load_data(accelerator, data_args: DataArguments, config: PoolformerConfig, args: TrainArguments) -> tuple:
    """(protocol, spec, datasets); the model is trained with the protocol's quantisation. Streamed, every process
    gets its own shards of the training stream, and the validation split becomes a fixed held-out list: the first
    --max_eval_batches (default 16) batches of the validation stream, the same in every process (the prepared
    evaluation loader divides them)."""
    with accelerator.main_process_first():  # the main process renders/downloads/unpacks/indexes first
        protocol, spec, datasets = build_datasets(data_args, config, accelerator.process_index,
                                                  accelerator.num_processes, args.seed)
    if data_args.streaming:
        count = (args.max_eval_batches or 16) * args.batch_size
        datasets["validation"] = HeldOut(held_out_items(datasets["validation"], count), datasets["validation"])
    if spec.quantization != config.quantization:
        logger.warning("protocol %s quantises with %s, the model config says %s: the model is trained with %s",
                       protocol, spec.quantization, config.quantization, spec.quantization)
        config.quantization = spec.quantization
    if len(datasets["validation"]) == 0:  # its NLL would read 0.0 bits/sample
        raise UsageError(f"the validation split has no readable item ({skipped_files(datasets['validation'])} files "
                         "skipped as unreadable or empty)")
    return protocol, spec, datasets


def build_model(model_args: ModelArguments, config: PoolformerConfig, args: TrainArguments) -> tuple:
    """(model, its EMA) with the saved generation settings."""
    model = PoolformerForCausalLM(config)
    saved = Path(model_args.model_config) / "generation_config.json"
    model.generation_config = (GenerationConfig.from_pretrained(model_args.model_config) if saved.exists()
                               else audio_generation_config(config))

    def ema_update(ema_params, params, num_averaged):
        # the usual EMA warm-up: the decay grows to --ema_decay, so short runs are not stuck near the init
        decay = min(args.ema_decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    return model, AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


class HeldOut(torch.utils.data.Dataset):
    """A streamed run's validation items, held as a list (the same items at every evaluation and after a resume)."""

    def __init__(self, items: list, stream: AudioTokenStream):
        self.items, self.skipped = items, stream.skipped

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def skipped_files(dataset) -> int:
    return dataset.skipped if isinstance(dataset.skipped, int) else len(dataset.skipped)


def default_num_workers(accelerator) -> int:
    """Decoding workers per process: on CUDA enough to keep the GPU fed (up to 8, from the CPUs this process may
    use, one left for the training loop); on the CPU none, since the training step already uses every core."""
    if accelerator.device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(1, accelerator.num_processes) - 1))


def make_loaders(datasets: dict, args: TrainArguments, accelerator) -> tuple:
    """(train, validation) DataLoaders. Map-style: shuffled by a private generator (iterating must not draw from the
    global RNG, or dropout after a resume would differ), decoded in --num_workers persistent workers, pinned on
    CUDA. A stream is read in the main process (its exact position goes into checkpoints)."""
    workers = args.num_workers if args.num_workers is not None else default_num_workers(accelerator)
    pin = accelerator.device.type == "cuda"

    def loader(split, shuffle):
        generator = torch.Generator().manual_seed(args.seed)  # even a stream's loader draws a seed at each iter()
        if isinstance(datasets[split], AudioTokenStream):
            return torch.utils.data.DataLoader(datasets[split], batch_size=args.batch_size, pin_memory=pin,
                                               generator=generator)
        return torch.utils.data.DataLoader(datasets[split], batch_size=args.batch_size, shuffle=shuffle,
                                           drop_last=shuffle, num_workers=workers, persistent_workers=workers > 0,
                                           pin_memory=pin, generator=generator)

    train_dl, val_dl = loader("train", True), loader("validation", False)
    if isinstance(datasets["train"], AudioTokenStream):
        return train_dl, val_dl
    if len(train_dl) == 0:
        raise UsageError(f"{len(datasets['train'])} training items < --batch_size {args.batch_size}")
    return train_dl, val_dl


def make_schedule(accelerator, model, train_dl, args: TrainArguments) -> tuple:
    """(optimizer, scheduler, max_steps, warmup), all in optimizer steps."""
    if isinstance(train_dl.dataset, AudioTokenStream):  # a stream has no length: it runs for --max_steps
        if not args.max_steps:
            raise UsageError("--streaming trains for --max_steps (a stream has no epochs to count): pass --max_steps")
        max_steps = args.max_steps
    else:
        steps_per_epoch = math.ceil(len(train_dl) / accelerator.num_processes / args.gradient_accumulation_steps)
        epochs = args.num_epochs if args.num_epochs is not None else 1.0
        max_steps = args.max_steps or math.ceil(epochs * steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, max_steps // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    # a scheduler prepared by accelerate steps once per process at every optimizer step, so the schedule is laid
    # out in that many steps per optimizer step (as accelerate's examples do)
    scheduler = get_scheduler("cosine" if args.lr_schedule == "cosine" else "constant_with_warmup", optimizer,
                              num_warmup_steps=warmup * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    return optimizer, scheduler, max_steps, warmup


def setup(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> Run:
    """Everything before the first step; every error here comes before training starts."""
    accelerator = make_accelerator(args)
    lock = None
    try:
        lock = lock_output_dir(accelerator, args)
        run_id, clear = claim_output_dir(accelerator, args)
        run = _setup(accelerator, model_args, data_args, args, run_id, lock)
        take_output_dir(accelerator, args, run_id, clear)  # only now: a refused command leaves the folder as it was
    except BaseException:
        if lock is not None:
            lock.release(remove_empty_folder=True)
        raise
    if accelerator.is_main_process:
        flat = {**asdict(model_args), **asdict(data_args), **asdict(args)}
        accelerator.init_trackers("poolformer", config={k: v for k, v in flat.items()
                                                        if isinstance(v, (int, float, str, bool))})
    return run


def _setup(accelerator, model_args, data_args, args, run_id, lock) -> Run:
    config = load_config(model_args)
    if not torch.cuda.is_available():
        tune_cpu_allocator(long_sequences=config.checkpoint_chunk_size > 0)
    protocol, spec, datasets = load_data(accelerator, data_args, config, args)
    model, ema = build_model(model_args, config, args)
    train_dl, val_dl = make_loaders(datasets, args, accelerator)
    optimizer, scheduler, max_steps, warmup = make_schedule(accelerator, model, train_dl, args)
    fingerprint = run_fingerprint(config, data_args, args, accelerator, max_steps, warmup)
    if args.resume_from_checkpoint:
        check_resume(Path(args.resume_from_checkpoint), fingerprint)
    if data_args.streaming:  # each process iterates its own shards: accelerate must not split or dispatch them
        model, optimizer, val_dl, scheduler = accelerator.prepare(model, optimizer, val_dl, scheduler)
    else:
        model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl,
                                                                            scheduler)
    ema.to(accelerator.device)
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress)
    if args.resume_from_checkpoint:  # verified by claim_output_dir and check_resume
        accelerator.load_state(args.resume_from_checkpoint)
        if data_args.streaming:
            state = load_stream_state(args.resume_from_checkpoint, accelerator)
            try:
                datasets["train"].load_state_dict(state)
            except ValueError as e:  # e.g. the dataset's files changed
                raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: {e}") from None
        logger.info("resumed from %s at step %d", args.resume_from_checkpoint, progress.step)
    num_params = sum(p.numel() for p in model.parameters())
    if accelerator.is_main_process:
        logger.info("protocol %s: %s; %d parameters; %d optimizer steps", protocol,
                    {k: "streamed" if isinstance(v, AudioTokenStream) else len(v) for k, v in datasets.items()},
                    num_params, max_steps)
        skipped = {k: skipped_files(v) for k, v in datasets.items() if v.skipped}
        if skipped:
            logger.warning("unreadable or empty files skipped: %s", skipped)
    return Run(args, data_args, model_args, accelerator, run_id, lock, fingerprint, protocol, spec, datasets, model, ema,
               optimizer, scheduler, train_dl, val_dl, progress, max_steps, num_params, [])


def evaluate(run: Run) -> float:
    """Validation NLL of the EMA weights in bits per sample (metrics.nll_bits: every item once)."""
    return nll_bits(run.ema.module, run.val_dl, run.accelerator, run.args.max_eval_batches)[0]


def write_samples(model, args, folder, seed):
    """Unconditional samples from the zero token at temperature 1: WAVs and a spectrogram PNG (text files for a byte
    model)."""
    if model.config.quantization == "bytes":
        from training.text_samples import write_text_samples

        return write_text_samples(model, args.num_samples, args.sample_bytes, folder, seed)
    model.eval()
    new_tokens = max(1, int(args.sample_seconds * model.config.sample_rate))
    logger.info("generating %d samples of %d steps into %s%s", args.num_samples, new_tokens, folder,
                " (the first long generation compiles its decoding step first: minutes on a CPU)" if new_tokens >= 4000
                else "")
    start = time.perf_counter()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    tokens = model.generate(max_new_tokens=new_tokens, num_return_sequences=args.num_samples, do_sample=True,
                            temperature=1.0, top_k=0, generator=generator)
    waves = model.tokens_to_waveform(tokens)
    paths = [write_wav(Path(folder) / f"sample_{i}.wav", w, model.config.sample_rate) for i, w in enumerate(waves)]
    save_spectrogram(waves, model.config.sample_rate, Path(folder) / "spectrograms.png")
    logger.info("wrote %d samples in %.1f s", len(paths), time.perf_counter() - start)
    return paths


def try_write_samples(model, args, folder, seed) -> tuple:
    """`write_samples`, and a failure reported instead of raised: (paths, None) or ([], "the error"). Samples come
    last and must not cost a run its model or its checkpoints."""
    try:
        return write_samples(model, args, folder, seed), None
    except Exception as e:  # any failure: reported with its traceback
        logger.exception("writing samples to %s failed", folder)
        return [], f"{type(e).__name__}: {e}"


def apply_update(run: Run, grad_norm: torch.Tensor) -> bool:
    """The optimizer step, unless the grad norm is >= --skip_grad_norm or not finite (the thesis' rule; the one
    device sync of a step). A skipped step under fp16 still updates the loss scaler, which `unscale_` needs before the
    next step (and which lowers its scale after an overflow)."""
    accelerator = run.accelerator
    # grads are all-reduced, so every rank takes the same decision
    if torch.isfinite(grad_norm) and grad_norm < run.args.skip_grad_norm:
        run.optimizer.step()
        run.ema.update_parameters(accelerator.unwrap_model(run.model))
        updated = True
    else:
        run.progress.skipped += 1
        if accelerator.scaler is not None:
            accelerator.scaler.update()
        updated = False
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return updated


class StepLog:
    """Loss, tokens and grad norm summed on the device between logs: reading them waits for the device, so that
    happens every --log_every steps, not every step."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.tokens = torch.zeros((), device=self.device, dtype=torch.long)
        self.steps, self.clock, self.grad_norm = 0, time.perf_counter(), None

    def add(self, loss, attention_mask, grad_norm):
        self.loss += loss.detach().float()
        self.tokens += attention_mask.sum()
        self.steps += 1
        self.grad_norm = grad_norm

    def read(self, run: Run) -> dict:
        accelerator = run.accelerator
        loss = accelerator.reduce(self.loss / max(self.steps, 1), "mean").item()
        tokens = accelerator.reduce(self.tokens, "sum").item()
        logs = {"train/loss": loss, "train/bits_per_sample": nats_to_bits(loss),
                "train/lr": run.scheduler.get_last_lr()[0], "train/grad_norm": float(self.grad_norm),
                "train/tokens_per_s": tokens / max(time.perf_counter() - self.clock, 1e-9),
                "train/skipped_updates": run.progress.skipped}
        self.reset()
        return logs


def train_epoch(run: Run, stop: "StopRequest", bar) -> Optional[bool]:
    """The rest of the current epoch (from the saved position after a resume): True when max_steps is reached,
    False when the run was stopped (after a checkpoint), None at the epoch's end."""
    args, accelerator, model, progress = run.args, run.accelerator, run.model, run.progress
    streamed = isinstance(run.train_dl.dataset, AudioTokenStream)  # endless, and resumed from its own state
    if streamed:
        batches = ({k: v.to(accelerator.device) for k, v in b.items()} for b in run.train_dl)
    else:
        run.train_dl.set_epoch(progress.epoch)
        batches = (accelerator.skip_first_batches(run.train_dl, progress.batch_in_epoch) if progress.batch_in_epoch
                   else run.train_dl)
    log = StepLog(accelerator.device)
    model.train()
    for batch in batches:
        progress.batch_in_epoch += 1
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if not accelerator.sync_gradients:
                continue
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            apply_update(run, grad_norm)
        progress.step += 1
        bar.update(1)
        log.add(loss, batch["attention_mask"], grad_norm)

        done = progress.step >= run.max_steps
        logs = {}
        if progress.step % args.log_every == 0 or done:
            logs = log.read(run)
            bar.set_postfix(loss=f"{logs['train/loss']:.3f}", bits=f"{logs['train/bits_per_sample']:.3f}")
        if progress.step % args.eval_every == 0 or done:
            logs["val/bits_per_sample"] = evaluate(run)
            run.val_history.append((progress.step, logs["val/bits_per_sample"]))
            model.train()
            if accelerator.is_main_process:
                bar.write(f"step {progress.step}: validation {logs['val/bits_per_sample']:.4f} bits/sample (EMA)")
        if logs:
            accelerator.log(logs, step=progress.step)
        if args.sample_every and progress.step % args.sample_every == 0 and accelerator.is_main_process:
            _, error = try_write_samples(run.ema.module, args, Path(args.output_dir) / "samples" /
                                         f"step_{progress.step:08d}", args.seed)
            if error:
                run.sample_errors.append(f"step {progress.step}: {error}")
            model.train()
        # a stop request is polled with the logs (every process at the same steps: it is a collective)
        polled = progress.step % args.log_every == 0 or done
        preempt = (polled and stop.requested(accelerator)) or progress.step == args.stop_after_steps
        if progress.step % args.save_every == 0 or done or preempt:
            save_checkpoint(accelerator, args, progress, run.run_id, run.fingerprint,
                            run.datasets["train"] if streamed else None)
        if preempt:
            logger.info("stopped at step %d (%s); resume with --resume_from_checkpoint latest", progress.step,
                        stop.reason or "--stop_after_steps")
            return False
        if done:
            return True
    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    return None


def train_loop(run: Run) -> bool:
    """Epochs until max_steps (True) or a stop request (False; a checkpoint is written either way)."""
    accelerator, progress = run.accelerator, run.progress
    stop = StopRequest()
    bar = tqdm(total=run.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train",
               unit="step")  # optimizer steps, each of --batch_size x processes x accumulation clips
    if progress.step == 0:  # the untrained baseline, for the record
        run.val_history.append((0, evaluate(run)))
        accelerator.log({"val/bits_per_sample": run.val_history[-1][1]}, step=0)
    finished = None
    while finished is None and progress.step < run.max_steps:
        finished = train_epoch(run, stop, bar)
    bar.close()
    if finished is False:
        accelerator.end_training()
        return False
    return True


def model_card(run: Run, val_bits: float, sample_names: list, sample_error: Optional[str] = None) -> ModelCard:
    args, config, spec, progress = run.args, run.ema.module.config, run.spec, run.progress
    data = run.data_args.dataset or "built-in spoken digits (espeak-ng, SC09 layout)"
    card_data = ModelCardData(
        library_name="transformers", license="apache-2.0",
        tags=(["text", "bytes", "byte-level"] if config.quantization == "bytes" else ["audio", "raw-audio"])
        + ["poolformer", "rg-lru", "custom_code"],
        datasets=[run.data_args.dataset] if run.data_args.dataset and not Path(run.data_args.dataset).exists() else None,
    )
    data_line = data_card_line(spec) if config.quantization == "bytes" else (
        f"{spec.sample_rate} Hz, {spec.levels.bit_length() - 1}-bit {spec.quantization}, per-clip min-max\n  "
        f"{'on' if spec.minmax else 'off'}, items of {spec.seq_len} samples ({spec.mode})")
    content = f"""---
{card_data.to_yaml()}
---

# Poolformer ({Path(run.model_args.model_config).name})

A {"byte-level (raw bytes)" if config.quantization == "bytes" else "raw-audio"} language model (Poolformer, arXiv \
2510.02206): RG-LRU recurrences in pooling SkipBlocks.
Load it with `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`; these are the EMA weights.

## Model

- parameters: {run.num_params:,}
- width {config.hidden_size}, pooling {config.pooling_factors}, pairs per level {config.layers_per_level},
  {'complex' if config.complex_recurrence else 'real'} RG-LRU, norm {config.norm}, pooling {config.pooling}
  (G={config.pooling_groups}), shift {config.causal_shift}, skips {config.skip}

## Data

- dataset: {data} (protocol {run.protocol})
- {data_line}

## Training

- optimizer steps: {progress.step} (skipped updates: {progress.skipped}), batch {args.batch_size} per process x
  {args.gradient_accumulation_steps} accumulation x {run.accelerator.num_processes} processes, lr {args.learning_rate}
  ({args.lr_schedule}, {args.warmup_steps if args.warmup_steps is not None else 'auto'} warm-up), EMA {args.ema_decay}
- validation NLL: {val_bits:.4f} bits/{"byte" if config.quantization == "bytes" else "sample"} (EMA weights, mean over \
all unmasked {"bytes" if config.quantization == "bytes" else "samples"})

## Samples

{f"Writing samples failed: {sample_error}" if sample_error else "Unconditional, temperature 1, from the zero token: "
 + ", ".join(f"`samples/{n}`" for n in sample_names)}
"""
    return ModelCard(content)


def export(run: Run) -> Path:
    """Replicas must agree; then the EMA model, samples, model card and summary; optionally the Hub."""
    accelerator, args, progress = run.accelerator, run.args, run.progress
    checksum = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(run.model).parameters()]).sum()
    checksums = accelerator.gather(checksum.reshape(1)).tolist()
    val_bits = run.val_history[-1][1] if run.val_history and run.val_history[-1][0] == progress.step else evaluate(run)
    out = Path(args.output_dir) / "model"
    if accelerator.is_main_process:
        if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksums[0])):
            raise RuntimeError(f"replicas diverged: parameter checksums {checksums}")
        final = run.ema.module
        final.save_pretrained(out, safe_serialization=True)
        samples, sample_error = try_write_samples(final, args, out / "samples", args.seed)
        model_card(run, val_bits, [p.name for p in samples], sample_error).save(out / "README.md")
        run.sample_errors += [f"export: {sample_error}"] if sample_error else []
        summary = dict(steps=progress.step, skipped_updates=progress.skipped, val_bits_per_sample=val_bits,
                       val_history=run.val_history, replica_checksums=checksums, protocol=run.protocol,
                       parameters=run.num_params, run_id=run.run_id,
                       items={k: None if isinstance(v, AudioTokenStream) else len(v) for k, v in run.datasets.items()},
                       skipped_files={k: skipped_files(v) for k, v in run.datasets.items()},
                       mixed_precision=accelerator.mixed_precision,
                       dynamo_backend=str(accelerator.state.dynamo_plugin.backend.value).lower(),
                       sample_errors=run.sample_errors)
        _write_json(Path(args.output_dir) / "train_summary.json", summary)
        logger.info("exported %s (validation %.4f bits/sample)", out, val_bits)
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=args.hub_token)
            repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
            repo_id = api.create_repo(repo_id, private=args.hub_private, exist_ok=True).repo_id
            api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message=f"Poolformer, step {progress.step}")
            logger.info("pushed to %s", repo_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if run.sample_errors:  # everything else is on disk by now
        print(f"train.py: error: the model is exported to {out}, but writing samples failed: "
              + "; ".join(run.sample_errors), file=sys.stderr)
        raise SystemExit(1)
    return out


def main(argv=None):
    model_args, data_args, args = parse_arguments((ModelArguments, DataArguments, TrainArguments), argv, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        run = setup(model_args, data_args, args)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        if train_loop(run):
            return export(run)
        return None
    finally:
        if run.lock is not None:
            run.lock.release()


if __name__ == "__main__":
    main()
