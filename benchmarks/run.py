"""Poolformer benchmarks, every comparison measured side by side in one run on this machine.

    python -m benchmarks.run [--quick] [--out benchmarks/results] [--only scan,train,peers,generate,length,data,pcm16,traffic,bytes]

Writes `<out>/results.md` (the tables) and `<out>/results.json`; sections left out of `--only` keep the results an
earlier run wrote there. Sections:
1. scan: RG-LRU scan forward + backward (B=4, T=16000, 128 complex units) per implementation, against a memcpy of
   the bytes the scan must move (read a, u, write h; read dL/dh, a, h, write dL/da, dL/du); and the fused RG-LRU
   of an sc09 layer against its kernels' least traffic, beside the composite of torch ops it replaces;
2. train: training tokens/s of the SC09 config vs its no-pooling ablation (T=16000), eager and under
   `torch.compile` (the scan is one opaque custom op in the graph);
3. peers: training tokens/s vs transformers' MambaForCausalLM, RecurrentGemmaForCausalLM and a GPT-2, parameter
   counts matched within 10%, same T and batch;
4. generate: generation samples/s at batch 1, 16, 64: the plain eager loop of `model(token, cache=cache)`
   calls vs `generate` with eager steps vs `generate` with the compiled step (its first call, with an empty inductor
   cache, timed apart), and the peers' `generate` (batch 1, 16); on a CUDA device also batch 1, 64, 512 with one
   CUDA graph per kind of step (over the eager kernels, and over the compiled stacks: the default) against the
   eager loop, with the first call (compile + capture) timed apart (`--only generate` runs just this section);
5. length: time and peak memory of one training step as T grows (B=1, checkpointing on), with the
   transformer beside it until it runs out of memory or time;
6. data: start-up (cold and cached index) and peak RSS for 1,000 and 20,000 files; train.py's peak RssAnon and
   RssFile (training process and its children, sampled from /proc) on parquet folders of 6,000 to 90,000 clips
   (`--data_clips`), cold, warm and streamed; a 1-s window of a 1-hour file vs a 1-s file, loader tokens/s (0 and
   4 workers, map-style and streamed) next to the SC09 model's training tokens/s, and the targets met (synthetic
   data under benchmarks/data_cache/);
7. pcm16: 16-bit speech (espeak-ng, 16 kHz) coded losslessly: held-out bits per 16-bit sample of a 16-bit
   Poolformer (dual softmax), of the same body on byte tokens (two per sample) and of an 8-bit mu-law model (its
   NLL plus the log2 width of its mu-law bins: the cost of the 16-bit sample), each trained for the same seconds,
   against FLAC at its best compression on the same clips; the learning curves go to `<out>/pcm16_curve.png`.
8. traffic: what a training step of sc09 and sc09-no-pooling moves, with the fused RG-LRU operator and with the
   composite of torch ops it replaces (bf16 autocast, B=1, T=4000): bytes saved for the backward and bytes written per
   token, ops per step, where the bytes go, CPU training tokens/s; on a CUDA machine also batch 32 at T=16000 (tokens/s,
   peak memory, SC09 epochs/h) and GPT-2 across T = 4k .. 64k.
9. bytes: byte models on the Python standard library's own text (built offline): held-out bits/byte of a Poolformer,
   its no-pooling ablation and a GPT-2 of equal size, each trained for the same CPU seconds, against gzip -9, bz2 -9
   and xz -9e on the same windows (each alone, and the whole); one training step's cost at 1k .. 64k bytes.

On a CUDA machine every section runs on the GPU, with the GPU's sizes: the scan compares the Triton kernel with the
chunked torch scan; training runs under bf16 autocast (the recurrence stays fp32) at T=16000 for all models, with
Mamba on the `mamba-ssm`/`causal-conv1d` CUDA kernels and GPT-2 on flash attention (`flash-attn`) or SDPA when
those packages are installed (the tables say which ran); peak memory is `torch.cuda.max_memory_allocated`. The
one command is

    pip install -e ".[train]" && pip install mamba-ssm causal-conv1d flash-attn --no-build-isolation
    python -m benchmarks.run --out benchmarks/results-gpu
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from training.utils import tune_cpu_allocator

from .bench_bytes import bench_bytes
from .bench_data import bench_data
from .bench_generate import bench_generate
from .bench_length import bench_length
from .bench_pcm16 import bench_pcm16
from .bench_scan import bench_scan
from .bench_train import bench_peers, bench_traffic, bench_train
from .common import DEVICE, ROOT
from .report import markdown


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes: minutes instead of an hour on 2 CPU cores")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--only", default="scan,train,peers,generate,length")
    p.add_argument("--data_clips", default=None, help="section 6's parquet sizes for train.py's memory, e.g. "
                   "6000,30000 (default: 6000,30000,90000; --quick: 6000)")
    args = p.parse_args()
    tune_cpu_allocator()  # train.py's CPU setting, for every model alike
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    results = {"machine": {"device": device, "gpu": DEVICE == "cuda", "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"), "quick": args.quick}}
    sections = {"scan": bench_scan, "train": bench_train, "peers": bench_peers, "generate": bench_generate,
                "length": bench_length, "traffic": bench_traffic,
                "data": lambda quick: bench_data(quick, args.data_clips and [int(n) for n in args.data_clips.split(",")])}
    out = Path(args.out)
    sections["pcm16"] = lambda quick: bench_pcm16(quick, out)
    sections["bytes"] = bench_bytes
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").is_file():  # sections not run this time keep their earlier results
        earlier = json.loads((out / "results.json").read_text())
        results = {**{k: v for k, v in earlier.items() if k != "machine"}, **results}
    for name in args.only.split(","):
        print(f"[{name}]", flush=True)
        start = time.time()
        results[name] = sections[name](args.quick)
        results[name]["wall_s"] = time.time() - start
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # keep finished sections
        (out / "results.md").write_text(markdown(results) + "\n")
        print(markdown({"machine": results["machine"], name: results[name]}).split("\n", 2)[2], flush=True)
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
