"""What `PoolformerForCausalLM.generate` adds around transformers' `generate`: when to compile the decoding step,
threads for the call, a seeded generator, the cache carrying the compiled step, and right-padded batches (each
prompt length generated on its own, then put back in transformers' layout)."""

import contextlib
import copy
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import CompileConfig, GenerationConfig

from .audio import ProgressStreamer
from .cache_poolformer import PoolformerCache
from .outputs import CACHE_FIELD, cache_argument
from .static_step import PoolformerStaticStep

__all__ = [
    "PoolformerGenerationMixin",
    "can_compile",
    "decoding_with",
    "eager_steps",
    "generate_right_padded",
    "intra_op_threads",
    "new_tokens",
    "sampling_rng",
]


# torch.compile's modes with CUDA graphs: here they mean the static-buffer step (own graphs on a GPU), and the stacks
# inside compile with the same mode minus its graphs
GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def new_tokens(config: GenerationConfig, prompt_length: int) -> int:
    return config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20) - prompt_length


@functools.lru_cache(maxsize=None)
def can_compile(device: torch.device) -> bool:
    """CUDA compiles with Triton; inductor on CPU needs a C++ compiler at run time (warned about once)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # inductor raises its own error types here
        warnings.warn(f"No C++ compiler for torch.compile ({type(e).__name__}: {e}); Poolformer decodes eagerly. "
                      "Install one (e.g. apt-get install g++) for a compiled decoding step.", stacklevel=3)
        return False
    return True


@contextlib.contextmanager
def intra_op_threads(count: Optional[int]):
    if count is None or count == torch.get_num_threads():
        yield
        return
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"num_threads must be 'auto', None or an int >= 1, got {count!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def sampling_rng(generator: Optional[torch.Generator]):
    """Sampling inside draws from `generator` (then advanced as if it had drawn itself); the global RNG is left as
    it was."""
    if generator is None:
        yield
        return
    device = generator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())


@contextlib.contextmanager
def decoding_with(cache, step, static_step=None, release: bool = True):
    """The cache decodes its one-sample steps with `step` (a compiled stack step, or None: eager) while inside, on
    the static buffers of `static_step` when given; on the way out it gets its own tensors back, with the state
    (with `release`; else the static buffers it is bound to stay bound)."""
    if cache is None:
        yield
        return
    previous = cache.step_function, cache.static_step
    cache.step_function, cache.static_step = step, static_step
    try:
        yield
    finally:
        if release and cache.static_binding is not None:
            cache.static_binding.release()
        cache.step_function, cache.static_step = previous


def eager_steps(cache):
    """The cache's one-sample steps run eagerly while inside (every block is called, so hooks see its output); the
    static buffers a generate call bound stay bound."""
    return decoding_with(cache, None, None, release=False)


def generate_right_padded(model, inputs, generation_config, config, streamer, progress, generator, num_threads,
                          kwargs):
    """Rows of each prompt length are generated together, without their padding (a recurrence cannot run over
    it, and each length has its own pooling phase); the outputs come back in the input order and transformers'
    right-padded layout."""
    mask = kwargs.pop("attention_mask").bool()
    if mask.shape != inputs.shape or (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("attention_mask must have the shape of the inputs and be right-padded (ones, then zeros): "
                         "a recurrence cannot skip left padding. Pad batches of different lengths on the right.")
    lengths = mask.sum(dim=1).cpu()
    if int(lengths.min()) == 0:
        raise ValueError("attention_mask has a row of zeros: every prompt needs at least one sample.")
    if streamer is not None:
        raise ValueError("A streamer follows one batch: generate prompts of different lengths in separate calls.")
    if cache_argument(kwargs.pop("cache", None), kwargs.pop("past_key_values", None)) is not None:
        raise ValueError("A cache holds one pooling phase: generate prompts of different lengths without one.")
    repeats = config.num_return_sequences or 1
    pad = config.pad_token_id if config.pad_token_id is not None else model.config.bos_token_id
    groups = []
    for length in sorted(set(lengths.tolist())):
        rows = (lengths == length).nonzero().squeeze(1)
        out = model.generate(inputs[rows.to(inputs.device), :length], generation_config=generation_config,
                            progress=progress, generator=generator, num_threads=num_threads, **kwargs)
        groups.append((rows, length, out))
    # transformers puts the k-th sequence of input row r at r * repeats + k
    order = torch.cat([(rows[:, None] * repeats + torch.arange(repeats)).flatten() for rows, _, _ in groups])
    inverse = torch.argsort(order).to(inputs.device)
    outputs = [out if config.return_dict_in_generate else None for _, _, out in groups]
    new_tokens = [(out.sequences if config.return_dict_in_generate else out)[:, length:] for _, length, out in groups]
    steps = max(t.shape[1] for t in new_tokens)
    sequences = torch.cat([
        torch.cat([inputs[rows.to(inputs.device)].repeat_interleave(repeats, 0),
                   F.pad(t, (0, steps - t.shape[1]), value=pad)], 1)
        for (rows, _, _), t in zip(groups, new_tokens)
    ])[inverse]
    if not config.return_dict_in_generate:
        return sequences
    fields = {"sequences": sequences}
    for name, value in outputs[0].items():
        if name in ("sequences", "cache", "past_key_values"):  # one cache cannot hold rows at different phases
            continue
        values = [getattr(out, name) for out in outputs]
        if isinstance(value, tuple):  # one entry per step
            if len({len(v) for v in values}) > 1:
                raise ValueError(f"{name}: the prompt lengths stopped after different numbers of steps; generate "
                                 "them in separate calls to get per-step outputs.")
            fields[name] = tuple(torch.cat(step)[inverse] for step in zip(*values))
        elif torch.is_tensor(value):
            fields[name] = torch.cat(values)[inverse]
    return type(outputs[0])(**fields)


class PoolformerGenerationMixin:
    """`generate` for `PoolformerForCausalLM`: transformers' own, with a compiled decoding step, threads, seeds,
    progress and right-padded batches around it. The model class provides `stack_step(stack, x, state, ...)`, the
    one-sample step of a residual stack that a compiled decoding step compiles (the modeling file's `run_blocks`:
    this module is imported by that one, not the other way round), and declares `_compiled_steps` and
    `_static_steps`, where the model keeps its compiled step and static buffers across calls."""

    stack_step = None

    def generate(self, inputs=None, generation_config=None, streamer=None, progress=False, generator=None,
                 num_threads="auto", **kwargs):
        """transformers' `generate` (every decoding strategy, logits processor and output option), with:

        - a compiled decoding step: every residual stack runs one sample through `torch.compile` (inductor), one
          compiled graph for all stacks of the same shape. It is used when `max_new_tokens` >= 4000 or a
          `compile_config` is given, and not with `disable_compile=True`; the first call of a model compiles
          (~20 s on 2 CPU cores; inductor's disk cache makes later processes faster). Without a C++ compiler
          (inductor needs one on CPU) it decodes eagerly, with one warning. With a CUDA-graph mode
          (`"reduce-overhead"`, `CompileConfig`'s default, or `"max-autotune"`) the whole step runs on static
          buffers (`static_step`): on a GPU one CUDA graph per kind of step (captured on the first call for a batch
          size), on the CPU plain calls of the same code. The model keeps its compiled step and static buffers; the
          cache that this call decodes with (the given one, or a new `PoolformerCache`) carries them while it runs
          and has its own tensors back, holding the state, afterwards;
        - `num_threads`: torch's intra-op threads while generating. `"auto"` (default) takes 1 for a batch of one
          row, where threads only add synchronisation to the tiny per-sample ops (2 threads made such a step 1.7x
          slower on 2 cores), and leaves torch's setting alone otherwise; an int takes that many; `None` never
          changes it. A changed setting is process-wide while the call runs (torch has no per-call one) and restored
          afterwards;
        - `generator`: a `torch.Generator` that seeds sampling without touching the global RNG;
        - `progress=True`: a tqdm bar with the real-time factor (also `PoolformerAudioStreamer(progress=True)`);
        - right-padded batches: rows of different lengths (an `attention_mask` of ones then zeros) each continue
          their own prompt exactly as alone; the output keeps transformers' layout (new tokens after the padded
          prompt, at positions T .. T + n - 1 of every row);
        - `inputs=None` starts from the zero token (`bos_token_id`, 128), unless `inputs_embeds` (B, T, D) are given:
          then, as in transformers, generation continues them and returns only the new tokens (a returned cache
          continues from embeddings too: pass the embeddings of everything so far and the cache);
        - the cache may be passed as `cache=` or by its old name `past_key_values=`, on every supported release.
        """
        config, _ = self._prepare_generation_config(generation_config, **kwargs)  # the merged settings, to read
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        embeds = kwargs.get("inputs_embeds")
        if inputs is None and embeds is None:
            bos = config.bos_token_id if config.bos_token_id is not None else self.config.bos_token_id
            inputs = torch.full((1, 1), bos, dtype=torch.long, device=self.device)
        # (batch, prompt length) of what the model reads first: the ids, or the embeddings
        prompt_shape = tuple(inputs.shape[:2]) if inputs is not None else tuple(embeds.shape[:2])
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            if inputs is None:
                raise ValueError("inputs_embeds with a padded attention_mask: generate prompts of different lengths from "
                                 "input_ids, or their embeddings in separate calls (a recurrence cannot skip padding).")
            return generate_right_padded(self, inputs, generation_config, config, streamer, progress, generator,
                                         num_threads, kwargs)
        if progress:
            streamer = ProgressStreamer(self.config.sample_rate, new_tokens(config, prompt_shape[1]), streamer)
        # compilation is ours (transformers' own would compile all of forward, and only on accelerators)
        kwargs.pop("compile_config", None)
        kwargs.pop("disable_compile", None)
        if generation_config is not None and (generation_config.compile_config or generation_config.disable_compile):
            generation_config = copy.deepcopy(generation_config)
            generation_config.compile_config, generation_config.disable_compile = None, False
        cache = cache_argument(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        if cache is None and config.use_cache is not False:
            cache = PoolformerCache(self.config)
        if cache is not None:
            kwargs[CACHE_FIELD] = cache
        batch = prompt_shape[0] * (config.num_return_sequences or 1) * (config.num_beams or 1)
        threads = 1 if num_threads == "auto" and batch == 1 else None if num_threads == "auto" else num_threads
        step, static = self._decoding_step(config, prompt_shape[1]) if cache is not None else (None, None)
        with intra_op_threads(threads), sampling_rng(generator), decoding_with(cache, step, static):
            return super().generate(inputs, generation_config=generation_config, streamer=streamer, **kwargs)

    def _decoding_step(self, config: GenerationConfig, prompt_length: int) -> tuple:
        """(the compiled one-sample step of a residual stack, the static-buffer step) for this call; (None, None) to
        decode eagerly. One compiled function for all stacks of the same shape (the state is an argument, not a
        constant): it compiles once, in seconds rather than minutes per graph of a whole step, and it is as fast.
        With a CUDA-graph mode ("reduce-overhead", the default, or "max-autotune") the whole step runs on static
        buffers, replayed as one CUDA graph per kind of step on a GPU (`static_step`; the stacks inside are compiled
        without graphs of their own) and called plainly on the CPU. Only when it pays off (see `generate`); the
        compiled step is kept by this model per set of compile options."""
        wanted = config.compile_config is not None or new_tokens(config, prompt_length) >= 4000
        if config.disable_compile or not wanted or not can_compile(self.device):
            return None, None
        compile_config = config.compile_config or CompileConfig()
        graphs = compile_config.mode in GRAPH_MODES
        options = dict(fullgraph=True, dynamic=False, backend=compile_config.backend, options=compile_config.options)
        if compile_config.backend == "inductor" and compile_config.options is None:
            if self.device.type == "cuda":
                options["mode"] = GRAPH_MODES.get(compile_config.mode, compile_config.mode)
            else:
                options["options"] = {"cpp_wrapper": True}  # C++ calls between kernels: ~15% faster steps on CPU
        steps = self._compiled_steps
        key = repr(sorted(options.items()))
        if key not in steps:
            steps[key] = torch.compile(self.stack_step, **options)
        return steps[key], PoolformerStaticStep(self, steps[key], graphs=True) if graphs else None
