"""2-3. Training throughput: the SC09 model vs its no-pooling ablation (eager and compiled), and vs
transformers' recurrent and attention peers of matched size, each in its own process."""

import json

import torch

from training.utils import tune_cpu_allocator

from common import (
    AUTOCAST,
    DEVICE,
    ROOT,
    SC09,
    best_of,
    build_model,
    kernels,
    params,
    peak_gb,
    poolformer,
    reset_peak,
    run_child,
)


def train_tokens_per_s(model, batch, length, repeats=2, compile=False):
    """(tokens/s, step seconds, peak GB) of full training steps (forward, backward, AdamW), after a warm-up step
    (which compiles, with `compile`)."""
    model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (batch, length), device=DEVICE)
    forward = torch.compile(model) if compile else model

    def step():
        with AUTOCAST:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    t = best_of(step, repeats=repeats)
    peak = peak_gb()
    model.to("cpu")
    return batch * length / t, t, peak


def bench_train(quick):
    length = 4000 if quick else 16000
    batch = 8 if DEVICE == "cuda" else 1
    rows = []
    for name, path in (("sc09 (pooling [2,4,4,5])", SC09), ("sc09-no-pooling", ROOT / "hub_configs" / "sc09-no-pooling")):
        for compile in (False, True):
            model = poolformer(path, dropout=0.0)
            tps, t, peak = train_tokens_per_s(model, batch, length, compile=compile)
            rows.append({"model": name, "compiled": compile, "params": params(model), "tokens_per_s": tps,
                         "step_s": t, "peak_gb": peak})
            torch._dynamo.reset()
    eager = [r for r in rows if not r["compiled"]]
    best = [max(r["tokens_per_s"] for r in rows if r["model"] == m) for m in (eager[0]["model"], eager[1]["model"])]
    return {"batch": batch, "length": length, "rows": rows,
            "speedup_vs_no_pooling": eager[0]["tokens_per_s"] / eager[1]["tokens_per_s"],
            "speedup_vs_no_pooling_best": best[0] / best[1]}


def child_train(name, length, batch):
    """Child process: training tokens/s of one model (a fresh process per model keeps memory apart)."""
    tune_cpu_allocator()  # train.py's CPU setting, for every model alike
    model, layers = build_model(name, length)
    repeats = 2 if name == "Poolformer sc09" or DEVICE == "cuda" else 1
    tps, t, peak = train_tokens_per_s(model, batch, length, repeats=repeats)
    label = name if layers is None else f"{name} ({layers} layers)"
    print(json.dumps({"model": label, "params": params(model), "tokens_per_s": tps, "step_s": t, "peak_gb": peak,
                      "kernels": kernels(name)}))


def bench_peers(quick):
    if DEVICE == "cuda":  # the thesis' setting: one-second clips
        batch, length = (2, 4000) if quick else (4, 16000)
    else:  # the transformer's quadratic cost bounds T on a CPU
        batch, length = (1, 1024) if quick else (1, 2048)
    rows = []
    for name in ("Poolformer sc09", "MambaForCausalLM", "RecurrentGemmaForCausalLM", "GPT-2"):
        row = run_child(["train", name, length, batch], timeout=1800)
        row.setdefault("model", name)
        rows.append(row)
        print(f"  {row}", flush=True)
    for row in rows[1:]:
        if "tokens_per_s" in row and "tokens_per_s" in rows[0]:
            row["poolformer_speedup"] = rows[0]["tokens_per_s"] / row["tokens_per_s"]
    return {"batch": batch, "length": length, "rows": rows}
