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

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import GenerationConfig, get_scheduler

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, audio_generation_config, nats_to_bits
from training.arguments import ModelArguments, TrainArguments
from training.checkpoints import Progress, check_resume, load_stream_state, run_fingerprint, save_checkpoint
from training.data import AudioSpec, AudioTokenStream, DataArguments, build_datasets
from training.export import export, skipped_files, try_write_samples
from training.metrics import nll_bits
from training.output_dir import OutputClaim, claim_output_dir
from training.stopping import Stop, StopRequest
from training.stream import HeldOut, held_out_items
from training.utils import UsageError, parse_arguments, tune_cpu_allocator, usage_exit

logger = logging.getLogger("train")


# ---------------------------------------------------------------------------------------------------------------------
# Setup: accelerator, output folder, data, model, loaders, schedule, resume
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The data a run trains on: what build_datasets made, and its loaders."""

    name: Optional[str]  # --dataset (None: the built-in spoken digits)
    protocol: str
    spec: AudioSpec
    datasets: dict
    train_dl: torch.utils.data.DataLoader
    val_dl: torch.utils.data.DataLoader

    @property
    def streamed(self) -> bool:  # endless, and resumed from its own state
        return isinstance(self.datasets["train"], AudioTokenStream)


@dataclass
class Run:
    """What the loop and the export share: the run's settings, owner and data, the model and its optimisation state."""

    args: TrainArguments
    accelerator: Accelerator
    claim: OutputClaim  # the output folder: run id, resumed checkpoint, lock
    fingerprint: dict  # the settings a resume must keep, stored in every checkpoint
    model_config: str  # --model_config, named in the model card
    data: Data
    model: torch.nn.Module
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    progress: Progress
    max_steps: int
    num_params: int
    val_history: list = field(default_factory=list)  # (step, validation bits/sample)
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


def load_config(model_args: ModelArguments, **data_fields) -> PoolformerConfig:
    """The hub config with the command line's overrides (and the data's quantisation, once it is known), applied
    when the config is made, where they are validated: a config is never changed afterwards."""
    overrides = {k: v for k, v in (("dropout", model_args.dropout),
                                   ("checkpoint_chunk_size", model_args.checkpoint_chunk_size)) if v is not None}
    return PoolformerConfig.from_pretrained(model_args.model_config, **overrides, **data_fields)


def load_data(accelerator, data_args: DataArguments, config: PoolformerConfig, args: TrainArguments) -> tuple:
    """(protocol, spec, datasets). Streamed, every process gets its own shards of the training stream, and the
    validation split becomes a fixed held-out list: the first --max_eval_batches (default 16) batches of the
    validation stream, the same in every process (the prepared evaluation loader divides them)."""
    with accelerator.main_process_first():  # the main process renders/downloads/unpacks/indexes first
        protocol, spec, datasets = build_datasets(data_args, config, accelerator.process_index,
                                                  accelerator.num_processes, args.seed)
    if data_args.streaming:
        count = (args.max_eval_batches or 16) * args.batch_size
        datasets["validation"] = HeldOut(held_out_items(datasets["validation"], count), datasets["validation"])
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
    if not isinstance(datasets["train"], AudioTokenStream) and len(train_dl) == 0:
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
    # torch's fused AdamW updates every parameter in one kernel per step: on a CPU 4-5x faster than its per-tensor
    # loop over the sc09 model's 884 tensors, and the fastest on a GPU; other devices keep torch's default
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay, fused=accelerator.device.type in ("cpu", "cuda"))
    # a scheduler prepared by accelerate steps once per process at every optimizer step, so the schedule is laid
    # out in that many steps per optimizer step (as accelerate's examples do)
    scheduler = get_scheduler("cosine" if args.lr_schedule == "cosine" else "constant_with_warmup", optimizer,
                              num_warmup_steps=warmup * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    return optimizer, scheduler, max_steps, warmup


def setup(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> Run:
    """Everything before the first step; every error here comes before training starts, and leaves the output
    folder as it was (it becomes the run's only once the whole setup has succeeded)."""
    accelerator = make_accelerator(args)
    claim = claim_output_dir(accelerator, args)
    try:
        run = build_run(accelerator, claim, model_args, data_args, args)
        claim.take(accelerator)
    except BaseException:
        claim.release(remove_empty_folder=True)
        raise
    if accelerator.is_main_process:
        flat = {**asdict(model_args), **asdict(data_args), **asdict(args)}
        flat["resume_from_checkpoint"] = str(claim.resume) if claim.resume else None
        accelerator.init_trackers("poolformer", config={k: v for k, v in flat.items()
                                                        if isinstance(v, (int, float, str, bool))})
    return run


def build_run(accelerator, claim: OutputClaim, model_args, data_args, args) -> Run:
    """Data first: the model is built with the quantisation the data's protocol resolves."""
    config = load_config(model_args)
    if not torch.cuda.is_available():
        tune_cpu_allocator(long_sequences=config.checkpoint_chunk_size > 0)
    protocol, spec, datasets = load_data(accelerator, data_args, config, args)
    if spec.quantization != config.quantization:
        logger.warning("protocol %s quantises with %s, the model config says %s: the model is trained with %s",
                       protocol, spec.quantization, config.quantization, spec.quantization)
        config = load_config(model_args, quantization=spec.quantization)
    model, ema = build_model(model_args, config, args)
    data = Data(data_args.dataset, protocol, spec, datasets, *make_loaders(datasets, args, accelerator))
    optimizer, scheduler, max_steps, warmup = make_schedule(accelerator, model, data.train_dl, args)
    fingerprint = run_fingerprint(config, data_args, args, accelerator, max_steps, warmup)
    if claim.resume:
        check_resume(claim.resume, fingerprint)
    if data.streamed:  # each process iterates its own shards: accelerate must not split or dispatch them
        model, optimizer, data.val_dl, scheduler = accelerator.prepare(model, optimizer, data.val_dl, scheduler)
    else:
        model, optimizer, data.train_dl, data.val_dl, scheduler = accelerator.prepare(
            model, optimizer, data.train_dl, data.val_dl, scheduler)
    ema.to(accelerator.device)
    run = Run(args, accelerator, claim, fingerprint, model_args.model_config, data, model, ema, optimizer, scheduler,
              Progress(), max_steps, sum(p.numel() for p in model.parameters()))
    accelerator.register_for_checkpointing(ema, run.progress)
    if claim.resume:  # verified by claim_output_dir and check_resume
        resume(run)
    if accelerator.is_main_process:
        logger.info("protocol %s: %s; %d parameters; %d optimizer steps", protocol,
                    {k: "streamed" if isinstance(v, AudioTokenStream) else len(v) for k, v in datasets.items()},
                    run.num_params, max_steps)
        skipped = {k: skipped_files(v) for k, v in datasets.items() if v.skipped}
        if skipped:
            logger.warning("unreadable or empty files skipped: %s", skipped)
    return run


def resume(run: Run):
    """The checkpoint's state: model, optimizer, scheduler, EMA, position, RNGs, and a stream's exact place."""
    checkpoint = run.claim.resume
    run.accelerator.load_state(str(checkpoint))
    if run.data.streamed:
        state = load_stream_state(checkpoint, run.accelerator)
        try:
            run.data.datasets["train"].load_state_dict(state)
        except ValueError as e:  # e.g. the dataset's files changed
            raise UsageError(f"--resume_from_checkpoint {checkpoint}: {e}") from None
    logger.info("resumed from %s at step %d", checkpoint, run.progress.step)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def evaluate(run: Run) -> float:
    """Validation NLL of the EMA weights in bits per sample (metrics.nll_bits: every item once)."""
    return nll_bits(run.ema.module, run.data.val_dl, run.accelerator, run.args.max_eval_batches)[0]


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


def epoch_batches(run: Run):
    """The rest of the current epoch's batches (from the saved position after a resume); a stream's, endless."""
    if run.data.streamed:
        return ({k: v.to(run.accelerator.device) for k, v in b.items()} for b in run.data.train_dl)
    run.data.train_dl.set_epoch(run.progress.epoch)
    if run.progress.batch_in_epoch:
        return run.accelerator.skip_first_batches(run.data.train_dl, run.progress.batch_in_epoch)
    return run.data.train_dl


def train_epoch(run: Run, stop: StopRequest, bar) -> Stop:
    """The rest of the current epoch: FINISHED at max_steps, STOPPED on a stop request (after a checkpoint),
    EPOCH_END when the data runs out."""
    args, accelerator, model, progress = run.args, run.accelerator, run.model, run.progress
    log = StepLog(accelerator.device)
    model.train()
    for batch in epoch_batches(run):
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
        after_step(run, log, bar, done)
        # a stop request is polled with the logs (every process at the same steps: it is a collective)
        polled = progress.step % args.log_every == 0 or done
        preempt = (polled and stop.requested(accelerator)) or progress.step == args.stop_after_steps
        if progress.step % args.save_every == 0 or done or preempt:
            save_checkpoint(accelerator, args, progress, run.claim.run_id, run.fingerprint,
                            run.data.datasets["train"] if run.data.streamed else None)
        if preempt:
            logger.info("stopped at step %d (%s); resume with --resume_from_checkpoint latest", progress.step,
                        stop.reason or "--stop_after_steps")
            return Stop.STOPPED
        if done:
            return Stop.FINISHED
    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    return Stop.EPOCH_END


def after_step(run: Run, log: StepLog, bar, done: bool):
    """What is due after an optimizer step: logs, a validation of the EMA weights, samples."""
    args, accelerator, step = run.args, run.accelerator, run.progress.step
    logs = {}
    if step % args.log_every == 0 or done:
        logs = log.read(run)
        bar.set_postfix(loss=f"{logs['train/loss']:.3f}", bits=f"{logs['train/bits_per_sample']:.3f}")
    if step % args.eval_every == 0 or done:
        logs["val/bits_per_sample"] = evaluate(run)
        run.val_history.append((step, logs["val/bits_per_sample"]))
        run.model.train()
        if accelerator.is_main_process:
            bar.write(f"step {step}: validation {logs['val/bits_per_sample']:.4f} bits/sample (EMA)")
    if logs:
        accelerator.log(logs, step=step)
    if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
        _, error = try_write_samples(run.ema.module, args, Path(args.output_dir) / "samples" / f"step_{step:08d}",
                                     args.seed)
        if error:
            run.sample_errors.append(f"step {step}: {error}")
        run.model.train()


def train_loop(run: Run) -> Stop:
    """Epochs until max_steps (FINISHED) or a stop request (STOPPED); a checkpoint is written either way."""
    accelerator, progress = run.accelerator, run.progress
    stop = StopRequest()
    bar = tqdm(total=run.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train",
               unit="step")  # optimizer steps, each of --batch_size x processes x accumulation clips
    if progress.step == 0:  # the untrained baseline, for the record
        run.val_history.append((0, evaluate(run)))
        accelerator.log({"val/bits_per_sample": run.val_history[-1][1]}, step=0)
    reason = Stop.EPOCH_END
    while reason is Stop.EPOCH_END and progress.step < run.max_steps:
        reason = train_epoch(run, stop, bar)
    bar.close()
    return Stop.STOPPED if reason is Stop.STOPPED else Stop.FINISHED


# ---------------------------------------------------------------------------------------------------------------------
# main: setup -> loop -> export
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    model_args, data_args, args = parse_arguments((ModelArguments, DataArguments, TrainArguments), argv, __doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        run = setup(model_args, data_args, args)
    except UsageError as e:
        usage_exit(e, "train.py")
    try:
        if train_loop(run) is Stop.STOPPED:
            run.accelerator.end_training()
            return None
        last = run.val_history[-1] if run.val_history else None
        out = export(run, last[1] if last and last[0] == run.progress.step else evaluate(run))
        run.accelerator.end_training()
        if run.sample_errors:  # everything else is on disk by now
            print(f"train.py: error: the model is exported to {out}, but writing samples failed: "
                  + "; ".join(run.sample_errors), file=sys.stderr)
            raise SystemExit(1)
        return out
    finally:
        run.claim.release()


if __name__ == "__main__":
    main()
