"""9. Bytes: the same model on raw bytes, against xz. On a byte corpus built offline from the Python standard library
this interpreter ships (its top-level modules' sources and pydoc's topic texts: no download, the same files on every
machine with this Python version), three byte models of (nearly) equal parameter count each train for the same CPU
time, in the same run:

- Poolformer: learned byte embedding, pooling [2, 4, 4] (2, 8, 32 bytes per step at the pooled levels), one pair
  per level, D = 64;
- its no-pooling ablation: the same 7 (RG-LRU, MLP) pairs in one flat stack at full length;
- a GPT-2 (transformers' `GPT2LMHeadModel`, SDPA attention) whose layer count brings it closest in size.

Held-out bits per byte (the test files, never trained on) are set beside gzip -9, bz2 -9 and xz -9e on the same
windows (`training/compressors.py`): each window coded alone (the fair comparison: the models see each window alone)
and the whole held-out text as one stream. Then how one training step's cost grows with the window length, 1k .. 64k
bytes, for each model (B = 1, forward + backward).

The budget is CPU time of the training steps (`time.process_time`) on one thread, not wall time: on a machine shared
with other work, wall time measures the neighbours too, and so does the CPU time of several threads (an OpenMP
thread spinning at a barrier while its partner waits for a core burns CPU seconds without computing).
"""

import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, nats_to_bits
from training.compressors import LABELS, compressor_bits, item_bytes
from training.data import DataArguments, build_datasets

from .common import ROOT, params

SEQ_LEN, BATCH = 2048, 8  # the full run's windows and batch
QUICK_SEQ_LEN, QUICK_BATCH = 512, 4  # --quick: a few CPU minutes buy a few hundred steps of 2,048 bytes each
LR, LR_END = 2e-3, 1e-4
QUICK_BUDGET_S, BUDGET_S = 90, 600  # CPU seconds of training per model
BODY = dict(quantization="bytes", embedding="learned", hidden_size=64, lru_width=64, num_gate_blocks=8,
            pooling_groups=64, dropout=0.0)
POOLED = dict(BODY, pooling_factors=[2, 4, 4], layers_per_level=1)
FLAT = dict(BODY, pooling_factors=[], layers_per_level=7)  # the same 7 pairs: 3 levels x (down + up) + 1 inner
LENGTHS = (1024, 4096, 16384, 65536)
STEP_LIMIT_S = 120  # a length whose step would take longer than this (extrapolated) is left out


def build_corpus(root: Path) -> Path:
    """train/, validation/, test/ folders of the standard library's top-level `.py` files (in name order, every 20th
    to test and the one after it to validation) and pydoc's topics (train)."""
    if (root / ".done").exists():
        return root
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if p.is_file())
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, path in enumerate(files):
        split = "test" if i % 20 == 0 else "validation" if i % 20 == 1 else "train"
        (tmp / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp / split / path.name)
    topics = lib / "pydoc_data" / "topics.py"
    if topics.is_file():
        shutil.copy(topics, tmp / "train" / "pydoc_topics.py")
    (tmp / ".done").touch()
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def gpt2(layers: int, length: int):
    """A GPT-2 for windows of `length` bytes after the start byte (`length + 1` positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=length + 1,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=None, attn_implementation="sdpa"))


def models(seq_len: int) -> dict:
    """name -> build(length): a fresh model. GPT-2's layers are chosen to match the Poolformer's size at the training
    length `seq_len` (its position table included: seq_len x 64 weights); for longer windows only that table grows."""
    target = params(PoolformerForCausalLM(PoolformerConfig(**POOLED)))
    layers = min(range(1, 13), key=lambda n: abs(params(gpt2(n, seq_len)) - target))
    return {"Poolformer [2, 4, 4]": lambda length=seq_len: PoolformerForCausalLM(PoolformerConfig(**POOLED)),
            "Poolformer, no pooling": lambda length=seq_len: PoolformerForCausalLM(PoolformerConfig(**FLAT)),
            f"GPT-2 ({layers} layers)": lambda length=seq_len: gpt2(layers, max(length, seq_len))}


def collate(items):
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


@torch.no_grad()
def held_out_bits(model, batches) -> float:
    """Bits per predicted byte over `batches` (total NLL / count, every window from its start byte)."""
    model.eval()
    nats = count = 0.0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                                reduction="sum")
        nats += float(nll)
        count += float((targets != -100).sum())
    model.train()
    return nats_to_bits(nats) / count


def train_for(name, model, train_set, val_batches, budget_s, batch_size):
    """AdamW on random training windows until `budget_s` CPU seconds of training steps (evaluations not counted);
    warm-up over 50 steps, then a cosine in CPU time from 2e-3 to 1e-4 at the deadline, so every model anneals by
    its deadline however many steps it fits in."""
    torch.set_num_threads(1)  # held for every model, whatever the code before it set
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    curve, step, trained, wall, next_eval = [], 0, 0.0, 0.0, 0.0
    model.train()
    while trained < budget_s:
        if trained >= next_eval:
            curve.append((step, trained, held_out_bits(model, val_batches)))
            next_eval += budget_s / 4
        order = torch.randint(len(train_set), (batch_size,), generator=generator)
        batch = collate([train_set[int(i)] for i in order])
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, trained / budget_s)))
        for group in opt.param_groups:
            group["lr"] = min(1.0, (step + 1) / 50) * (LR_END + (LR - LR_END) * cosine)
        cpu, start = time.process_time(), time.perf_counter()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 200.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trained += time.process_time() - cpu
        wall += time.perf_counter() - start
        step += 1
    curve.append((step, trained, held_out_bits(model, val_batches)))
    print(f"  {name}: {step} steps in {trained:.0f} CPU s ({wall:.0f} s wall), validation {curve[-1][2]:.3f} bits/byte",
          flush=True)
    return curve, wall


def step_cost(build, length: int) -> dict:
    """CPU and wall seconds of one training step (B = 1, forward + backward) at `length` bytes, after one untimed."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build(length)
    ids = torch.randint(0, 256, (1, length))
    model(input_ids=ids, labels=ids).loss.backward()
    cpu, start = time.process_time(), time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - start}


def cost_vs_length(seq_len: int) -> list:
    rows = []
    for name, build in models(seq_len).items():
        previous = None
        for length in LENGTHS:
            growth = 16 if name.startswith("GPT-2") else 4  # attention's cost grows with the square of the length
            if previous is not None and previous["cpu_s"] * growth > STEP_LIMIT_S:
                rows.append({"model": name, "length": length, "skipped": f"over {STEP_LIMIT_S} s (extrapolated)"})
                continue
            previous = step_cost(build, length)
            rows.append({"model": name, "length": length, **previous,
                         "cpu_us_per_byte": 1e6 * previous["cpu_s"] / length})
            print(f"  {name} at {length}: {previous['cpu_s']:.2f} CPU s", flush=True)
    return rows


def bench_bytes(quick: bool) -> dict:
    seq_len, batch = (QUICK_SEQ_LEN, QUICK_BATCH) if quick else (SEQ_LEN, BATCH)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU seconds that are compute, whatever else runs on the machine
    numba_threads = _numba_threads(1)  # the numba scan's own thread pool too
    try:
        return _bench_bytes(quick, seq_len, batch)
    finally:
        torch.set_num_threads(threads)
        _numba_threads(numba_threads)


def _numba_threads(count):
    try:
        import numba
    except ImportError:
        return None
    previous = numba.get_num_threads()
    if count is not None:
        numba.set_num_threads(count)
    return previous


def _bench_bytes(quick: bool, seq_len: int, batch: int) -> dict:
    budget = QUICK_BUDGET_S if quick else BUDGET_S
    root = build_corpus(ROOT / "benchmarks" / "data_cache" / f"stdlib_bytes_py{sys.version_info[0]}{sys.version_info[1]}")
    config = PoolformerConfig(**POOLED)
    args = DataArguments(dataset=str(root), seq_len=seq_len, cache_dir=str(ROOT / "benchmarks" / "data_cache"))
    _, spec, sets = build_datasets(args, config)
    val_count = 16 if quick else 32
    val_batches = [collate([sets["validation"][i] for i in range(s, min(s + batch, val_count))])
                   for s in range(0, val_count, batch)]
    test_count = 128 if quick else len(sets["test"])
    test_items = [sets["test"][i] for i in range(test_count)]
    test_batches = [collate(test_items[s : s + batch]) for s in range(0, len(test_items), batch)]
    compressors = compressor_bits([item_bytes(item) for item in test_items])
    rows, curves = [], {}
    for name, build in models(seq_len).items():
        torch.manual_seed(0)
        model = build()
        curves[name], wall = train_for(name, model, sets["train"], val_batches, budget, batch)
        steps, seconds, _ = curves[name][-1]
        bits = held_out_bits(model, test_batches)
        rows.append({"model": name, "params": params(model), "steps": steps, "train_cpu_s": seconds, "train_wall_s": wall,
                     "bits_per_byte": bits, "vs_xz_per_window": bits / compressors["xz"]["per_window"]})
    return {"budget_cpu_s": budget, "seq_len": seq_len, "batch": batch, "rows": rows, "curves": curves,
            "compressors": compressors, "test_windows": len(test_items), "train_bytes": sets["train"].num_bytes,
            "corpus": f"Python {sys.version.split()[0]} standard library: top-level modules + pydoc topics",
            "cost": cost_vs_length(seq_len), "threads": 1}


def markdown(b: dict) -> list:
    """Section 9's tables for `results.md`."""
    c = b["compressors"]
    lines = [f"**9. Bytes: bits per byte against xz** ({b['corpus']}; {b['train_bytes'] / 1e6:.1f} MB of training "
             f"bytes; held out: {b['test_windows']} windows of {b['seq_len']} bytes, {c['bytes']:,} bytes, never "
             f"trained on; each model trained for {b['budget_cpu_s']} CPU seconds, batch {b['batch']}, "
             f"{b['threads']} threads)", "",
             "| coder | params | steps | CPU s | wall s | bits/byte | vs xz -9e per window |", "|---|---|---|---|---|---|---|"]
    for name in ("xz", "bz2", "gzip"):
        lines.append(f"| {LABELS[name]}, each window alone | - | - | - | - | {c[name]['per_window']:.3f} | "
                     f"{c[name]['per_window'] / c['xz']['per_window']:.3f} |")
    for name in ("xz", "bz2", "gzip"):
        lines.append(f"| {LABELS[name]}, the held-out text as one stream | - | - | - | - | {c[name]['whole']:.3f} | "
                     f"{c[name]['whole'] / c['xz']['per_window']:.3f} |")
    for r in b["rows"]:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['train_cpu_s']:.0f} | "
                     f"{r['train_wall_s']:.0f} | **{r['bits_per_byte']:.3f}** | {r['vs_xz_per_window']:.3f} |")
    lines += ["", "One training step vs window length (B = 1, forward + backward, CPU seconds; in brackets per byte)", "",
              "| model | " + " | ".join(f"{n // 1024}k" for n in LENGTHS) + " |", "|---" * (len(LENGTHS) + 1) + "|"]
    for name in dict.fromkeys(r["model"] for r in b["cost"]):
        cells = []
        for r in (r for r in b["cost"] if r["model"] == name):
            cells.append("-" if "skipped" in r else f"{r['cpu_s']:.2f} ({r['cpu_us_per_byte']:.0f} us)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]
