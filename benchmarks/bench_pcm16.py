"""7. 16-bit audio against FLAC. On 16-bit speech the project renders itself (espeak-ng, our own sentences: no
download, no licence), three models of the same body are trained for the same CPU budget each, in the same run:

- the 16-bit Poolformer (`quantization="pcm"`, 65,536 values, the dual-softmax head): one step per sample;
- byte tokens, two per sample (high byte, then low byte + 256: a 512-way softmax), with one more pooling level of
  factor 2 in front, so that the level after it sees one step per sample again;
- the 8-bit mu-law model of the thesis on the same audio, whose likelihood is over 256 codes: in 16-bit terms each
  code spreads uniformly over the 16-bit values it stands for, which costs log2(that count) bits more per sample.

Held-out bits/sample (the test sentences, never trained on) are set beside FLAC's on the same samples (each clip
coded alone at the highest level, stream header excluded). The learning curves (validation bits/sample vs step
and vs seconds) go to `pcm16_curve.png` beside the results.
"""

import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, encode_audio, nats_to_bits
from training.audio_files import resample
from training.data import DataArguments, build_datasets
from training.metrics import FLAC_LEVEL, flac_bits
from training.spoken_digits import VOICES, espeak_renderer

from .common import ROOT, params

RATE = 16000
# our own sentences (no third-party text); the last two are the test split, the two before them validation
SENTENCES = (
    "The river runs past the old mill and under the stone bridge.",
    "Seven small boats came back before the storm reached the harbour.",
    "A quiet morning is the best time to read a long letter.",
    "She painted the door green and the window frames white.",
    "Nobody knew why the clock in the tower had stopped at noon.",
    "Fresh bread and warm soup were waiting on the kitchen table.",
    "The train to the coast leaves at nine and arrives after lunch.",
    "He counted the stars until the clouds covered the whole sky.",
    "Our garden grows tomatoes, beans and far too many weeds.",
    "Please close the gate so that the sheep stay in the field.",
    "The museum opens a new room of maps and old instruments today.",
    "Wind and rain kept the children inside for most of the week.",
    "Every spring the swallows return to the barn behind the house.",
    "The baker lights the oven long before the sun comes up.",
    "Two friends walked along the beach looking for smooth stones.",
    "A thin layer of snow covered the roofs of the village.",
    "The library keeps its rarest books in a cool and dark cellar.",
    "Music drifted from the open window across the empty square.",
)
SPEEDS_PITCHES = ((150, 50), (175, 40))
LR, LR_END = 2e-3, 1e-4
BODY = dict(pooling_factors=[4, 4, 5], layers_per_level=1, hidden_size=64, lru_width=64, num_gate_blocks=8,
            pooling_groups=64, dropout=0.0, embedding="mlp")


def make_speech16(root: Path) -> Path:
    """train/, validation/, test/ folders of 16 kHz 16-bit mono WAVs: every sentence in every voice and variant,
    rendered once (espeak-ng's 22,050 Hz output resampled with soxr and rounded to 16 bits)."""
    if (root / ".done").exists():
        return root
    render = espeak_renderer()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".tmp"))
    for s, text in enumerate(SENTENCES):
        split = "test" if s >= len(SENTENCES) - 2 else "validation" if s >= len(SENTENCES) - 4 else "train"
        (tmp / split).mkdir(exist_ok=True)
        for v, voice in enumerate(VOICES):
            for k, (speed, pitch) in enumerate(SPEEDS_PITCHES):
                wave, rate = render(text, voice, speed, pitch)
                pcm = np.clip(np.round(resample(wave, rate, RATE) * 32768.0), -32768, 32767).astype(np.int16)
                soundfile.write(tmp / split / f"s{s:02d}_v{v}_{k}.wav", pcm, RATE, subtype="PCM_16")
    (tmp / ".done").touch()
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def mu_law_bin_log2() -> torch.Tensor:
    """log2 of the number of 16-bit values each 8-bit mu-law code stands for (SaShiMi's quantiser on x = s / 32768)."""
    codes = encode_audio(torch.arange(-32768, 32768) / 32768.0, "mu-law", 256)
    return torch.bincount(codes, minlength=256).double().log2()


def as_mu_law(batch: dict) -> dict:
    """16-bit pcm items -> the same samples as 8-bit mu-law items (zero token 128)."""
    ids = encode_audio((batch["input_ids"] - 32768) / 32768.0, "mu-law", 256)
    ids[:, 0] = 128
    return {"input_ids": ids, "attention_mask": batch["attention_mask"],
            "labels": ids.masked_fill(batch["attention_mask"] == 0, -100)}


def as_bytes(batch: dict) -> dict:
    """16-bit pcm items -> byte tokens, two per sample: high byte (0-255), then low byte + 256; the zero token is the
    zero sample's high byte (128)."""
    ids, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
    pairs = torch.stack([ids // 256, ids % 256 + 256], dim=-1).flatten(1)
    pair_mask = mask.repeat_interleave(2, dim=1)
    ids = torch.cat([torch.full_like(pairs[:, :1], 128), pairs], dim=1)
    mask = torch.cat([torch.ones_like(pair_mask[:, :1]), pair_mask], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


MODELS = {  # name -> (config fields, batch transform, extra bits per predicted position in 16-bit terms)
    "Poolformer 16-bit (dual softmax)": (dict(BODY, vocab_size=65536, quantization="pcm", output_head="dual-softmax"),
                                          None),
    "byte tokens, 2 per sample": (dict(BODY, vocab_size=512, quantization="linear", bos_token_id=128,
                                       pooling_factors=[2] + BODY["pooling_factors"],
                                       layers_per_level=[1] + [BODY["layers_per_level"]] * 4), as_bytes),
    "8-bit mu-law": (dict(BODY, vocab_size=256, quantization="mu-law"), as_mu_law),
}


@torch.no_grad()
def held_out_bits(model, batches, transform, bin_log2=None) -> tuple:
    """(bits per 16-bit sample, bits per sample in the model's own terms) over `batches`; per-sample totals of
    every token a sample takes."""
    model.eval()
    nats = extra = samples = 0.0
    for batch in batches:
        samples += float((batch["labels"][:, 1:] != -100).sum())
        if transform is not None:
            batch = transform(batch)
        out = model(**batch)
        nats += float(out.sample_nll.double().sum())
        if bin_log2 is not None:  # the 8-bit model: log2(bin size) bits more per sample in 16-bit terms
            targets = batch["labels"][:, 1:]
            extra += float(bin_log2[targets[targets != -100]].sum())
    model.train()
    own = nats_to_bits(nats) / samples
    return own + extra / samples, own


def train_for(name, model, transform, train_items, val_batches, budget_s, eval_every_s, batch_size, bin_log2):
    """AdamW on shuffled training windows until `budget_s` seconds of training have passed (evaluations not
    counted), with validation every `eval_every_s` training seconds. The learning rate warms up over 50 steps and
    then follows a cosine in *time* from 2e-3 to 1e-4 at the end of the budget: every model anneals by its deadline,
    however many steps it fits in."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    curve, step, trained, next_eval = [], 0, 0.0, 0.0
    model.train()
    while trained < budget_s:
        if trained >= next_eval:
            curve.append((step, trained, held_out_bits(model, val_batches, transform, bin_log2)[0]))
            next_eval += eval_every_s
        order = torch.randperm(len(train_items), generator=generator)[:batch_size]
        batch = collate([train_items[int(i)] for i in order])
        if transform is not None:
            batch = transform(batch)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, trained / budget_s)))
        for group in opt.param_groups:
            group["lr"] = min(1.0, (step + 1) / 50) * (LR_END + (LR - LR_END) * cosine)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 200.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trained += time.perf_counter() - start
        step += 1
    curve.append((step, trained, held_out_bits(model, val_batches, transform, bin_log2)[0]))
    print(f"  {name}: {step} steps in {trained:.0f} s, validation {curve[-1][2]:.3f} bits/sample", flush=True)
    return curve


def collate(items):
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def batches_of(dataset, count, batch_size):
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def plot(curves: dict, flac: float, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        steps, seconds, bits = zip(*curve)
        axes[0].plot(steps, bits, marker=".", label=name)
        axes[1].plot(seconds, bits, marker=".", label=name)
    for ax, label in zip(axes, ("optimizer step", "training seconds (CPU)")):
        ax.axhline(flac, color="black", linestyle="--", label="FLAC -8 on the same clips")
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per 16-bit sample")
        ax.set_ylim(top=min(17.0, max(max(b for _, _, b in c) for c in curves.values()) + 0.5))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("16-bit speech: held-out bits/sample while training, against FLAC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench_pcm16(quick: bool, out: Path = None) -> dict:
    budget = 60 if quick else 300
    seq_len, batch_size = 4000, 8
    root = make_speech16(ROOT / "benchmarks" / "data_cache" / "speech16")
    cache_dir = str(ROOT / "benchmarks" / "data_cache")
    config16 = PoolformerConfig(**MODELS["Poolformer 16-bit (dual softmax)"][0])
    _, spec, sets = build_datasets(DataArguments(dataset=str(root), seq_len=seq_len, mode="window", cache_dir=cache_dir),
                                   config16)
    train_items = [sets["train"][i] for i in range(len(sets["train"]))]
    val_batches = batches_of(sets["validation"], 16 if quick else 32, batch_size)
    test_count = 32 if quick else len(sets["test"])
    test_batches = batches_of(sets["test"], test_count, batch_size)
    flac = flac_bits((sets["test"][i] for i in range(test_count)), 65536, RATE)
    flac_val = flac_bits((item for b in val_batches for item in split_batch(b)), 65536, RATE)["flac_bits_per_sample"]
    bin_log2 = mu_law_bin_log2()
    rows, curves = [], {}
    for name, (fields, transform) in MODELS.items():
        torch.manual_seed(0)
        model = PoolformerForCausalLM(PoolformerConfig(**fields))
        extra = bin_log2 if transform is as_mu_law else None
        curves[name] = train_for(name, model, transform, train_items, val_batches, budget, budget / 8, batch_size,
                                 extra)
        bits16, own = held_out_bits(model, test_batches, transform, extra)
        steps, seconds, _ = curves[name][-1]
        rows.append({"model": name, "params": params(model), "steps": steps, "train_s": seconds,
                     "bits_per_sample": bits16, "own_bits_per_sample": own,
                     "own_terms": "8-bit mu-law codes" if extra is not None else "16-bit samples",
                     "vs_flac": bits16 / flac["flac_bits_per_sample"]})
    if out is not None:
        plot(curves, flac_val, Path(out) / "pcm16_curve.png")
    samples = sum(float((b["labels"][:, 1:] != -100).sum()) for b in test_batches)
    return {"budget_s": budget, "seq_len": seq_len, "batch": batch_size, "rows": rows, "curves": curves,
            "flac": flac, "flac_level": FLAC_LEVEL, "test_samples": int(samples), "train_windows": len(train_items),
            "test_clips": len(list((root / "test").glob("*.wav"))), "train_seconds_of_audio": train_seconds(root),
            "uniform_bits": math.log2(65536)}


def split_batch(batch: dict) -> list:
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]


def train_seconds(root: Path) -> float:
    return sum(soundfile.info(str(f)).frames for f in (root / "train").glob("*.wav")) / RATE

