"""The end of a training run: the EMA model saved with `save_pretrained`, its samples, a model card, the run's
summary, and optionally the Hub. Samples never cost a run its model: a failure writing them is reported, not raised."""

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import ModelCard, ModelCardData

from training.audio_files import save_spectrogram, write_wav
from training.checkpoints import write_json
from training.data import AudioTokenStream
from training.text_samples import data_card_line, write_text_samples

logger = logging.getLogger("train")


def write_samples(model, args, folder, seed):
    """Unconditional samples from the zero token at temperature 1: WAVs and a spectrogram PNG (text files for a byte
    model)."""
    if model.config.quantization == "bytes":
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


def skipped_files(dataset) -> int:
    return dataset.skipped if isinstance(dataset.skipped, int) else len(dataset.skipped)


def model_card(run, val_bits: float, sample_names: list, sample_error: Optional[str] = None) -> ModelCard:
    args, config, spec, progress = run.args, run.ema.module.config, run.data.spec, run.progress
    dataset, text = run.data.name, config.quantization == "bytes"
    card_data = ModelCardData(
        library_name="transformers", license="apache-2.0",
        tags=(["text", "bytes", "byte-level"] if text else ["audio", "raw-audio"]) + ["poolformer", "rg-lru", "custom_code"],
        datasets=[dataset] if dataset and not Path(dataset).exists() else None,
    )
    samples = (f"Writing samples failed: {sample_error}" if sample_error else
               "Unconditional, temperature 1, from the zero token: " + ", ".join(f"`samples/{n}`" for n in sample_names))
    data_line = data_card_line(spec) if text else (
        f"{spec.sample_rate} Hz, {spec.levels.bit_length() - 1}-bit {spec.quantization}, per-clip min-max\n  "
        f"{'on' if spec.minmax else 'off'}, items of {spec.seq_len} samples ({spec.mode})")
    unit = "byte" if text else "sample"
    return ModelCard(f"""---
{card_data.to_yaml()}
---

# Poolformer ({Path(run.model_config).name})

A {"byte-level (raw bytes)" if text else "raw-audio"} language model (Poolformer, arXiv 2510.02206): RG-LRU \
recurrences in pooling SkipBlocks.
Load it with `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`; these are the EMA weights.

## Model

- parameters: {run.num_params:,}
- width {config.hidden_size}, pooling {config.pooling_factors}, pairs per level {config.layers_per_level},
  {'complex' if config.complex_recurrence else 'real'} RG-LRU, norm {config.norm}, pooling {config.pooling}
  (G={config.pooling_groups}), shift {config.causal_shift}, skips {config.skip}

## Data

- dataset: {dataset or "built-in spoken digits (espeak-ng, SC09 layout)"} (protocol {run.data.protocol})
- {data_line}

## Training

- optimizer steps: {progress.step} (skipped updates: {progress.skipped}), batch {args.batch_size} per process x
  {args.gradient_accumulation_steps} accumulation x {run.accelerator.num_processes} processes, lr {args.learning_rate}
  ({args.lr_schedule}, {args.warmup_steps if args.warmup_steps is not None else 'auto'} warm-up), EMA {args.ema_decay}
- validation NLL: {val_bits:.4f} bits/{unit} (EMA weights, mean over all unmasked {unit}s)

## Samples

{samples}
""")


def summary(run, val_bits: float, checksums: list) -> dict:
    """`train_summary.json`: what the run did, in numbers."""
    accelerator, progress, datasets = run.accelerator, run.progress, run.data.datasets
    return dict(steps=progress.step, skipped_updates=progress.skipped, val_bits_per_sample=val_bits,
                val_history=run.val_history, replica_checksums=checksums, protocol=run.data.protocol,
                parameters=run.num_params, run_id=run.claim.run_id,
                items={k: None if isinstance(v, AudioTokenStream) else len(v) for k, v in datasets.items()},
                skipped_files={k: skipped_files(v) for k, v in datasets.items()},
                mixed_precision=accelerator.mixed_precision,
                dynamo_backend=str(accelerator.state.dynamo_plugin.backend.value).lower(),
                sample_errors=run.sample_errors)


def push_to_hub(folder: Path, args, step: int):
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    repo_id = api.create_repo(repo_id, private=args.hub_private, exist_ok=True).repo_id
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"Poolformer, step {step}")
    logger.info("pushed to %s", repo_id)


def export(run, val_bits: float) -> Path:
    """Replicas must agree; then the EMA model, samples, model card and summary; optionally the Hub. Returns the
    model folder; `run.sample_errors` then lists what failed in writing samples."""
    accelerator, args = run.accelerator, run.args
    checksum = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(run.model).parameters()]).sum()
    checksums = accelerator.gather(checksum.reshape(1)).tolist()
    out = Path(args.output_dir) / "model"
    if accelerator.is_main_process:
        if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksums[0])):
            raise RuntimeError(f"replicas diverged: parameter checksums {checksums}")
        final = run.ema.module
        final.save_pretrained(out, safe_serialization=True)
        samples, sample_error = try_write_samples(final, args, out / "samples", args.seed)
        model_card(run, val_bits, [p.name for p in samples], sample_error).save(out / "README.md")
        run.sample_errors += [f"export: {sample_error}"] if sample_error else []
        write_json(Path(args.output_dir) / "train_summary.json", summary(run, val_bits, checksums))
        logger.info("exported %s (validation %.4f bits/sample)", out, val_bits)
        if args.push_to_hub:
            push_to_hub(out, args, run.progress.step)
    accelerator.wait_for_everyone()
    return out
