"""Poolformer benchmarks, every comparison measured side by side in one run on this machine.

    python benchmarks/run.py [--quick] [--out benchmarks/results] [--only scan,train,peers,generate,length]

Writes `<out>/results.md` (the tables) and `<out>/results.json`; sections left out of `--only` keep the results an
earlier run wrote there. Sections:
1. scan: RG-LRU scan forward + backward (B=4, T=16000, 128 complex units) per implementation, against a memcpy of
   the bytes the scan must move (read a, u, write h; read dL/dh, a, h, write dL/da, dL/du);
2. train: training tokens/s of the SC09 config vs its no-pooling ablation (T=16000), eager and under
   `torch.compile` (the scan is one opaque custom op in the graph);
3. peers: training tokens/s vs transformers' MambaForCausalLM, RecurrentGemmaForCausalLM and a GPT-2, parameter
   counts matched within 10%, same T and batch;
4. generate: generation samples/s at batch 1, 16, 64: the plain eager loop of `model(token, cache=cache)`
   calls vs `generate` with eager steps vs `generate` with the compiled step (its first call, with an empty inductor
   cache, timed apart), and the peers' `generate` (batch 1, 16);
5. length: time and peak memory of one training step as T grows (B=1, checkpointing on), with the
   transformer beside it until it runs out of memory or time.

On a CUDA machine every section runs on the GPU, with the GPU's sizes: the scan compares the Triton kernel with the
chunked torch scan; training runs under bf16 autocast (the recurrence stays fp32) at T=16000 for all models, with
Mamba on the `mamba-ssm`/`causal-conv1d` CUDA kernels and GPT-2 on flash attention (`flash-attn`) or SDPA when
those packages are installed (the tables say which ran); peak memory is `torch.cuda.max_memory_allocated`. The
one command is

    pip install -e ".[train]" && pip install mamba-ssm causal-conv1d flash-attn --no-build-isolation
    python benchmarks/run.py --out benchmarks/results-gpu
"""

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, linear_scan, sequential_scan
from modeling_poolformer.scan import numba_kernels, triton_available
from training.utils import tune_cpu_allocator

ROOT = Path(__file__).resolve().parent.parent

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


# ---------------------------------------------------------------------------------------------------------------------
# 1. scan
# ---------------------------------------------------------------------------------------------------------------------


def bench_scan(quick):
    batch, length, units = 4, 4000 if quick else 16000, 128
    g = torch.Generator().manual_seed(0)
    a = torch.polar(torch.rand(batch, length, units, generator=g) * 0.98, torch.rand(batch, length, units, generator=g))
    u = torch.randn(batch, length, units, dtype=torch.complex64, generator=g)
    a, u = a.to(DEVICE), u.to(DEVICE)
    grad = torch.randn_like(u)

    def fwd_bwd(fn):
        def run():
            x, y = a.detach().requires_grad_(), u.detach().requires_grad_()
            h = fn(x, y)
            torch.autograd.backward(h, grad)
        return run

    dst = torch.empty_like(a)
    copy = best_of(lambda: dst.copy_(a), repeats=5)
    bound = 4 * copy  # 8 passes over an array of this size; one copy is 2 (read + write)
    rows = []
    impls = ["numba", "loop", "chunked"] if DEVICE == "cpu" else ["triton", "chunked"]
    impls = [i for i in impls if i != "numba" or numba_kernels() is not None]
    impls = [i for i in impls if i != "triton" or triton_available()]
    for impl in impls:
        t = best_of(fwd_bwd(lambda x, y, impl=impl: linear_scan(x, y, implementation=impl)))
        rows.append({"implementation": impl, "seconds": t, "over_bound": t / bound})
    t = best_of(fwd_bwd(sequential_scan), repeats=1)
    rows.append({"implementation": "autograd loop (reference)", "seconds": t, "over_bound": t / bound})
    mb = a.numel() * a.element_size() / 1e6
    return {"batch": batch, "length": length, "units": units, "array_mb": mb, "memcpy_s": copy, "bound_s": bound,
            "rows": rows}


# ---------------------------------------------------------------------------------------------------------------------
# 2-3. training throughput
# ---------------------------------------------------------------------------------------------------------------------


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


def poolformer(path=SC09, **overrides):
    config = PoolformerConfig.from_pretrained(path, **overrides)
    return PoolformerForCausalLM(config)


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


def child_train(name, length, batch):
    """Child process: training tokens/s of one model (a fresh process per model keeps memory apart)."""
    tune_cpu_allocator()  # train.py's CPU setting, for every model alike
    model, layers = build_model(name, length)
    repeats = 2 if name == "Poolformer sc09" or DEVICE == "cuda" else 1
    tps, t, peak = train_tokens_per_s(model, batch, length, repeats=repeats)
    label = name if layers is None else f"{name} ({layers} layers)"
    print(json.dumps({"model": label, "params": params(model), "tokens_per_s": tps, "step_s": t, "peak_gb": peak,
                      "kernels": kernels(name)}))


def run_child(args, timeout):
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:  # a row, not the end of the run
        return {"error": f"over {timeout} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][-200:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


# ---------------------------------------------------------------------------------------------------------------------
# 4. generation
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def eager_loop(model, batch, new_tokens):
    """The baseline: a plain loop of `model(token, cache=cache)` calls with multinomial sampling."""
    from modeling_poolformer import PoolformerCache

    cache, token = PoolformerCache(model.config), torch.full((batch, 1), 128, device=DEVICE)
    for _ in range(new_tokens):
        logits = model(token, cache=cache).logits[:, -1]
        token = torch.multinomial(torch.softmax(logits.float(), -1), 1)


@torch.no_grad()
def child_generate(name, new_tokens, batch):
    """Child process: generation samples/s of one model, sampling from token 128. Poolformer: the plain eager loop,
    `generate` with eager steps, and `generate` with the compiled step (its first call, which compiles with an
    empty inductor cache, timed apart)."""
    tune_cpu_allocator()  # train.py's CPU setting, for every model alike
    torch.manual_seed(0)
    model, _ = build_model("Poolformer sc09" if name == "Poolformer" else name, new_tokens + 1)
    model = model.to(DEVICE).eval()
    if name == "Poolformer":  # the audio sampling defaults a trained model ships (full distribution, temperature 1)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(SC09)
    bos = torch.full((1, 1), 128, device=DEVICE)
    if name != "Poolformer":
        def gen(n):
            return model.generate(bos, max_new_tokens=n, min_new_tokens=n, num_return_sequences=batch,
                                  do_sample=True, top_k=0)
        gen(4)  # warm-up
        print(json.dumps({"samples_per_s": batch * new_tokens / best_of(lambda: gen(new_tokens), 1, 0)}))
        return
    from transformers import CompileConfig

    threads = 1 if batch == 1 else torch.get_num_threads()  # generate's choice, for the eager loop too
    torch.set_num_threads(threads)
    eager_loop(model, batch, 4)
    loop = best_of(lambda: eager_loop(model, batch, new_tokens), 1, 0)
    eager = best_of(lambda: model.generate(bos, max_new_tokens=new_tokens, num_return_sequences=batch,
                                           disable_compile=True), 1, 0)
    start = time.perf_counter()
    model.generate(bos, max_new_tokens=8, num_return_sequences=batch, compile_config=CompileConfig())
    first = time.perf_counter() - start
    compiled = best_of(lambda: model.generate(bos, max_new_tokens=new_tokens, num_return_sequences=batch,
                                              compile_config=CompileConfig()), 2, 0)
    n = batch * new_tokens
    print(json.dumps({"eager_loop": n / loop, "generate_eager": n / eager, "generate_compiled": n / compiled,
                      "compile_s": first, "threads": threads}))


PEERS = ("MambaForCausalLM", "RecurrentGemmaForCausalLM", "GPT-2")


def bench_generate(quick):
    new_tokens = 320 if quick else 1600
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:  # compile time from an empty inductor cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        for batch in (1, 16, 64):
            row = dict.fromkeys(("eager_loop", "generate_eager", "generate_compiled", "compile_s", "threads"),
                                float("nan"))
            row.update(batch=batch, **run_child(["generate", "Poolformer", new_tokens, batch], timeout=3600))
            for name in PEERS if batch < 64 else ():
                row[name] = run_child(["generate", name, min(new_tokens, 640), batch], timeout=3600).get(
                    "samples_per_s", float("nan"))
            row["compiled_over_loop"] = row["generate_compiled"] / row["eager_loop"]
            rows.append(row)
            print(f"  {row}", flush=True)
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.makedirs(cache_dir)
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return {"new_tokens": new_tokens, "rows": rows, "realtime_rate": 16000}


# ---------------------------------------------------------------------------------------------------------------------
# 5. length scaling (each point in a fresh process, for its peak memory)
# ---------------------------------------------------------------------------------------------------------------------


CHUNK = 16000  # Poolformer's time chunk for checkpointing beyond one chunk (per-block checkpointing below it)


def one_step(kind, length):
    """Child process: one training step (after a warm-up step up to 2^16) of `kind` at B=1, prints its time. Its
    allocator returns every freed tensor of 1 MB or more to the OS (the setting train.py uses for long sequences),
    so the peak RSS is what the step needs, not what a fragmented heap holds on to."""
    if kind == "poolformer":
        model = poolformer(dropout=0.0, activation_checkpointing=True, checkpoint_chunk_size=CHUNK)
    else:
        model, _ = build_model("GPT-2", length)
        model.activation_checkpointing_enable()
    model.to(DEVICE).train()
    ids = torch.randint(0, 256, (1, length), device=DEVICE)
    times = []
    reset_peak()
    for _ in range(2 if length <= 2**16 else 1):
        sync()
        start = time.perf_counter()
        with AUTOCAST:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": min(times), "gpu_peak_gb": peak_gb()}))


def measure_step(kind, length, timeout):
    """Runs `one_step` in a child and reads its peak RSS from wait4 (ru_maxrss is in KB on Linux)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", "step", kind, str(length)], stdout=out,
                                stderr=err, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                _, _, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"status": f"over {timeout} s", "peak_gb": usage.ru_maxrss / 1e6}
            time.sleep(0.2)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = usage.ru_maxrss / 1e6
    if code != 0:
        oom = code == -9 or "memory" in stderr.lower()
        return {"status": "out of memory" if oom else stderr.strip()[-200:], "peak_gb": peak}
    row = json.loads(stdout.strip().splitlines()[-1])
    if DEVICE == "cuda":  # the GPU's peak, not the host process's
        peak = row["gpu_peak_gb"]
    return {"status": "ok", "peak_gb": peak, **row}


def bench_length(quick):
    top = 16 if quick else 20
    rows, transformer_alive = [], True
    for exp in range(12, top + 1):
        length = 2**exp
        row = {"length": length, "poolformer": measure_step("poolformer", length, timeout=1500)}
        if transformer_alive:
            row["gpt2"] = measure_step("gpt2", length, timeout=300)
            transformer_alive = row["gpt2"]["status"] == "ok"
        rows.append(row)
        print(f"  T=2^{exp}: {row}", flush=True)
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


def gb(x):
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def markdown(results):
    m = results["machine"]
    lines = [f"Machine: {m['device']}, {m['threads']} threads, torch {m['torch']}, {m['when']}.", ""]
    if "scan" in results:
        s = results["scan"]
        lines += [f"**1. RG-LRU scan, forward + backward** (B={s['batch']}, T={s['length']}, {s['units']} complex units, "
                  f"{s['array_mb']:.0f} MB per array; bound = memcpy of the 8 array passes = {s['bound_s'] * 1e3:.1f} ms)", "",
                  "| implementation | time (ms) | x bound |", "|---|---|---|"]
        lines += [f"| {r['implementation']} | {r['seconds'] * 1e3:.1f} | {r['over_bound']:.2f} |" for r in s["rows"]]
        lines.append("")
    if "train" in results:
        t = results["train"]
        lines += [f"**2. Training throughput, pooling vs none** (B={t['batch']}, T={t['length']}, "
                  f"{'bf16 autocast' if m.get('gpu') else 'fp32'}; compiled: `torch.compile(model)`, first step "
                  "untimed)", "", "| model | torch.compile | params | tokens/s | step (s) | peak GPU memory (GB) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {'yes' if r.get('compiled') else 'no'} | {r['params']:,} | "
                  f"{r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {gb(r.get('peak_gb'))} |"
                  for r in t["rows"]]
        eager = t.get("speedup_vs_no_pooling", t["rows"][0].get("speedup_vs_no_pooling", float("nan")))
        lines += ["", f"Pooling speed-up: **{eager:.2f}x** eager, "
                  f"{t.get('speedup_vs_no_pooling_best', eager):.2f}x best of eager and compiled (thesis: 1.87x)", ""]
    if "peers" in results:
        p = results["peers"]
        lines += [f"**3. Training throughput vs peers** (B={p['batch']}, T={p['length']}, sizes matched within 10%)", "",
                  "| model | kernels | params | tokens/s | step (s) | peak GPU memory (GB) | Poolformer speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            if "error" in r:
                lines.append(f"| {r['model']} | - | - | {r['error']} | - | - | - |")
                continue
            speed = f"{r['poolformer_speedup']:.2f}x" if "poolformer_speedup" in r else "-"
            lines.append(f"| {r['model']} | {r.get('kernels', '-')} | {r['params']:,} | {r['tokens_per_s']:.0f} | "
                         f"{r['step_s']:.2f} | {gb(r.get('peak_gb'))} | {speed} |")
        lines.append("")
    if "generate" in results:
        g = results["generate"]
        lines += [f"**4. Generation samples/s** (sc09 model, {g['new_tokens']} new samples per row, sampling at "
                  f"temperature 1; real time = {g['realtime_rate']} samples/s; peers: 640 samples, same sampling)", "",
                  "| batch | threads | eager loop | generate, eager steps | generate, compiled step | compiled / loop | "
                  "x real time | first compiled call (s) | " + " | ".join(PEERS) + " |",
                  "|---" * (8 + len(PEERS)) + "|"]
        for r in g["rows"]:
            peers = " | ".join(f"{r[n]:.0f}" if n in r else "-" for n in PEERS)
            lines.append(f"| {r['batch']} | {r['threads']:.0f} | {r['eager_loop']:.0f} | {r['generate_eager']:.0f} | "
                         f"{r['generate_compiled']:.0f} | {r['compiled_over_loop']:.2f}x | "
                         f"{r['generate_compiled'] / g['realtime_rate']:.3f} | {r['compile_s']:.1f} | {peers} |")
        lines.append("")
    if "length" in results:
        lines += [f"**5. One training step vs sequence length** (B=1, fresh process per point; Poolformer: per-block "
                  f"checkpointing up to T={CHUNK}, checkpointed time chunks of {CHUNK} beyond; GPT-2: per-layer "
                  "checkpointing; peak = the process's RSS on CPU, where glibc returns freed tensors >= 1 MB to the OS; "
                  "peak allocated memory on a GPU)",
                  "", "| T | Poolformer step (s) | Poolformer peak (GB) | GPT-2 step (s) | GPT-2 peak (GB) |",
                  "|---|---|---|---|---|"]
        for r in results["length"]["rows"]:
            def cell(x):
                if x is None:
                    return "-", "-"
                if x["status"] != "ok":
                    return x["status"], f"{x.get('peak_gb', float('nan')):.1f}"
                return f"{x['step_s']:.2f}", f"{x['peak_gb']:.1f}"
            p, q = cell(r["poolformer"]), cell(r.get("gpt2"))
            lines.append(f"| 2^{int(math.log2(r['length']))} | {p[0]} | {p[1]} | {q[0]} | {q[1]} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes: minutes instead of an hour on 2 CPU cores")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--only", default="scan,train,peers,generate,length")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "train":
            return child_train(rest[0], int(rest[1]), int(rest[2]))
        if mode == "generate":
            return child_generate(rest[0], int(rest[1]), int(rest[2]))
        return one_step(rest[0], int(rest[1]))
    tune_cpu_allocator()  # train.py's CPU setting, for every model alike
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    results = {"machine": {"device": device, "gpu": DEVICE == "cuda", "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"), "quick": args.quick}}
    sections = {"scan": bench_scan, "train": bench_train, "peers": bench_peers, "generate": bench_generate,
                "length": bench_length}
    out = Path(args.out)
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
