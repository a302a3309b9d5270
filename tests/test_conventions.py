"""The conventions every transformers decoder keeps: input embeddings, generation from embeddings, config-level
output defaults, the common config fields, loading a body checkpoint under a head, pre-shifted labels and unknown
keywords, transformers' activation checkpointing layers, unreadable checkpoint files."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM, PoolformerModel
from modeling_poolformer.modeling_poolformer import PoolformerResidualBlock
from modeling_poolformer.outputs import CACHE_FIELD


def tiny(**overrides) -> PoolformerConfig:
    fields = dict(hidden_size=16, lru_width=16, num_gate_blocks=2, pooling_factors=[2, 2], layers_per_level=1,
                  dropout=0.0)
    return PoolformerConfig(**{**fields, **overrides})


# 1. the input embedding maps ids on its own


@pytest.mark.compat
def test_the_input_embedding_maps_ids_on_its_own():
    model = PoolformerForCausalLM(tiny()).eval()
    ids = torch.tensor([[0, 1, 128, 255]])
    emb = model.get_input_embeddings()(ids)
    # the thesis' Fourier features of the value: [cos(v w_k), sin(v w_k)], w_k = 10000^(-k / (D/2))
    w = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)
    angles = ids[..., None].double() * w
    torch.testing.assert_close(emb, torch.cat([angles.cos(), angles.sin()], -1).float())
    torch.testing.assert_close(model.get_input_embeddings()(ids.to(torch.uint8)), emb)  # any integer dtype
    assert model.to(torch.bfloat16).get_input_embeddings()(ids).dtype == torch.bfloat16  # follows the model's dtype
    for kind in ("learned", "mlp"):
        model = PoolformerForCausalLM(tiny(embedding=kind)).eval()
        emb = model.get_input_embeddings()(ids)
        with torch.no_grad():
            torch.testing.assert_close(model(inputs_embeds=emb).logits, model(ids).logits)
    table = torch.nn.Embedding(256, 16)  # a replacement module (as PEFT and others set them) is called with the ids alone
    model.set_input_embeddings(table)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(inputs_embeds=table(ids)).logits)


@pytest.mark.compat
def test_the_input_embedding_takes_the_loaded_dtype(tmp_path):
    PoolformerForCausalLM(tiny()).save_pretrained(tmp_path)
    model = PoolformerForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (1, 8))
    assert model.get_input_embeddings()(ids).dtype == torch.bfloat16
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


# 2. generation from inputs_embeds


@pytest.mark.compat
def test_forward_and_generate_from_inputs_embeds():
    model = PoolformerForCausalLM(tiny()).eval()
    ids = torch.randint(0, 256, (2, 9))
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    greedy = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    for batch in (1, 2):  # only the new tokens, as transformers returns them from embeddings
        from_ids = model.generate(ids[:batch], max_new_tokens=5, **greedy)
        from_embeds = model.generate(inputs_embeds=embeds[:batch], max_new_tokens=5, **greedy)
        assert torch.equal(from_embeds.sequences, from_ids.sequences[:, 9:])
        for a, b in zip(from_embeds.logits, from_ids.logits):
            torch.testing.assert_close(a, b)
    # continuing from embeddings with the returned cache: the embeddings of everything so far, and the cache
    whole = model.generate(inputs_embeds=embeds, max_new_tokens=6, **greedy).sequences
    first = model.generate(inputs_embeds=embeds, max_new_tokens=4, **greedy)
    so_far = torch.cat([embeds, model.get_input_embeddings()(first.sequences)], dim=1)
    rest = model.generate(inputs_embeds=so_far, cache=getattr(first, CACHE_FIELD), max_new_tokens=2, **greedy).sequences
    assert torch.equal(torch.cat([first.sequences, rest], dim=1), whole)
    with pytest.raises(ValueError, match="inputs_embeds with a padded attention_mask"):
        model.generate(inputs_embeds=embeds, attention_mask=torch.tensor([[1] * 9, [1] * 5 + [0] * 4]), max_new_tokens=2)


# 3. config-level output defaults; hidden states


def _manual_hidden_states(model: PoolformerModel, ids):
    """The embeddings, then each full-length block's output, computed block by block outside the model."""
    x = model.get_input_embeddings()(ids)
    body = model.body
    states, h = [x], x
    for block in body.down:
        h = block(h)
        states.append(h)
    coarse = body.inner(body.down_pool(h))
    h = h + F.pad(body.up_pool(coarse), (0, 0, body.shift, 0))[:, : h.shape[1]]
    for block in body.up:
        h = block(h)
        states.append(h)
    states[-1] = model.norm_f(h)
    return states


@pytest.mark.compat
def test_config_output_defaults_and_hidden_states():
    config = tiny(layers_per_level=[2, 1, 1])
    model = PoolformerModel(config).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert model(ids).hidden_states is None
        model.config.output_hidden_states = True
        out = model(ids)
        assert config.num_hidden_layers == 8 and len(out.hidden_states) == 9  # 4 down + 4 up blocks at full length
        for got, want in zip(out.hidden_states, _manual_hidden_states(model, ids)):
            torch.testing.assert_close(got, want)
        assert out.hidden_states[-1] is out.last_hidden_state
        assert model(ids, output_hidden_states=False).hidden_states is None  # the call's argument wins
        model.config.return_dict = False
        tuple_out = model(ids)
        assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], out.last_hidden_state)
        assert not isinstance(model(ids, return_dict=True), tuple)
        lm = PoolformerForCausalLM(config).eval()
        lm.config.return_dict = False
        assert isinstance(lm(ids), tuple)
    flat = PoolformerModel(tiny(pooling_factors=[], layers_per_level=3))  # no pooling: every block
    assert flat.config.num_hidden_layers == 6 and len(flat(ids, output_hidden_states=True).hidden_states) == 7


@pytest.mark.compat
def test_hidden_states_keep_their_gradients():
    model = PoolformerModel(tiny())
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids, output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    out.last_hidden_state[:, 3].sum().backward()
    assert all(h.grad is not None for h in out.hidden_states)
    assert torch.all(out.hidden_states[0].grad[:, 4:] == 0) and out.hidden_states[0].grad[:, :4].abs().sum() > 0  # causal
    # the same gradient as through embeddings passed in with requires_grad
    embeds = model.get_input_embeddings()(ids).requires_grad_()
    model(inputs_embeds=embeds).last_hidden_state[:, 3].sum().backward()
    torch.testing.assert_close(out.hidden_states[0].grad, embeds.grad)


def test_hidden_states_of_a_time_chunked_forward_are_whole():
    plain = PoolformerForCausalLM(tiny(pooling_factors=[2], conv1d_width=3)).train()
    chunked = PoolformerForCausalLM(tiny(pooling_factors=[2], conv1d_width=3, checkpoint_chunk_size=6)).train()
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 256, (2, 20))
    a, b = (m(ids, output_hidden_states=True).hidden_states for m in (plain, chunked))
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


# 4. the config fields every decoder declares


@pytest.mark.compat
def test_the_common_config_fields(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = PoolformerConfig(eos_token_id=None, pad_token_id=None, use_cache=True)
    assert (config.eos_token_id, config.pad_token_id, config.use_cache) == (None, None, True)
    assert config.num_hidden_layers == 16  # SC09: 4 down + 4 up (RG-LRU, MLP) pairs at full length
    config = tiny(eos_token_id=[3, 4], pad_token_id=0, use_cache=False)
    config.save_pretrained(tmp_path)
    loaded = PoolformerConfig.from_pretrained(tmp_path)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.use_cache) == ([3, 4], 0, False)
    assert "num_hidden_layers" not in loaded.to_dict()  # derived, not stored
    config.num_hidden_layers = 4  # the value it has
    with pytest.raises(ValueError, match=r"num_hidden_layers=3 .*pooling_factors and layers_per_level"):
        config.num_hidden_layers = 3


@pytest.mark.compat
def test_use_cache_follows_the_config():
    ids = torch.randint(0, 256, (1, 6))
    model = PoolformerForCausalLM(tiny()).eval()
    with torch.no_grad():
        cached = model(ids)
        assert cached.cache is not None and cached.cache.get_seq_length() == 6
        step = model(ids[:, :1], cache=cached.cache).logits
        torch.testing.assert_close(step, model(torch.cat([ids, ids[:, :1]], 1)).logits[:, -1:])
        assert model(ids, use_cache=False).cache is None
        model.config.use_cache = False
        assert model(ids).cache is None
    model.config.use_cache = True
    assert model.train()(ids).cache is None  # training builds no cache


# 5. a body checkpoint under a head class, and the reverse


@pytest.mark.compat
def test_a_body_checkpoint_loads_under_the_head_class(tmp_path):
    body = PoolformerModel(tiny())
    body.save_pretrained(tmp_path / "body")
    with pytest.warns(UserWarning, match=r"no lm_head.bias, lm_head.weight.*newly initialised"):
        lm, info = PoolformerForCausalLM.from_pretrained(tmp_path / "body", output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["lm_head.bias", "lm_head.weight"]
    for (name, a), (_, b) in zip(body.state_dict().items(), lm.model.state_dict().items()):
        assert torch.equal(a, b), name
    weight = lm.lm_head.weight  # initialised as the head's init (truncated LeCun normal, zero bias), not left empty
    assert torch.isfinite(weight).all() and torch.all(lm.lm_head.bias == 0)
    assert abs(weight.std().item() - 16**-0.5) < 0.2 * 16**-0.5

    lm.save_pretrained(tmp_path / "lm")  # the reverse: the head's checkpoint under the body's class
    back, info = PoolformerModel.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert not info["missing_keys"] and {"lm_head.weight", "lm_head.bias"} <= set(info["unexpected_keys"])
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).last_hidden_state, body(ids).last_hidden_state)
        again = PoolformerForCausalLM.from_pretrained(tmp_path / "lm")  # a round trip keeps the head
        torch.testing.assert_close(again(ids).logits, lm(ids).logits)


@pytest.mark.compat
def test_a_checkpoint_lacking_body_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    PoolformerForCausalLM(tiny()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm_f.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for cls in (PoolformerForCausalLM, PoolformerModel):
        with pytest.raises(ValueError, match=r"lacks 1 weights of .*body \(.*norm_f.weight\).*allow_missing_weights"):
            cls.from_pretrained(tmp_path)


# 6. pre-shifted labels, the Trainer's item count, unknown keywords


@pytest.mark.compat
def test_shift_labels_and_num_items_in_batch():
    model = PoolformerForCausalLM(tiny()).eval()
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        logits = model(ids).logits
        by_labels = model(ids, attention_mask=mask, labels=ids)
        by_shift = model(ids, attention_mask=mask, shift_labels=shifted)
        torch.testing.assert_close(by_shift.loss, by_labels.loss)
        torch.testing.assert_close(by_shift.sample_nll, by_labels.sample_nll)
        # shift_labels replace labels: here every position predicts 0, the last one included
        zeros = torch.zeros_like(ids)
        want = F.cross_entropy(logits.reshape(-1, 256), zeros.reshape(-1))
        torch.testing.assert_close(model(ids, labels=ids, shift_labels=zeros).loss, want)
        summed = F.cross_entropy(logits.reshape(-1, 256), zeros.reshape(-1), reduction="sum")
        torch.testing.assert_close(model(ids, shift_labels=zeros, num_items_in_batch=torch.tensor(7)).loss, summed / 7)
        with pytest.raises(ValueError, match=r"shift_labels must have the shape"):
            model(ids, shift_labels=zeros[:, 1:])


@pytest.mark.compat
def test_unknown_keywords_raise_naming_them():
    ids = torch.randint(0, 256, (1, 5))
    for model in (PoolformerForCausalLM(tiny()), PoolformerModel(tiny())):
        name = type(model).__name__
        with pytest.raises(TypeError, match=rf"{name}\.forward\(\) got unexpected keyword argument 'lables'"):
            model(ids, lables=ids)
        with pytest.raises(TypeError, match=r"arguments 'a', 'b'"):
            model(ids, b=1, a=2)
        model(ids, cache_position=torch.arange(5), output_attentions=False)  # what transformers may pass
        with pytest.raises(ValueError, match="output_attentions=True: Poolformer has no attention"):
            model(ids, output_attentions=True)


# 7. transformers' activation checkpointing layers


@pytest.mark.compat
@pytest.mark.parametrize("reentrant", [False, True])
def test_blocks_are_transformers_checkpointing_layers(reentrant):
    plain = PoolformerForCausalLM(tiny(conv1d_width=2)).train()
    ckpt = PoolformerForCausalLM(tiny(conv1d_width=2)).train()
    ckpt.load_state_dict(plain.state_dict())
    blocks = [m for m in ckpt.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(blocks) == 10 and all(isinstance(b, PoolformerResidualBlock) for b in blocks)
    assert not ckpt.is_gradient_checkpointing
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert ckpt.is_gradient_checkpointing and all(b.gradient_checkpointing for b in blocks)
    assert all(b._gradient_checkpointing_func.keywords == {"use_reentrant": reentrant} for b in blocks)
    calls = []
    lru = ckpt.model.body.down[0].layer
    lru.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 256, (2, 12))
    for model in (plain, ckpt):
        model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the forward, and the recomputation in backward
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    ckpt.gradient_checkpointing_disable()
    assert not ckpt.is_gradient_checkpointing and not any(b.gradient_checkpointing for b in blocks)


@pytest.mark.compat
def test_blocks_with_carried_state_are_not_recomputed():
    # time chunks carry the recurrent state: with block checkpointing on too, a recomputed block would read the state
    # it wrote; such blocks run without it and the gradients stay exact
    plain = PoolformerForCausalLM(tiny(pooling_factors=[2], conv1d_width=3)).train()
    both = PoolformerForCausalLM(tiny(pooling_factors=[2], conv1d_width=3, checkpoint_chunk_size=8,
                                      activation_checkpointing=True)).train()
    both.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 256, (2, 30))
    for model in (plain, both):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), both.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(b.gradient_checkpointing for b in both.modules() if isinstance(b, PoolformerResidualBlock))


# 8. (issue 35, item 15) a truncated or garbled safetensors file


@pytest.mark.compat
@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty"])
def test_an_unreadable_weights_file_is_named(tmp_path, damage):
    PoolformerForCausalLM(tiny()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbled": b"\xff" * 8 + data[8:], "empty": b""}[damage])
    with pytest.raises(OSError, match=rf"{path}.*truncated or corrupt.*download it again"):
        PoolformerForCausalLM.from_pretrained(tmp_path)

