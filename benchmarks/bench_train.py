"""2-3. Training throughput: the SC09 model vs its no-pooling ablation (eager and compiled), and vs
transformers' recurrent and attention peers of matched size, each in its own process."""

import json
import time
import weakref

import torch

from training.utils import tune_cpu_allocator

from .common import (
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
    sync,
)

COMPILE_MODES = {
    False: "eager",
    True: "torch.compile(model)",
    "blocks": "each residual block compiled (block.compile())",
    "graphs": "torch.compile(model, mode='reduce-overhead'): CUDA graphs of the compiled step",
}


def compiled_forward(model, compile):
    """The forward a training step calls: the model itself (`compile` False), compiled whole (True, what
    `accelerate launch --dynamo_backend inductor` does), compiled block by block ("blocks", in place: the rest runs
    eagerly) or compiled whole with CUDA graphs ("graphs")."""
    if compile == "blocks":
        from modeling_poolformer.modeling_poolformer import PoolformerResidualBlock

        for block in model.modules():
            if isinstance(block, PoolformerResidualBlock):
                block.compile()
        return model
    if compile == "graphs":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model) if compile else model


def training_step(model, batch, length, compile=False):
    """A function running one full training step (forward under the benchmark's autocast, backward, AdamW) of
    `model`, moved to the device, on random ids; `compile`: one of COMPILE_MODES."""
    model.to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # train.py's optimizer
    ids = torch.randint(0, 256, (batch, length), device=DEVICE)
    forward = compiled_forward(model, compile)

    def step():
        with AUTOCAST:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_tokens_per_s(model, batch, length, repeats=2, compile=False):
    """(tokens/s, step seconds, peak GB) of full training steps (forward, backward, AdamW), after a warm-up step
    (which compiles, with `compile`: one of COMPILE_MODES; "graphs" takes two warm-up steps, the second captures)."""
    step = training_step(model, batch, length, compile)
    reset_peak()
    t = best_of(step, repeats=repeats, warmup=2 if compile == "graphs" else 1)
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


# ---------------------------------------------------------------------------------------------------------------------
# 8. Memory traffic of a training step, device-independent (the same op graph on CPU and GPU): bytes autograd saves for
# the backward, bytes the aten ops write, ops per step; the fused RG-LRU against the composite of torch ops
# ---------------------------------------------------------------------------------------------------------------------


class _TrafficCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes every aten op writes (its outputs, or the tensors it mutates; views write nothing) and counts
    the ops that write. A custom operator of this package is entered, so that what runs inside it counts too, and
    there every buffer it allocates counts as written (its kernels fill them).

    It also follows the memory the step holds: every storage an op creates is live until it is freed (a finalizer on
    the storage, which torch keeps one Python object per), and `peak` is the most that was live at once: the peak a
    GPU's allocator would see for the same op graph, less its rounding and caching."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.by_op, self.last_op, self.inside = 0, 0, {}, "", 0
        self.live, self.peak, self.tracked = 0, 0, set()

    def _track(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.tracked or storage.nbytes() == 0:
            return
        self.tracked.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key, nbytes):
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.startswith("poolformer::"):
            self.inside += 1
            try:  # its CPU kernel with this mode active (calling func itself would come back here)
                with self:
                    out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            finally:
                self.inside -= 1
            self.last_op = name
            return out
        out = func(*args, **kwargs)
        self.last_op = name
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not func.is_view:
                self._track(t)
        if func.is_view or (name.startswith("aten::empty") and not self.inside):
            return out
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        written = 0
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and (func._schema.is_mutable or t.untyped_storage().data_ptr() not in inputs):
                written += t.numel() * t.element_size()
        if written:
            self.ops += 1
            self.bytes += written
            key = name.split("::")[-1]
            self.by_op[key] = self.by_op.get(key, 0) + written
        return out


def _is_parameter(t):
    """A parameter or autocast's cached low-precision copy of one (neither grows with T)."""
    if isinstance(t, torch.nn.Parameter):
        return True
    fn = t.grad_fn
    return fn is not None and type(fn).__name__ == "ToCopyBackward0" and any(
        f is not None and type(f).__name__ == "AccumulateGrad" for f, _ in fn.next_functions)


def step_traffic(model, batch, length, dtype=torch.bfloat16):
    """One training step (forward + backward) under `dtype` autocast -> per-token saved and written bytes, the saved
    tensors' count, the ops that write, and where the bytes go (per aten op)."""
    model.train()
    ids = torch.randint(0, 256, (batch, length))
    saved, by_op = {}, {}
    counter = _TrafficCounter()

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in saved:
            saved[key] = (storage.nbytes(), _is_parameter(t))
            if not saved[key][1]:
                op = f"{counter.last_op.split('::')[-1]} {str(t.dtype).replace('torch.', '')}"
                by_op[op] = by_op.get(op, 0) + storage.nbytes()
        return t

    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=ids, labels=ids).loss
        forward_ops, forward_bytes = counter.ops, counter.bytes
        loss.backward()
    model.zero_grad(set_to_none=True)
    tokens = batch * length
    activations = sum(n for n, param in saved.values() if not param)
    top = lambda d: {k: v / tokens / 1e3 for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:12]}  # noqa: E731
    return {"saved_kb_per_token": activations / tokens / 1e3, "peak_kb_per_token": counter.peak / tokens / 1e3,
            "saved_with_params_kb_per_token": sum(n for n, _ in saved.values()) / tokens / 1e3,
            "saved_tensors": len(saved), "written_kb_per_token": counter.bytes / tokens / 1e3,
            "written_forward_kb_per_token": forward_bytes / tokens / 1e3, "ops": counter.ops,
            "forward_ops": forward_ops, "saved_by_op_kb": top(by_op), "written_by_op_kb": top(counter.by_op)}


SC09_EPOCH_TOKENS = 31158 * 16000  # the SC09 training set, clips padded to one second


def composite_blocks(model):
    """The model with the fused RG-LRU but its residual blocks' composite ends (norm, linears, GELU gate): the row
    that shows what the fused gated outputs (`fused_block`, `gelu_gate`) buy on top of the fused recurrence."""
    for module in model.modules():
        if hasattr(module, "fusable"):
            module.fusable = False
    return model


def _cuda_row(make, batch, length, compile=False):
    """tokens/s, step s, peak GB and SC09 epochs/h of one model on the GPU (bf16 autocast), or the error."""
    try:
        tps, t, peak = train_tokens_per_s(make(), batch, length, repeats=2, compile=compile)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return {"tokens_per_s": tps, "step_s": t, "peak_gb": peak, "epochs_per_h": tps * 3600 / SC09_EPOCH_TOKENS}


def profile_step(model, batch, length, top=25):
    """Where one training step's time goes (after a warm-up step): torch.profiler's kernels (CUDA; the ops on a CPU)
    by self time, their total, how many ran, and the step's wall time; under the benchmark's autocast."""
    from torch.profiler import ProfilerActivity, profile

    step = training_step(model, batch, length)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        sync()
    wall = time.perf_counter() - start
    model.to("cpu")
    device_time = "self_device_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, device_time) > 0]
    if DEVICE == "cuda":  # kernels and copies run on the device; the ops that launched them have device time too
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, device_time) for e in events)
    events.sort(key=lambda e: -getattr(e, device_time))
    return {"wall_s": wall, "device_busy_s": total / 1e6, "launches": sum(e.count for e in events),
            "top": [{"name": e.key[:120], "ms": getattr(e, device_time) / 1e3, "count": e.count,
                     "share": getattr(e, device_time) / total} for e in events[:top]]}


def bench_traffic(quick):
    """Before (composite), the fused RG-LRU alone, and after (the fused RG-LRU and residual blocks): bytes and ops
    per training step under bf16 autocast on the CPU (the GPU's op graph: the measurement runs on CPU tensors
    everywhere), the most memory the step held at once, scaled to the thesis batch (32 x 16,000 tokens) as a
    prediction of the GPU's peak, and training tokens/s on this machine (fp32 on a CPU, its training setting). On a
    CUDA machine also the thesis recipe (batch 32, T = 16,000, bf16 autocast): tokens/s, peak memory and SC09
    epochs/h, eager and compiled, and GPT-2 (SDPA or flash attention, parameters matched) at 512k tokens per batch
    across T = 4k .. 64k."""
    length = 1000 if quick else 4000
    rows = []
    configs = (("sc09", SC09), ("sc09-no-pooling", ROOT / "hub_configs" / "sc09-no-pooling"))
    if DEVICE == "cpu":  # train.py's CPU setting, and a first model timed and dropped (a process's first is slow)
        tune_cpu_allocator()
        train_tokens_per_s(poolformer(SC09, dropout=0.0), 1, length, repeats=1)
    for name, path in configs:
        for fused, label in ((False, "composite"), (True, "fused RG-LRU"), (True, "fused RG-LRU + blocks")):
            torch.manual_seed(0)
            model = poolformer(path, dropout=0.0, fused_rglru=fused)
            if label == "fused RG-LRU":
                composite_blocks(model)
            row = {"model": name, "rglru": label, **step_traffic(model, 1, length)}
            row["predicted_thesis_batch_gb"] = row["peak_kb_per_token"] * 32 * 16000 / 1e6
            if DEVICE == "cpu":
                row["cpu_tokens_per_s"] = train_tokens_per_s(model, 1, length, repeats=3)[0]
            rows.append(row)
            print(f"  {name} {row['rglru']}: saved {row['saved_kb_per_token']:.1f} KB/token, written "
                  f"{row['written_kb_per_token']:.1f} KB/token, peak {row['peak_kb_per_token']:.1f} KB/token, "
                  f"{row['ops']} ops", flush=True)
    result = {"batch": 1, "length": length, "dtype": "bf16 autocast", "rows": rows}
    if DEVICE == "cuda":
        gpu_length = 4000 if quick else 16000
        result["gpu"] = {"batch": 32, "length": gpu_length, "rows": [
            {"model": name, "rglru": "fused" if fused else "composite", "compile": COMPILE_MODES[compile],
             **_cuda_row(lambda: poolformer(path, dropout=0.0, fused_rglru=fused), 32, gpu_length, compile)}
            for name, path in configs for fused, compile in ((False, False), (True, False), (True, True))]}
        gpt2 = []
        for length in (4096, 8192, 16384, 32768, 65536):
            batch = max(1, 32 * 16384 // length)
            gpt2.append({"length": length, "batch": batch, "kernel": kernels("GPT-2"),
                         **_cuda_row(lambda: build_model("GPT-2", length)[0], batch, length),
                         "poolformer": _cuda_row(lambda: poolformer(SC09, dropout=0.0), batch, length)})
        result["gpu"]["gpt2"] = gpt2
    return result
