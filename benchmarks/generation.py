"""Generation speed of the SC09 config on this machine, measured side by side in one process: the plain eager loop
of `model(token, cache=cache)` calls, `generate` with eager steps, `generate` with the compiled step, and
re-running the full forward for every sample; for each batch size with each intra-op thread count (what
`generate`'s default thread count rests on).

    python benchmarks/generation.py [--new_tokens 640] [--batch_sizes 1 16 64] [--threads 1 2] [--json out.json]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import CompileConfig

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM

from bench_generate import eager_loop  # a section beside this script (its folder is on sys.path)


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
    p.add_argument("--json")
    args = p.parse_args()

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
    if args.json:
        Path(args.json).write_text(json.dumps(dict(amortised_blocks=per_sample, total_blocks=total, rows=rows), indent=2))


if __name__ == "__main__":
    main()
