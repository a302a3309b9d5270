"""What every benchmark section shares: the device, timing, sizes, the models compared (Poolformer and its
peers, matched in size) and running one measurement in a child process."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM

ROOT = Path(__file__).resolve().parent.parent
# each measurement that needs a fresh process runs `python -m benchmarks.child MODE ...` from the project root
CHILD = [sys.executable, "-m", "benchmarks.child"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SC09 = ROOT / "hub_configs" / "sc09"
# GPUs train in bf16 autocast (the recurrence stays fp32 inside), CPUs in fp32, every model alike
AUTOCAST = torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats=3, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def params(model):
    return sum(p.numel() for p in model.parameters())


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    """Peak GPU memory since `reset_peak` (NaN on CPU, where section 5 reads the process's peak RSS instead)."""
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")


def poolformer(path=SC09, **overrides):
    config = PoolformerConfig.from_pretrained(path, **overrides)
    return PoolformerForCausalLM(config)


def matched(build, target, choices):
    """The layer count in `choices` whose model size is closest to `target`."""
    best = min(choices, key=lambda n: abs(params(build(n)) - target))
    model = build(best)
    return model, best


def peers(target, length):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        MambaConfig,
        MambaForCausalLM,
        RecurrentGemmaConfig,
        RecurrentGemmaForCausalLM,
    )

    common = dict(vocab_size=256, bos_token_id=128, eos_token_id=None, pad_token_id=0)
    return {
        "MambaForCausalLM": lambda n: MambaForCausalLM(MambaConfig(hidden_size=256, num_hidden_layers=n, state_size=16,
                                                                   expand=2, **common)),
        "RecurrentGemmaForCausalLM": lambda n: RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
            hidden_size=256, lru_width=256, intermediate_size=1536, num_hidden_layers=n, num_attention_heads=4,
            attention_window_size=1024, **common)),
        "GPT-2": lambda n: GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=n, n_head=8, n_positions=max(length, 1024),
                                                      attn_implementation=attention_kernel(), **common)),
    }


def attention_kernel():
    """GPT-2's attention: flash attention on a GPU with `flash-attn` installed, else torch's SDPA."""
    import importlib.util

    return "flash_attention_2" if DEVICE == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def kernels(name):
    """Which kernels a model runs on, for the tables."""
    if name.startswith("Poolformer"):
        from modeling_poolformer.scan import resolve_scan_implementation

        return f"scan: {resolve_scan_implementation('auto', DEVICE)}"
    if name == "MambaForCausalLM":
        from transformers.models.mamba import modeling_mamba

        fast = DEVICE == "cuda" and getattr(modeling_mamba, "is_fast_path_available", False)
        return "mamba-ssm CUDA kernels" if fast else "torch (no mamba-ssm kernels)"
    if name == "GPT-2":
        return attention_kernel()
    return "torch"


def build_model(name, length):
    """A model by name, peers matched in size to the SC09 Poolformer (within 10%)."""
    if name == "Poolformer sc09":
        return poolformer(dropout=0.0), None
    target = params(poolformer())
    model, layers = matched(peers(target, length)[name], target, range(2, 25))
    assert abs(params(model) - target) <= 0.1 * target, (name, params(model))
    return model, layers


def run_child(args, timeout):
    try:
        proc = subprocess.run([*CHILD, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:  # a row, not the end of the run
        return {"error": f"over {timeout} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][-200:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
