"""The decoding step on static buffers (what a GPU replays as CUDA graphs) on the CPU, where each graph is a plain call
of the step on the same buffers: copy in, step, copy out, reorder, phase changes and binding a cache against eager
decoding, exactly. `CompileConfig(backend="eager")` runs the stacks through dynamo without inductor, so that the
static path does the very operations of eager decoding."""

import copy
import math

import pytest
import torch
from transformers import CompileConfig

from helpers import hub_model
from modeling_poolformer import PoolformerCache
from modeling_poolformer.outputs import CACHE_FIELD
from modeling_poolformer.static_step import PoolformerStaticStep, step_kinds

STATIC = dict(compile_config=CompileConfig(backend="eager"))  # mode "reduce-overhead": the static-buffer step
EAGER = dict(disable_compile=True)


def _buffers(model):
    return list(model._static_steps.values())


def test_step_kinds_are_the_canonical_phases():
    assert step_kinds([2, 4, 4, 5]) == [(0, 0, 0, 0), (1, 0, 0, 0), (1, 3, 0, 0), (1, 3, 3, 0), (1, 3, 3, 4)]
    assert step_kinds([]) == [()]
    # every step of a cache is one of them: each has its graph
    cache = PoolformerCache(hub_model("tiny", pooling_factors=[2, 3, 2]).config)
    for t in range(2 * 12):
        cache.seen_tokens = t
        assert cache.step_phases() in step_kinds([2, 3, 2])


# tiny: pooling [2, 4]; then three levels, the coarse shift, long skips and a temporal conv (every kind of state)
@pytest.mark.parametrize("overrides", [dict(), dict(pooling_factors=[2, 3, 2], causal_shift="coarse", skip="long",
                                                    conv1d_width=3)])
def test_greedy_on_static_buffers_equals_eager_exactly_and_buffers_are_reused(overrides):
    model = hub_model("tiny", **overrides)
    period = math.prod(model.config.pooling_factors)
    kwargs = dict(max_new_tokens=period + 11, do_sample=False, return_dict_in_generate=True, output_logits=True)
    for prompt in (torch.randint(0, 256, (2, 5)), torch.randint(0, 256, (2, 3))):  # a new state to copy in each call
        eager = model.generate(prompt, **EAGER, **kwargs)
        static = model.generate(prompt, **STATIC, **kwargs)
        assert torch.equal(static.sequences, eager.sequences)
        assert torch.equal(torch.stack(static.logits), torch.stack(eager.logits))  # every kind of step, same ops
        cache = getattr(static, CACHE_FIELD)
        # the call's cache has its own tensors back, holding the state; the static step is gone from it
        (buffers,) = _buffers(model)
        assert cache.static_binding is None and cache.static_step is None and buffers.owner is None
        assert not any(a is b for a, b in zip(cache.states(), buffers.cache.states()))
        assert all(torch.equal(a, b) for a, b in zip(cache.states(), getattr(eager, CACHE_FIELD).states()))
    assert buffers.graphs is None  # no graphs on the CPU: plain calls


def test_a_mode_without_graphs_keeps_the_plain_compiled_step():
    model = hub_model()
    model.generate(max_new_tokens=5, compile_config=CompileConfig(backend="eager", mode="default"))
    assert not _buffers(model) and len(model._compiled_steps) == 1


def test_sampling_beams_and_return_sequences_on_static_buffers_equal_eager():
    model = hub_model()
    prompt = torch.randint(0, 256, (2, 6))
    for options in (dict(num_return_sequences=3, max_new_tokens=20),
                    dict(num_return_sequences=2, max_new_tokens=20, temperature=0.7, top_k=5)):
        got = model.generate(prompt, generator=torch.Generator().manual_seed(4), **STATIC, **options)
        want = model.generate(prompt, generator=torch.Generator().manual_seed(4), **EAGER, **options)
        assert got.shape == (prompt.shape[0] * options["num_return_sequences"], 26) and torch.equal(got, want)
    # beams reorder the cache at every step, in place in the static tensors
    beams = dict(max_new_tokens=19, num_beams=3, num_return_sequences=3, do_sample=False, length_penalty=0.0,
                 return_dict_in_generate=True, output_scores=True)
    got, want = model.generate(prompt, **STATIC, **beams), model.generate(prompt, **EAGER, **beams)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.sequences_scores, want.sequences_scores)


def test_a_users_cache_keeps_its_tensors_and_its_state():
    model = hub_model()
    prompt = torch.randint(0, 256, (2, 5))
    want = model.generate(prompt, max_new_tokens=13, do_sample=False, **EAGER)
    with torch.no_grad():
        cache = model(prompt[:, :-1], use_cache=True).cache
    own = cache.states()
    got = model.generate(prompt, cache=cache, max_new_tokens=13, do_sample=False, **STATIC)
    assert torch.equal(got, want) and cache.get_seq_length() == 4 + 13
    assert all(a is b for a, b in zip(cache.states(), own))  # its own tensors, now holding the state
    with torch.no_grad():  # carrying on from it equals the forward over everything
        torch.testing.assert_close(model(got[:, -1:], cache=cache).logits, model(got).logits[:, -1:], rtol=0, atol=1e-5)


def test_right_padded_batch_and_streamer_on_static_buffers():
    model = hub_model()
    batch = torch.randint(0, 256, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 9])
    options = dict(attention_mask=mask, max_new_tokens=17, do_sample=False)
    assert torch.equal(model.generate(batch, **options, **STATIC), model.generate(batch, **options, **EAGER))

    class Collect:
        def __init__(self):
            self.values = []

        def put(self, value):
            self.values.append(value.reshape(-1))

        def end(self):
            pass

    streamer = Collect()
    out = model.generate(max_new_tokens=12, do_sample=False, streamer=streamer, **STATIC)
    assert torch.equal(torch.cat(streamer.values), out[0])


def test_cache_operations_while_bound():
    """A hand-driven step loop on static buffers: in-place reorder, batch operations that replace the tensors
    (they release the cache first; the next step binds it again), reset, against the same loop decoded eagerly."""
    model = hub_model(conv1d_width=2)
    ids = torch.randint(0, 256, (3, 40))
    static_step = PoolformerStaticStep(model, None, graphs=True)  # graphs: CUDA only, plain calls here

    def run(use_static):
        cache, logits = PoolformerCache(model.config), []
        cache.static_step = static_step if use_static else None
        with torch.no_grad():
            logits.append(model(ids[:, :3], cache=cache).logits)  # prefill: eager either way
            for t in range(3, 40):
                if t == 11:
                    addresses = [v.data_ptr() for v in cache.states()]
                    cache.reorder_cache(torch.tensor([2, 0, 1]))
                    assert [v.data_ptr() for v in cache.states()] == addresses  # in place
                if t == 17:
                    cache.batch_repeat_interleave(2)
                    assert cache.static_binding is None
                if t == 23:
                    cache.batch_select_indices(torch.tensor([5, 0, 2]))
                if t == 31:
                    cache.to(torch.float32)
                rows = [i % 3 for i in range(cache.batch_size)]
                logits.append(model(ids[rows, t : t + 1], cache=cache).logits)
                if use_static:
                    assert cache.static_binding is not None  # bound (again) by the step
        if cache.static_binding is not None:
            cache.static_binding.release()
        return torch.cat([x.reshape(-1) for x in logits]), cache

    (got, cache), (want, eager_cache) = run(True), run(False)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cache.states(), eager_cache.states()))
    assert len(_buffers(model)) == 2  # batch 3, 6, then 3 again: reused (also after a `to` that changed nothing)


def test_model_storage_change_makes_new_buffers():
    model = hub_model()
    model.generate(max_new_tokens=4, **STATIC)
    model.double()  # new parameter storage: the old buffers (and graphs) read the old addresses
    want = model.generate(max_new_tokens=12, do_sample=False, **EAGER)
    assert torch.equal(model.generate(max_new_tokens=12, do_sample=False, **STATIC), want)
    assert len(_buffers(model)) == 2 and _buffers(model)[-1].input.dtype == torch.float64
    assert not _buffers(copy.deepcopy(model))  # a copy has its own parameters: it makes its own buffers
