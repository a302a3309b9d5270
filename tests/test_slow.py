"""Long checks at the thesis' full size (run with `pytest -m slow`)."""

import pytest
import torch

from conftest import HUB_CONFIGS
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
        cache, pieces = out.past_key_values, [out.logits]
        for t in range(81, ids.shape[1]):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
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
