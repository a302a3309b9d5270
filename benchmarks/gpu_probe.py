"""The GPU figures that a few minutes on one GPU afford, in one process (after `python -m pytest -m gpu`):
section 1's scan against the copy bound; section 8's thesis-batch training rows (batch 32, T = 16,000, bf16
autocast): the default fused path eager and compiled three ways, the composite, the no-pooling ablation, GPT-2 with
flash attention at the same tokens per batch; a profile of one fused training step (where the time goes, by kernel);
table 4b's generation rows (batch 1, 64, 512) with CUDA graphs; and GPT-2 against Poolformer at 512k tokens per
batch for T = 4k .. 64k. Sections run in that order, sharing one inductor cache.

    python -m benchmarks.gpu_probe [--out benchmarks/results] [--only scan,train,profile,generate,crossover]
        [--new_tokens 1600]

Each figure is appended to `<out>/gpu_probe.jsonl` as soon as it is measured, so that a run stopped at its time limit
keeps what it finished; an error is recorded in place of its figure."""

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from .bench_scan import bench_scan
from .bench_train import COMPILE_MODES, _cuda_row, profile_step
from .common import ROOT, SC09, build_model, poolformer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--only", default="scan,train,profile,generate,crossover")
    p.add_argument("--new_tokens", type=int, default=1600, help="tokens generated per timed call")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe.py needs a CUDA device; `python -m benchmarks.run` measures the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "gpu_probe.jsonl").open("a")
    device = torch.cuda.get_device_name()

    def record(name, measure):
        start = time.perf_counter()
        try:
            value = measure()
        except Exception as e:  # one failed figure must not cost the others
            value = {"error": repr(e)[:400], "trace": traceback.format_exc()[-1500:]}
        line = json.dumps({"name": name, "device": device, "torch": torch.__version__, "value": value,
                           "seconds": round(time.perf_counter() - start, 1)}, default=str)
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    only = args.only.split(",")
    if "scan" in only:
        record("scan B=4 T=16000", lambda: bench_scan(False))
    if "train" in only:
        # the default path first (the fused RG-LRU and residual blocks), then what compiling it buys, then the
        # composite of torch ops and the no-pooling ablation, and the attention peer eager and compiled
        for name, fused, compile in (("sc09", True, False), ("sc09", True, True), ("sc09", True, "graphs"),
                                     ("sc09", True, "blocks"), ("sc09", False, False), ("sc09-no-pooling", True, False),
                                     ("sc09-no-pooling", True, True)):
            path = ROOT / "hub_configs" / name
            record(f"train {name} {'fused' if fused else 'composite'} {COMPILE_MODES[compile]} B=32 T=16000",
                   lambda: _cuda_row(lambda: poolformer(path, dropout=0.0, fused_rglru=fused), 32, 16000, compile))
        for compile in (False, True):
            record(f"train GPT-2 {COMPILE_MODES[compile]} B=32 T=16384",
                   lambda: _cuda_row(lambda: build_model("GPT-2", 16384)[0], 32, 16384, compile))
    if "profile" in only:
        record("profile sc09 fused eager B=32 T=16000", lambda: profile_step(poolformer(SC09, dropout=0.0), 32, 16000))
    if "crossover" in only:  # the attention peer against Poolformer at 512k tokens per batch, T = 4k .. 64k
        for length in (4096, 8192, 16384, 32768, 65536):
            batch = max(1, 32 * 16384 // length)
            record(f"crossover GPT-2 T={length} B={batch}",
                   lambda: _cuda_row(lambda: build_model("GPT-2", length)[0], batch, length))
            record(f"crossover Poolformer sc09 T={length} B={batch}",
                   lambda: _cuda_row(lambda: poolformer(SC09, dropout=0.0), batch, length))
    if "generate" in only:
        from transformers import GenerationConfig

        from .bench_generate import cuda_generation_row

        torch.manual_seed(0)
        model = build_model("Poolformer sc09", args.new_tokens + 1)[0].to("cuda").eval()
        model.generation_config = GenerationConfig.from_pretrained(SC09)
        for batch in (1, 64, 512):
            record(f"generate B={batch}", lambda: cuda_generation_row(model, batch, args.new_tokens, 240))


if __name__ == "__main__":
    main()
