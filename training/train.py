"""Train a Poolformer on audio with Accelerate: one CPU, one GPU or many.

    accelerate launch training/train.py                                   # tiny model, built-in spoken digits
    accelerate launch training/train.py --model_config hub_configs/sc09 --dataset krandiash/sc09 \
        --batch_size 32 --max_steps 300000 --mixed_precision bf16 --output_dir runs/sc09

The thesis recipe: AdamW (0.9, 0.999, wd 1e-4), lr 2e-3 with 1000 warm-up steps then constant or cosine, grad-norm
clip 200, updates skipped when the grad norm is >= 1000 or not finite, an EMA of the weights (0.999, warmed up as
min(0.999, (1 + n) / (10 + n)) after n updates) used for validation, samples and export. Checkpoints are written atomically every --save_every steps and on SIGTERM/SIGINT;
`--resume_from_checkpoint latest` continues exactly. The final EMA model is exported with `save_pretrained`
(safetensors + modeling code + generation config + model card) and optionally pushed to the Hub.
"""

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import GenerationConfig, get_scheduler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))
from data import PROTOCOLS, build_datasets  # noqa: E402
from metrics import nll_bits  # noqa: E402

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM  # noqa: E402
from modeling_poolformer.audio import save_spectrogram, write_wav  # noqa: E402

logger = logging.getLogger("train")


def tune_cpu_allocator(long_sequences: bool):
    """glibc's malloc settings for CPU training (no-op outside glibc, and when MALLOC_MMAP_THRESHOLD_ is set).
    Normal lengths: keep freed memory in the heap; glibc otherwise hands every freed tensor above 32 MB back to the
    OS and the next step page-faults it in again (steps ~1.5x faster). Long sequences trained in checkpointed time
    chunks: send every freed tensor of 1 MB or more straight back instead, since the heap otherwise fragments and
    holds ~2.5x the step's real peak (measured at T = 2^18)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**20 if long_sequences else 2**31 - 1)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model_config", default=str(ROOT / "hub_configs" / "tiny"), help="folder with config.json (hub_configs/...)")
    a("--dataset", help="Hub dataset repo id or local folder; default: built-in spoken digits (espeak-ng)")
    a("--protocol", default="auto", choices=PROTOCOLS, help="split/quantisation protocol of the data")
    a("--audio_column", default="audio", help="audio column of a generic Hub dataset")
    a("--seq_len", type=int, help="samples per training item (default: the protocol's, 16000 for SC09)")
    a("--mode", choices=("pad", "window"), help="pad whole clips, or cut fixed windows (default: the protocol's)")
    a("--no_minmax", action="store_true", help="skip per-clip min-max scaling before quantisation")
    a("--cache_dir", help="where datasets and the rendered default set are cached")
    a("--output_dir", default="runs/poolformer")
    a("--max_steps", type=int, help="optimizer steps (overrides --num_epochs)")
    a("--num_epochs", type=float, default=None)
    a("--batch_size", type=int, default=8, help="per process")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=2e-3)
    a("--weight_decay", type=float, default=1e-4)
    a("--warmup_steps", type=int, help="default: 1000, or a tenth of the run when that is shorter")
    a("--lr_schedule", default="constant", choices=("constant", "cosine"))
    a("--grad_clip", type=float, default=200.0)
    a("--skip_grad_norm", type=float, default=1000.0, help="skip the update when the grad norm is >= this")
    a("--ema_decay", type=float, default=0.999)
    a("--dropout", type=float, help="override the config's dropout")
    a("--checkpoint_chunk_size", type=int, help="train long --seq_len in checkpointed time chunks of this length")
    a("--mixed_precision", default=None, choices=("no", "fp16", "bf16"), help="default: accelerate config")
    a("--eval_every", type=int, default=500)
    a("--max_eval_batches", type=int, help="cap validation batches (default: the whole split)")
    a("--save_every", type=int, default=1000)
    a("--checkpoints_total_limit", type=int, default=3)
    a("--sample_every", type=int, default=0, help="write WAV samples every N steps (0: only at the end)")
    a("--num_samples", type=int, default=4)
    a("--sample_seconds", type=float, default=1.0)
    a("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' in output_dir")
    a("--stop_after_steps", type=int, help="checkpoint and exit after this many steps (as a preemption would)")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", help="repo id for --push_to_hub (default: the output folder's name)")
    a("--hub_token", default=None, help="default: HF_TOKEN or the cached login")
    a("--hub_private", action="store_true")
    a("--log_with", default="tensorboard", help="accelerate tracker(s): tensorboard, wandb, all, none")
    a("--num_workers", type=int, default=0)
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "gradient_accumulation_steps", "eval_every", "save_every", "num_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max_steps must be >= 1")
    if args.seq_len is not None and args.seq_len < 1:
        p.error("--seq_len must be >= 1")
    if args.checkpoint_chunk_size is not None and args.checkpoint_chunk_size < 0:
        p.error("--checkpoint_chunk_size must be >= 0 (0 = off)")
    if not (Path(args.model_config) / "config.json").exists():
        p.error(f"--model_config {args.model_config!r}: no config.json there")
    return args


class Progress:
    """Training position, saved in every checkpoint so that a resumed run continues with the next batch."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch, self.skipped = 0, 0, 0, 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def save_checkpoint(accelerator, args, progress):
    """accelerator.save_state into a temporary folder, renamed when complete: never a half-written checkpoint."""
    root = Path(args.output_dir) / "checkpoints"
    final = root / f"step_{progress.step:08d}"
    tmp = root / f".tmp_step_{progress.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[: -args.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir):
    found = sorted((Path(output_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def evaluate(model, dataloader, accelerator, max_batches=None):
    """Validation NLL in bits per sample (metrics.nll_bits: total NLL over unmasked samples / their count)."""
    return nll_bits(model, dataloader, accelerator, max_batches)[0]


def write_samples(model, args, folder, seed):
    """Unconditional samples from the zero token at temperature 1: WAVs and a spectrogram PNG."""
    model.eval()
    new_tokens = max(1, int(args.sample_seconds * model.config.sample_rate))
    generator = torch.Generator(device=model.device).manual_seed(seed)
    tokens = model.generate(max_new_tokens=new_tokens, num_return_sequences=args.num_samples, do_sample=True,
                            temperature=1.0, top_k=0, generator=generator)
    waves = model.tokens_to_waveform(tokens)
    paths = [write_wav(Path(folder) / f"sample_{i}.wav", w, model.config.sample_rate) for i, w in enumerate(waves)]
    save_spectrogram(waves, model.config.sample_rate, Path(folder) / "spectrograms.png")
    return paths


def model_card(args, config, protocol, spec, progress, val_bits, sample_names, num_params):
    data = args.dataset or "built-in spoken digits (espeak-ng, SC09 layout)"
    lines = [
        "---", "library_name: transformers", "tags: [audio, poolformer, rg-lru, raw-audio-generation]", "---", "",
        f"# Poolformer ({Path(args.model_config).name})", "",
        "A raw-audio language model (Poolformer, arXiv 2510.02206): RG-LRU recurrences in pooling SkipBlocks.",
        "Load it with `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`; these are the EMA weights.",
        "", "## Model", "",
        f"- parameters: {num_params:,}",
        f"- width {config.hidden_size}, pooling {config.pooling_factors}, pairs per level {config.layers_per_level}, "
        f"{'complex' if config.complex_recurrence else 'real'} RG-LRU, norm {config.norm}, pooling {config.pooling} "
        f"(G={config.pooling_groups}), shift {config.causal_shift}, skips {config.skip}",
        "", "## Data", "",
        f"- dataset: {data} (protocol {protocol})",
        f"- {spec.sample_rate} Hz, 8-bit {spec.quantization}, per-clip min-max {'on' if spec.minmax else 'off'}, "
        f"items of {spec.seq_len} samples ({spec.mode})",
        "", "## Training", "",
        f"- optimizer steps: {progress.step} (skipped updates: {progress.skipped}), batch {args.batch_size} per process "
        f"x {args.gradient_accumulation_steps} accumulation, lr {args.learning_rate} ({args.lr_schedule}, "
        f"{args.warmup_steps if args.warmup_steps is not None else 'auto'} warm-up), EMA {args.ema_decay}",
        f"- validation NLL: {val_bits:.4f} bits/sample (EMA weights, mean over all unmasked samples)",
        "", "## Samples", "",
        "Unconditional, temperature 1, from the zero token: " + ", ".join(f"`samples/{n}`" for n in sample_names),
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.log_with == "none" else args.log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)

    # ---- data and model (every error here comes before training starts)
    config = PoolformerConfig.from_pretrained(args.model_config)
    if args.dropout is not None:
        config.dropout = args.dropout
    if args.checkpoint_chunk_size is not None:
        config.checkpoint_chunk_size = args.checkpoint_chunk_size
    if not torch.cuda.is_available():
        tune_cpu_allocator(long_sequences=config.checkpoint_chunk_size > 0)
    with accelerator.main_process_first():  # the main process renders/downloads/unpacks first
        protocol, spec, datasets = build_datasets(args, config)
    if "validation" not in datasets:
        raise ValueError(f"protocol {protocol!r} gave no validation split; add files or use a dataset with one")
    model = PoolformerForCausalLM(config)
    generation_config = Path(args.model_config) / "generation_config.json"
    if generation_config.exists():
        model.generation_config = GenerationConfig.from_pretrained(args.model_config)

    def ema_update(ema_params, params, num_averaged):
        # the usual EMA warm-up: the decay grows to --ema_decay, so short runs are not stuck near the init
        decay = min(args.ema_decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    ema = AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)
    num_params = sum(p.numel() for p in model.parameters())

    def loader(split, shuffle):
        # a private generator: iterating a loader must not draw from the global RNG, or dropout after a resume
        # would differ from an uninterrupted run
        return torch.utils.data.DataLoader(datasets[split], batch_size=args.batch_size, shuffle=shuffle,
                                           drop_last=shuffle, num_workers=args.num_workers,
                                           generator=torch.Generator().manual_seed(args.seed))

    train_dl, val_dl = loader("train", True), loader("validation", False)
    if len(train_dl) == 0:
        raise ValueError(f"{len(datasets['train'])} training items < --batch_size {args.batch_size}")
    steps_per_epoch = math.ceil(len(train_dl) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_steps or math.ceil((args.num_epochs or 1.0) * steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(1000, max_steps // 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    scheduler = get_scheduler("cosine" if args.lr_schedule == "cosine" else "constant_with_warmup", optimizer,
                              num_warmup_steps=warmup, num_training_steps=max_steps)
    model, optimizer, train_dl, val_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, val_dl, scheduler)
    ema.to(accelerator.device)
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress)

    if args.resume_from_checkpoint:
        path = latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if path is None or not path.is_dir():
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: no checkpoint found")
        accelerator.load_state(str(path))
        logger.info("resumed from %s at step %d", path, progress.step)

    if accelerator.is_main_process:
        logger.info("protocol %s: %s; %d parameters; %d optimizer steps", protocol,
                    {k: len(v) for k, v in datasets.items()}, num_params, max_steps)
        skipped = {k: len(v.skipped) for k, v in datasets.items() if v.skipped}
        if skipped:
            logger.warning("unreadable or empty files skipped: %s", skipped)
        accelerator.init_trackers("poolformer", config={k: v for k, v in vars(args).items()
                                                        if isinstance(v, (int, float, str, bool))})

    stop = {"signal": None}  # SIGTERM/SIGINT: finish the step, checkpoint, exit

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # ---- the loop
    bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="train")
    val_bits, val_history = float("nan"), []
    if progress.step == 0:  # the untrained baseline, for the record
        val_history.append((0, evaluate(ema.module, val_dl, accelerator, args.max_eval_batches)))
        accelerator.log({"val/bits_per_sample": val_history[-1][1]}, step=0)
    tokens_seen, clock = 0, time.perf_counter()
    done = progress.step >= max_steps
    while not done:
        train_dl.set_epoch(progress.epoch)
        batches = accelerator.skip_first_batches(train_dl, progress.batch_in_epoch) if progress.batch_in_epoch else train_dl
        model.train()
        for batch in batches:
            progress.batch_in_epoch += 1
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                tokens_seen += int(batch["attention_mask"].sum()) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
                # grads are all-reduced, so every rank takes the same decision
                if torch.isfinite(grad_norm) and grad_norm < args.skip_grad_norm:
                    optimizer.step()
                    ema.update_parameters(accelerator.unwrap_model(model))
                else:
                    progress.skipped += 1
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            bar.update(1)

            loss_value = accelerator.reduce(loss.detach(), "mean").item()
            elapsed = time.perf_counter() - clock
            logs = {"train/loss": loss_value, "train/bits_per_sample": loss_value / math.log(2),
                    "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                    "train/tokens_per_s": tokens_seen / max(elapsed, 1e-9), "train/skipped_updates": progress.skipped}
            tokens_seen, clock = 0, time.perf_counter()
            bar.set_postfix(loss=f"{loss_value:.3f}", bits=f"{loss_value / math.log(2):.3f}")
            if progress.step % args.eval_every == 0 or progress.step == max_steps:
                val_bits = evaluate(ema.module, val_dl, accelerator, args.max_eval_batches)
                logs["val/bits_per_sample"] = val_bits
                val_history.append((progress.step, val_bits))
                model.train()
                if accelerator.is_main_process:
                    bar.write(f"step {progress.step}: validation {val_bits:.4f} bits/sample (EMA)")
            accelerator.log(logs, step=progress.step)
            if args.sample_every and progress.step % args.sample_every == 0 and accelerator.is_main_process:
                write_samples(ema.module, args, Path(args.output_dir) / "samples" / f"step_{progress.step:08d}", args.seed)
                model.train()
            done = progress.step >= max_steps
            preempt = stop["signal"] is not None or progress.step == args.stop_after_steps
            if progress.step % args.save_every == 0 or done or preempt:
                save_checkpoint(accelerator, args, progress)
            if preempt:
                bar.close()
                logger.info("stopped at step %d (%s); resume with --resume_from_checkpoint latest", progress.step,
                            f"signal {stop['signal']}" if stop["signal"] else "--stop_after_steps")
                accelerator.end_training()
                return None
            if done:
                break
        else:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    bar.close()

    # ---- replicas must agree; then export the EMA model
    checksum = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()]).sum()
    checksums = accelerator.gather(checksum.reshape(1)).tolist()
    if math.isnan(val_bits):
        val_bits = evaluate(ema.module, val_dl, accelerator, args.max_eval_batches)
    export = Path(args.output_dir) / "model"
    if accelerator.is_main_process:
        if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksums[0])):
            raise RuntimeError(f"replicas diverged: parameter checksums {checksums}")
        final = ema.module
        final.save_pretrained(export, safe_serialization=True)
        samples = write_samples(final, args, export / "samples", args.seed)
        (export / "README.md").write_text(
            model_card(args, final.config, protocol, spec, progress, val_bits, [p.name for p in samples], num_params))
        summary = dict(steps=progress.step, skipped_updates=progress.skipped, val_bits_per_sample=val_bits,
                       val_history=val_history,
                       replica_checksums=checksums, protocol=protocol, parameters=num_params,
                       items={k: len(v) for k, v in datasets.items()},
                       skipped_files={k: len(v.skipped) for k, v in datasets.items()})
        (Path(args.output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("exported %s (validation %.4f bits/sample)", export, val_bits)
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=args.hub_token)
            repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
            repo_id = api.create_repo(repo_id, private=args.hub_private, exist_ok=True).repo_id
            api.upload_folder(folder_path=str(export), repo_id=repo_id, commit_message=f"Poolformer, step {progress.step}")
            logger.info("pushed to %s", repo_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export


if __name__ == "__main__":
    main()
