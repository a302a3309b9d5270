"""The one-sample decoding step on static buffers, replayed as CUDA graphs on a GPU.

Why own graphs rather than `torch.compile(mode="reduce-overhead")`: inductor's CUDA graphs belong to the compiled
function, and decoding replays one compiled function for every residual stack of a step, so a later replay overwrote
the output an earlier one had returned while the SkipBlock still read it. Here a graph is a whole step of one kind
(the set of levels whose pooling group the step completes: `len(pooling_factors) + 1` kinds, each with its own
Python control flow, resolved at capture), captured with `torch.cuda.CUDAGraph` over the ordinary module code on
tensors that live outside every graph: the state tensors of a cache of our own (read and written in place), one
input buffer and one output buffer. Nothing a graph allocates outlives its replay (its output is copied into the
output buffer inside it), so the graphs of one batch share a memory pool and replay in any order, and no replay can
overwrite a value still in use. The stacks inside run the compiled step (inductor's fused kernels, no graphs of its
own), which is what makes a graph short.

The caller's cache is bound to the static state for the length of a `generate` call: at the first one-sample step its
state is copied in and its lists point at the static tensors (so `reorder_cache`, in place, reorders the tensors the
graphs read), and at the end of the call the state is copied back into its own tensors. Anything that replaces the
cache's tensors (`batch_repeat_interleave`, `batch_select_indices`, `to`) first releases it the same way, and the
next step binds it again.

On the CPU the same object runs, each "graph" being a plain call of the step on the same buffers: copy in, step,
copy out, reorder and phase changes are the same code, tested against eager decoding there.
"""

import warnings
from collections import OrderedDict
from typing import Optional

import torch

from .cache_poolformer import PoolformerCache

__all__ = ["PoolformerStaticStep", "StaticStepBuffers", "StaticStepStore", "step_kinds"]


def step_kinds(factors) -> list:
    """The canonical phases (`PoolformerCache.step_phases`) of every kind of one-sample step: k levels complete their
    group (p - 1 on them, 0 below), k = 0 .. len(factors)."""
    return [tuple(p - 1 for p in factors[:k]) + (0,) * (len(factors) - k) for k in range(len(factors) + 1)]


class StaticStepBuffers:
    """The static tensors of one batch size, dtype and device (a cache of their own, an input and an output buffer)
    and, with `graphs`, one captured CUDA graph per kind of step. `owner` is the cache bound to them, if any."""

    WARMUP = 2  # warm-up passes over every kind on a side stream before capture (torch's recipe)

    def __init__(self, config, states: list, x: torch.Tensor, stack_step, graphs: bool):
        self.cache = PoolformerCache.from_states(config, [torch.zeros_like(t, memory_format=torch.contiguous_format)
                                                          for t in states])
        self.cache.step_function = stack_step
        self.input = torch.zeros_like(x, memory_format=torch.contiguous_format)
        self.output: Optional[torch.Tensor] = None
        self.kinds = step_kinds(config.pooling_factors)
        self.graphs: Optional[dict] = {} if graphs else None
        self.owner = None
        self.originals: Optional[list] = None
        self.compile_seconds = self.capture_seconds = 0.0  # on CUDA: the first step, then warm-up and capture

    def run(self, body, phases: tuple):
        """One step of `body` on the static tensors, its output copied into the output buffer (inside a graph:
        nothing the step allocates escapes it)."""
        hidden = body(self.input, self.cache, phases)
        if self.output is None:
            self.output = torch.empty_like(hidden)
        self.output.copy_(hidden)

    def capture(self, body):
        """Warm-up (compiles the stack step and loads its kernels) on a side stream, then one graph per kind, all in
        one memory pool. The state tensors hold garbage afterwards: `bind` copies the real state in."""
        import contextlib
        import time

        device = self.input.device
        # autocast's cache of cast weights lives until the autocast region ends: a graph that read a cached copy
        # would read freed memory later, so the casts are captured instead (torch's advice for graphs)
        no_cast_cache = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                         if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
        with no_cast_cache:
            start = time.perf_counter()
            self.run(body, self.kinds[0])  # on the current stream: allocates the output buffer there (and compiles)
            torch.cuda.synchronize(device)
            self.compile_seconds, start = time.perf_counter() - start, time.perf_counter()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    for phases in self.kinds:
                        self.run(body, phases)
            torch.cuda.current_stream(device).wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            for phases in self.kinds:
                graph = torch.cuda.CUDAGraph()
                # thread_local: a streamer's thread may use CUDA (e.g. copy tokens to the CPU) during the capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self.run(body, phases)
                self.graphs[phases] = graph
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - start

    def step(self, body, x: torch.Tensor, phases: tuple) -> torch.Tensor:
        self.input.copy_(x)
        if self.graphs is not None:
            self.graphs[phases].replay()
        else:
            self.run(body, phases)
        return self.output.clone()  # the buffer is rewritten by the next step

    def bind(self, cache):
        """Copies `cache`'s state into the static tensors and points its lists at them."""
        if self.owner is not None:
            self.release()
        originals = cache.states()
        static = self.cache.states()
        if [(t.shape, t.dtype) for t in originals] != [(t.shape, t.dtype) for t in static]:
            raise ValueError("PoolformerCache: its states do not fit the decoding step's static buffers.")
        for target, source in zip(static, originals):
            target.copy_(source)
        cache.assign_states(static)
        cache.static_binding = self
        self.owner, self.originals = cache, originals

    def release(self):
        """Copies the state back into the bound cache's own tensors and gives them back to it."""
        cache, originals = self.owner, self.originals
        self.owner = self.originals = None
        if cache is None or cache.static_binding is not self:
            return
        for target, source in zip(originals, self.cache.states()):
            target.copy_(source)
        cache.assign_states(originals)
        cache.static_binding = None


class StaticStepStore(OrderedDict):
    """The model's static buffers by key, oldest first. A copy of the model (deepcopy, pickle) starts without them:
    graphs cannot be copied, and they read the original's parameters."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return type(self), ()


class PoolformerStaticStep:
    """What `generate` hands the cache it decodes with (`cache.static_step`): `step(body, x, cache)` runs a one-sample
    step of the model's body on the static buffers for the cache's batch (made, and on CUDA captured, on first use;
    the model keeps the last few), binding the cache to them first."""

    KEEP = 4  # static buffers (and graphs) kept per model: one per batch size / dtype in use

    def __init__(self, model, stack_step, graphs: bool):
        self.model, self.stack_step, self.graphs = model, stack_step, graphs

    def __call__(self, body, x: torch.Tensor, cache) -> torch.Tensor:
        buffers = cache.static_binding
        if buffers is None:
            buffers = self.buffers_for(body, x, cache)
            buffers.bind(cache)
        return buffers.step(body, x, cache.step_phases())

    def buffers_for(self, body, x: torch.Tensor, cache) -> StaticStepBuffers:
        states = cache.states()
        device = x.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) if device in ("cuda", "cpu") \
            else None
        graphs = self.graphs and x.device.type == "cuda" and not body.training  # dropout's RNG stays out of graphs
        # graphs read the parameters at their addresses: new storage (e.g. after `.to()`) needs new graphs
        key = (x.device, x.dtype, tuple(x.shape), tuple((tuple(t.shape), t.dtype) for t in states), autocast,
               tuple(p.data_ptr() for p in body.parameters()), body.training, self.stack_step, graphs)
        store = self.model._static_steps
        if key in store:
            store.move_to_end(key)
            return store[key]
        while len(store) >= self.KEEP:
            _, old = store.popitem(last=False)
            if old.owner is not None:
                old.release()
        buffers = StaticStepBuffers(cache.config, states, x, self.stack_step, graphs)
        if graphs:
            try:
                buffers.capture(body)
            except Exception as e:  # torch's errors from capture have many types; the plain calls are still exact
                warnings.warn(f"Poolformer: capturing the decoding step's CUDA graphs failed ({type(e).__name__}: "
                              f"{e}); this batch decodes without them, on the same buffers.", stacklevel=2)
                buffers.graphs = None
        store[key] = buffers
        return buffers
