"""The GPU figures that a few minutes on one GPU afford, in one process (after `python -m pytest -m gpu`), by
section, run in the order `--only` gives (the default's: the targets' figures first, so that a run stopped at its
time limit has them):

- scan: section 1's scan against the copy bound at batch 4 and 32, and the fused RG-LRU of an sc09 layer at the
  thesis batch against its kernels' least traffic, at each launch shape of `bench_scan.LAUNCH_SHAPES`;
- train: section 8's thesis-batch rows (batch 32, T = 16,000, bf16 autocast), eager: the default fused path, GPT-2
  with flash attention at the same tokens per batch, the no-pooling ablation;
- profile: one fused training step, where the time goes by kernel;
- compile: what compiling buys (block by block, whole, with CUDA graphs; GPT-2; the ablation), and the composite of
  torch ops (the "before");
- generate: table 4b's generation rows (batch 1, 64, 512) with CUDA graphs;
- crossover: GPT-2 against Poolformer at 512k tokens per batch for T = 4k .. 64k.

    python -m benchmarks.gpu_probe [--out benchmarks/results] [--only scan,train,profile,compile,generate,crossover]
        [--new_tokens 1600]

Each figure is appended to `<out>/gpu_probe.jsonl` as soon as it is measured, so that a run stopped at its time limit
keeps what it finished; an error is recorded in place of its figure. The sections share one inductor cache."""

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from modeling_poolformer import rglru

from .bench_scan import bench_fused_rglru, bench_scan
from .bench_train import COMPILE_MODES, _cuda_row, profile_step
from .common import ROOT, SC09, build_model, poolformer

SECTIONS = ("scan", "train", "profile", "compile", "generate", "crossover")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--only", default=",".join(SECTIONS), help="sections, run in the order given")
    p.add_argument("--new_tokens", type=int, default=1600, help="tokens generated per timed call")
    args = p.parse_args()
    unknown = [name for name in args.only.split(",") if name not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown sections {unknown}; the sections are {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe.py needs a CUDA device; `python -m benchmarks.run` measures the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "gpu_probe.jsonl").open("a")
    device = torch.cuda.get_device_name()
    triton_version = getattr(rglru.triton, "__version__", None)  # None: no Triton

    def record(name, measure):
        start = time.perf_counter()
        try:
            value = measure()
        except Exception as e:  # one failed figure must not cost the others
            value = {"error": repr(e)[:400], "trace": traceback.format_exc()[-1500:]}
        line = json.dumps({"name": name, "device": device, "torch": torch.__version__, "triton": triton_version,
                           "value": value, "seconds": round(time.perf_counter() - start, 1)}, default=str)
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    def scan():
        record("scan B=4 T=16000", lambda: bench_scan(False))
        record("scan B=32 T=16000", lambda: bench_scan(False, batch=32, reference=False, fused=False))
        record("fused RG-LRU B=32 T=16000", lambda: bench_fused_rglru(32, 16000, sweep=True))

    def train_row(name, fused, compile):
        if name == "GPT-2":
            record(f"train GPT-2 {COMPILE_MODES[compile]} B=32 T=16384",
                   lambda: _cuda_row(lambda: build_model("GPT-2", 16384)[0], 32, 16384, compile))
        else:
            path = ROOT / "hub_configs" / name
            record(f"train {name} {'fused' if fused else 'composite'} {COMPILE_MODES[compile]} B=32 T=16000",
                   lambda: _cuda_row(lambda: poolformer(path, dropout=0.0, fused_rglru=fused), 32, 16000, compile))

    def train():  # the targets' figures, eager: the default path (fused RG-LRU and blocks), the peer, the ablation
        for row in (("sc09", True, False), ("GPT-2", None, False), ("sc09-no-pooling", True, False)):
            train_row(*row)

    def profile():
        record("profile sc09 fused eager B=32 T=16000", lambda: profile_step(poolformer(SC09, dropout=0.0), 32, 16000))

    def compiled():  # what compiling buys (minutes per compile), then the composite of torch ops (the "before")
        for row in (("sc09", True, "blocks"), ("sc09", True, True), ("sc09", True, "graphs"), ("GPT-2", None, True),
                    ("sc09-no-pooling", True, True), ("sc09", False, False)):
            train_row(*row)

    def generate():
        from transformers import GenerationConfig

        from .bench_generate import cuda_generation_row

        torch.manual_seed(0)
        model = build_model("Poolformer sc09", args.new_tokens + 1)[0].to("cuda").eval()
        model.generation_config = GenerationConfig.from_pretrained(SC09)
        for batch in (1, 64, 512):
            record(f"generate B={batch}", lambda: cuda_generation_row(model, batch, args.new_tokens, 240))

    def crossover():  # the attention peer against Poolformer at 512k tokens per batch, T = 4k .. 64k
        for length in (4096, 8192, 16384, 32768, 65536):
            batch = max(1, 32 * 16384 // length)
            record(f"crossover GPT-2 T={length} B={batch}",
                   lambda: _cuda_row(lambda: build_model("GPT-2", length)[0], batch, length))
            record(f"crossover Poolformer sc09 T={length} B={batch}",
                   lambda: _cuda_row(lambda: poolformer(SC09, dropout=0.0), batch, length))

    sections = {"scan": scan, "train": train, "profile": profile, "compile": compiled, "generate": generate,
                "crossover": crossover}
    for name in args.only.split(","):
        sections[name]()

if __name__ == "__main__":
    main()
