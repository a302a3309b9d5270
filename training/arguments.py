"""train.py's command line: the model's and the run's flags (the data's are `training.data.DataArguments`), checked
when parsed, so that a wrong value is a usage error before anything runs."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from training.utils import at_least, check_flags, positive

ROOT = Path(__file__).resolve().parent.parent


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
