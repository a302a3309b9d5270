"""Generation speed of the SC09 config on this machine, measured side by side in one run:
fast path (`model.generate`) vs transformers' generic generate vs re-running the full forward every step.

    python benchmarks/generation.py [--new-tokens 320] [--batch-sizes 1 16] [--json out.json]
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM  # noqa: E402


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
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "hub_configs" / "sc09"))
    p.add_argument("--new-tokens", type=int, default=320)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--json")
    args = p.parse_args()

    config = PoolformerConfig.from_pretrained(args.config)
    model = PoolformerForCausalLM(config).eval()
    per_sample, total = amortised_blocks(config)
    print(f"config {Path(args.config).name}: {total} residual blocks; amortised {per_sample:.2f} blocks per sample "
          f"({100 * per_sample / total:.1f}% of the stack)")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.new_tokens} new tokens from the zero token\n")
    model.generate(max_new_tokens=8)  # warm-up
    results = []
    print("| batch | fast generate (tok/s) | generic generate (tok/s) | full forward each step (tok/s) | fast / generic | fast / full |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        n = args.new_tokens
        fast = timed(lambda: model.generate(max_new_tokens=n, num_return_sequences=batch))
        generic = timed(lambda: super(PoolformerForCausalLM, model).generate(
            max_new_tokens=n, num_return_sequences=batch, do_sample=True, top_k=0))
        full = timed(lambda: full_forward_rollout(model, batch, n))
        row = dict(batch=batch, new_tokens=n, fast_tok_s=batch * n / fast, generic_tok_s=batch * n / generic,
                   full_forward_tok_s=batch * n / full)
        row["fast_over_generic"] = row["fast_tok_s"] / row["generic_tok_s"]
        row["fast_over_full"] = row["fast_tok_s"] / row["full_forward_tok_s"]
        results.append(row)
        print(f"| {batch} | {row['fast_tok_s']:.0f} | {row['generic_tok_s']:.0f} | {row['full_forward_tok_s']:.0f} | "
              f"{row['fast_over_generic']:.2f}x | {row['fast_over_full']:.1f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(amortised_blocks=per_sample, total_blocks=total, rows=results), indent=2))


if __name__ == "__main__":
    main()
