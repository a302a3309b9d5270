"""4. Generation samples/s at batch 1, 16, 64: the plain eager loop vs `generate` with eager and compiled
steps, and the peers' `generate`. On a CUDA device also batch 1, 64, 512: the eager loop vs `generate` with one CUDA
graph per kind of step (over the eager kernels, and over the compiled stacks: the default), against the targets."""

import functools
import json
import os
import shutil
import tempfile
import time

import torch

from training.utils import tune_cpu_allocator

from .common import DEVICE, SC09, best_of, build_model, run_child, sync

# samples/s wanted on one H200 (issue #32): 1/8, 4 and 16 real-time streams
CUDA_TARGETS = {1: 2000, 64: 64000, 512: 256000}
REALTIME = 16000


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
    return {"new_tokens": new_tokens, "rows": rows, "realtime_rate": 16000, "cuda": bench_generate_cuda(quick)}


@torch.no_grad()
def cuda_generation_row(model, batch, new_tokens, loop_tokens):
    """One row of the CUDA table: samples/s of the eager loop (`loop_tokens` steps: it is slow) and of `generate`
    with CUDA graphs over the eager kernels and over the compiled stacks (the default), sampling from token 128;
    each graph variant's first call timed apart (all of it, then its compilation + first step, then the warm-up and
    capture of the five kinds of step)."""
    from transformers import CompileConfig

    bos = torch.full((batch, 1), 128, device="cuda")
    row = {"batch": batch, "new_tokens": new_tokens, "target": CUDA_TARGETS.get(batch, float("nan"))}
    eager_loop(model, batch, 8)
    row["eager_loop"] = batch * loop_tokens / best_of(lambda: eager_loop(model, batch, loop_tokens), 1, 0)
    for name, compile_config in (("graphs_eager_kernels", CompileConfig(backend="eager")),
                                 ("graphs_compiled", CompileConfig())):
        sync()
        start = time.perf_counter()
        model.generate(bos, max_new_tokens=8, compile_config=compile_config)
        sync()
        row[f"{name}_first_s"] = time.perf_counter() - start
        row[f"{name}_capture_s"] = next(reversed(model._static_steps.values())).capture_seconds
        row[f"{name}_compile_s"] = next(reversed(model._static_steps.values())).compile_seconds
        run = functools.partial(model.generate, bos, max_new_tokens=new_tokens, compile_config=compile_config)
        row[name] = batch * new_tokens / best_of(run, 2, 0)
    row["x_realtime"] = row["graphs_compiled"] / REALTIME
    row["graphs_over_loop"] = row["graphs_compiled"] / row["eager_loop"]
    row["met"] = bool(row["graphs_compiled"] >= row["target"])
    return row


def child_generate_cuda(new_tokens, batch):
    """Child process: one row of the CUDA table (an empty inductor cache, so that the first call compiles)."""
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model, _ = build_model("Poolformer sc09", new_tokens + 1)
    model = model.to("cuda").eval()
    model.generation_config = GenerationConfig.from_pretrained(SC09)  # full distribution, temperature 1
    print(json.dumps(cuda_generation_row(model, batch, new_tokens, loop_tokens=min(new_tokens, 480))))


def bench_generate_cuda(quick):
    """The CUDA table (batch 1, 64, 512), or why it was skipped."""
    if DEVICE != "cuda":
        return {"skipped": "no CUDA device"}
    new_tokens, rows = 1600 if quick else 4800, []
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        for batch in CUDA_TARGETS:
            rows.append({"batch": batch, **run_child(["generate_cuda", new_tokens, batch], timeout=3600)})
            print(f"  {rows[-1]}", flush=True)
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return {"rows": rows, "realtime_rate": REALTIME, "device": torch.cuda.get_device_name()}
