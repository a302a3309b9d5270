"""Generation speed of the SC09 config on this machine, measured side by side in one process: the plain eager loop
of `model(token, cache=cache)` calls, `generate` with eager steps, `generate` with the compiled step, and
re-running the full forward for every sample; for each batch size with each intra-op thread count (what
`generate`'s default thread count rests on). On a CUDA device it then measures the GPU at batch 1, 64, 512: the eager
loop against `generate` with one CUDA graph per kind of step (over the eager kernels, and over the compiled stacks:
the default), with the first call (compile + capture) timed apart, against the targets (`--cuda_only` skips the CPU
part):

    python -m benchmarks.generation [--new_tokens 640] [--batch_sizes 1 16 64] [--threads 1 2] [--json out.json]
    python -m benchmarks.generation --cuda_only [--cuda_new_tokens 4800] [--cuda_batch_sizes 1 64 512]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM

# sections beside this script (its folder is on sys.path)
from .bench_generate import CUDA_TARGETS, REALTIME, cuda_generation_row, eager_loop


def amortised_blocks(config):
    """Residual blocks run per generated sample: level l runs once every prod(P[:l]) samples."""
    layers, factors, per_sample, every = config.level_layers, config.pooling_factors, 0.0, 1
    for level, pairs in enumerate(layers):
        blocks = 2 * pairs if level == len(factors) else 4 * pairs  # a SkipBlock has down and up blocks
        per_sample += blocks / every
        if level < len(factors):
            every *= factors[level]
    total = sum(4 * p for p in layers[:-1]) + 2 * layers[-1]
    return per_sample, total


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def full_forward_rollout(model, batch, steps):
    seq = torch.full((batch, 1), 128)
    for _ in range(steps):
        probs = torch.softmax(model(seq).logits[:, -1].float(), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1)], 1)
    return seq


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "hub_configs" / "sc09"))
    p.add_argument("--new_tokens", type=int, default=640)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--full_forward_tokens", type=int, default=160, help="the full-forward baseline is O(T^2)")
    p.add_argument("--cuda_only", action="store_true", help="only the CUDA part")
    p.add_argument("--cuda_new_tokens", type=int, default=4800)
    p.add_argument("--cuda_batch_sizes", type=int, nargs="+", default=list(CUDA_TARGETS))
    p.add_argument("--json")
    args = p.parse_args()
    if args.cuda_only:
        rows = cuda_part(args)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(cuda_rows=rows), indent=2))
        return

    torch.manual_seed(0)
    config = PoolformerConfig.from_pretrained(args.config)
    model = PoolformerForCausalLM(config).eval()
    per_sample, total = amortised_blocks(config)
    print(f"config {Path(args.config).name}: {total} residual blocks; amortised {per_sample:.2f} blocks per sample "
          f"({100 * per_sample / total:.1f}% of the stack)")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; {args.new_tokens} new "
          "samples from the zero token; samples/s summed over the batch\n")
    compiled = dict(compile_config=CompileConfig())
    start = time.perf_counter()
    model.generate(max_new_tokens=8, num_threads=1, **compiled)
    print(f"first compiled call: {time.perf_counter() - start:.1f} s\n")
    print("| batch | threads | eager loop | generate, eager | generate, compiled | full forward each step | "
          "compiled / loop |")
    print("|---|---|---|---|---|---|---|")
    rows, n = [], args.new_tokens
    for batch in args.batch_sizes:
        bos = torch.full((batch, 1), 128)
        for threads in args.threads:
            torch.set_num_threads(threads)
            model.generate(bos, max_new_tokens=8, num_threads=threads, **compiled)  # this batch's graphs
            row = dict(batch=batch, threads=threads)
            row["eager_loop"] = batch * n / timed(lambda: eager_loop(model, batch, n))
            row["generate_eager"] = batch * n / timed(lambda: model.generate(bos, max_new_tokens=n, num_threads=threads,
                                                                             disable_compile=True))
            row["generate_compiled"] = batch * n / timed(lambda: model.generate(bos, max_new_tokens=n,
                                                                                num_threads=threads, **compiled))
            m = args.full_forward_tokens
            row["full_forward"] = batch * m / timed(lambda: full_forward_rollout(model, batch, m))
            row["compiled_over_loop"] = row["generate_compiled"] / row["eager_loop"]
            rows.append(row)
            print(f"| {batch} | {threads} | {row['eager_loop']:.0f} | {row['generate_eager']:.0f} | "
                  f"{row['generate_compiled']:.0f} | {row['full_forward']:.0f} ({m} samples) | "
                  f"{row['compiled_over_loop']:.2f}x |", flush=True)
    cuda_rows = cuda_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(amortised_blocks=per_sample, total_blocks=total, rows=rows,
                                                   cuda_rows=cuda_rows), indent=2))


def cuda_part(args) -> list:
    """The GPU table (one process: later batch sizes find the earlier compilations in inductor's cache)."""
    if not torch.cuda.is_available():
        print("\nCUDA part skipped: no CUDA device")
        return []
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model = PoolformerForCausalLM(PoolformerConfig.from_pretrained(args.config)).to("cuda").eval()
    model.generation_config = GenerationConfig.from_pretrained(args.config)  # sampling at temperature 1
    print(f"\n{torch.cuda.get_device_name()}: {args.cuda_new_tokens} new samples per row, samples/s summed over the "
          f"batch; real time = {REALTIME} samples/s\n")
    print("| batch | eager loop | graphs, eager kernels | graphs, compiled stacks | graphs / loop | x real time | "
          "first call (s) | target | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for batch in args.cuda_batch_sizes:
        r = cuda_generation_row(model, batch, args.cuda_new_tokens, loop_tokens=min(args.cuda_new_tokens, 480))
        rows.append(r)
        print(f"| {batch} | {r['eager_loop']:.0f} | {r['graphs_eager_kernels']:.0f} | {r['graphs_compiled']:.0f} | "
              f"{r['graphs_over_loop']:.1f}x | {r['x_realtime']:.2f} | {r['graphs_compiled_first_s']:.1f} | "
              f"{r['target']:,} | {'yes' if r['met'] else 'no'} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
