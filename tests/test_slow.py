"""Long checks at the thesis' full size (run with `pytest -m slow`)."""

import math

import pytest
import torch
from transformers import CompileConfig

from helpers import HUB_CONFIG_NAMES, HUB_CONFIGS, hub_config
from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["sc09", "sc09-long-skips", "sc09-coarse-shift"])
def test_full_size_cached_decoding_and_causality(name):
    torch.manual_seed(0)
    model = PoolformerForCausalLM(PoolformerConfig.from_pretrained(HUB_CONFIGS / name)).eval()
    ids = torch.randint(0, 256, (2, 3 * 160 + 7))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :81], use_cache=True)
        cache, pieces = out.cache, [out.logits]
        for t in range(81, ids.shape[1]):
            pieces.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
        for t in (1, 159, 160, 319):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 77) % 256
            diff = (model(changed).logits - full).abs().amax(dim=(0, 2))
            assert diff[:t].max() <= 1e-6 and diff[t] > 1e-4


def test_full_size_training_step_with_checkpointing_matches_plain():
    torch.manual_seed(0)
    config = PoolformerConfig.from_pretrained(HUB_CONFIGS / "sc09", dropout=0.0)
    plain = PoolformerForCausalLM(config).train()
    ckpt = PoolformerForCausalLM(config).train()
    ckpt.activation_checkpointing_enable()
    in_time = PoolformerForCausalLM(PoolformerConfig.from_pretrained(HUB_CONFIGS / "sc09", dropout=0.0,
                                                                     checkpoint_chunk_size=4000)).train()
    ids = torch.randint(0, 256, (1, 16001))
    for model in (plain, ckpt, in_time):
        model.load_state_dict(plain.state_dict())
        model(ids, labels=ids).loss.backward()
    for a, b, c in zip(plain.parameters(), ckpt.parameters(), in_time.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.grad, a.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shift", ["fine", "coarse"])
@pytest.mark.parametrize("name", HUB_CONFIG_NAMES)
def test_compiled_generation_logits_equal_forward(name, shift):
    # every config's stacks through the compiled step (shrunk widths): generate's logits == forward on its output
    torch.manual_seed(0)
    model = PoolformerForCausalLM(hub_config(name, causal_shift=shift, layers_per_level=1)).eval()
    factors = model.config.pooling_factors
    period = math.prod(factors) if factors else 4
    prompt = torch.randint(0, 256, (2, period + 3))
    out = model.generate(prompt, max_new_tokens=2 * period + 1, compile_config=CompileConfig(),
                         return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = model(out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    assert (torch.stack(out.logits, 1) - want).abs().max().item() <= 1e-3


def test_full_size_compiled_generation_equals_eager():
    torch.manual_seed(0)
    model = PoolformerForCausalLM(PoolformerConfig.from_pretrained(HUB_CONFIGS / "sc09")).eval()
    prompt = torch.randint(0, 256, (1, 37))
    kwargs = dict(max_new_tokens=2 * 160 + 5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    compiled = model.generate(prompt, compile_config=CompileConfig(), **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert (torch.stack(compiled.logits) - torch.stack(eager.logits)).abs().max().item() <= 1e-4
