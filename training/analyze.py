"""Depth analysis of the RG-LRU decays: do deep (pooled) layers learn slow decays (|a| near 1) and shallow layers
fast ones? Prints per-block statistics of |a| and writes the thesis-style plot of |a| against depth.

    python training/analyze.py --model DIR_OR_REPO [--dataset ... --split validation --num_clips 8] --out decay.png

|a| at r = 1 is exp(-c softplus(Lambda)) per recurrent unit (the slowest decay the gate allows); on data,
|a_t| = exp(-c r_t softplus(Lambda)) with the recurrence-gate values r_t the model produces on real clips.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from training.data import DataArguments, build_datasets
from training.utils import check_local_or_hub, parse_arguments


def rglru_blocks(model):
    """[(name, level, module)] of every RG-LRU in forward order; level 0 is the full-rate level."""
    blocks = []
    for name, module in model.named_modules():
        if hasattr(module, "recurrence_param") and hasattr(module, "recurrence_gate"):
            blocks.append((name, name.count(".inner"), module))
    return blocks


def quartiles(x):
    x = x.flatten().float()
    if x.numel() > 1_000_000:  # quantile() has a size limit; a fixed subsample is plenty
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75]))
    return {"q1": q[0].item(), "median": q[1].item(), "q3": q[2].item()}


@torch.no_grad()
def analyze(model, batches):
    blocks = rglru_blocks(model)
    seen = {name: [] for name, _, _ in blocks}
    hooks = []
    for name, _, module in blocks:
        # |a_t| from the input projection's output x, which both the fused operator and the composite read (the
        # fused one computes the gates inside its kernel, so no hook on the gate itself would fire)
        def hook(proj, inputs, x, name=name, lru=module):
            rate = F.softplus(lru.recurrence_param.float())
            r = torch.sigmoid(lru.recurrence_gate(x.float()))  # the gate casts its weights to x's dtype
            seen[name].append(torch.exp(-lru.scale * r * rate))
        hooks.append(module.input_proj.register_forward_hook(hook))
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    stats = []
    for name, level, module in blocks:
        at_one = torch.exp(-module.scale * F.softplus(module.recurrence_param.float()))
        row = {"block": name, "level": level, "at_r1": quartiles(at_one)}
        if seen[name]:
            row["on_data"] = quartiles(torch.cat([s.flatten() for s in seen[name]]))
        stats.append(row)
    return stats


def plot(stats, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for key, color, offset in (("at_r1", "tab:blue", -0.12), ("on_data", "tab:orange", 0.12)):
        rows = [r for r in stats if key in r]
        if not rows:
            continue
        x = [r["level"] + offset for r in rows]
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["q1"] for m, r in zip(med, rows)], [r[key]["q3"] - m for m, r in zip(med, rows)]]
        ax.errorbar(x, med, yerr=err, fmt="o", color=color, alpha=0.8, capsize=3,
                    label="|a| at r = 1" if key == "at_r1" else "|a_t| on data")
    levels = sorted({r["level"] for r in stats})
    ax.set_xticks(levels)
    ax.set_xlabel("depth (pooling level; 0 = full rate)")
    ax.set_ylabel("|a| (median, quartiles per block)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class AnalyzeArguments:
    model: str = field(metadata={"help": "a saved model folder or a Hub repo id"})
    split: str = "validation"
    num_clips: int = field(default=8, metadata={"help": "clips run through the model for the gate values"})
    out: str = "decay_vs_depth.png"
    json: Optional[str] = field(default=None, metadata={"help": "also write the statistics here"})

    def __post_init__(self):
        check_local_or_hub(self.model, "--model")


def main(argv=None):
    args, data_args = parse_arguments((AnalyzeArguments, DataArguments), argv, __doc__)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
    _, _, datasets = build_datasets(data_args, model.config)
    data = datasets.get(args.split) or datasets["train"]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(min(args.num_clips, len(data)))),
                                         batch_size=4)
    stats = analyze(model, loader)
    print(f"{'block':45s} level   |a| at r=1 (q1 / median / q3)    |a_t| on data (q1 / median / q3)")
    for r in stats:
        one, dat = r["at_r1"], r.get("on_data")
        on_data = f"{dat['q1']:.4f} / {dat['median']:.4f} / {dat['q3']:.4f}" if dat else "-"
        print(f"{r['block']:45s} {r['level']:5d}   {one['q1']:.4f} / {one['median']:.4f} / {one['q3']:.4f}"
              f"         {on_data}")
    plot(stats, args.out, f"RG-LRU decay vs depth: {args.model}")
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
    print(f"wrote {args.out}")
    return stats


if __name__ == "__main__":
    main()
