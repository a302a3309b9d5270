"""Config fields: hub configs load, every invalid value raises a ValueError naming the field."""

import pytest
from transformers import AutoModelForCausalLM

from helpers import HUB_CONFIG_NAMES, HUB_CONFIGS
from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM


def test_hub_configs_load_and_sc09_size():
    assert {"sc09", "beethoven", "youtubemix", "tiny", "sc09-no-pooling", "sc09-pool-2", "sc09-pool-2-4",
            "sc09-real-rglru", "sc09-no-gating", "sc09-rmsnorm", "sc09-groups-1", "sc09-long-skips"} <= set(HUB_CONFIG_NAMES)
    config = PoolformerConfig.from_pretrained(HUB_CONFIGS / "sc09")
    assert config.model_type == "poolformer_audio"
    assert config.pooling_factors == [2, 4, 4, 5] and config.hidden_size == 128
    model = PoolformerForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 7_272_704  # the author's code; the thesis' "~7.3M"


INVALID = [
    ("vocab_size", 1),
    ("hidden_size", 0),
    ("hidden_size", 7),
    ("pooling_factors", [2, 0]),
    ("pooling_factors", [1]),
    ("pooling_factors", 4),
    ("layers_per_level", 0),
    ("layers_per_level", [4, 4]),
    ("lru_width", 0),
    ("lru_width", 255),
    ("complex_recurrence", "yes"),
    ("num_gate_blocks", 3),
    ("num_gate_blocks", 0),
    ("recurrence_scale", 0),
    ("r_min", 1.5),
    ("r_max", 0.5),
    ("max_phase", -1),
    ("conv1d_width", -1),
    ("conv1d_groups", 3),
    ("conv1d_groups", 0),
    ("mlp_expansion", 0),
    ("gated", 1),
    ("hidden_act", "gelu_tanh"),
    ("norm", "batch"),
    ("norm_eps", 0),
    ("pooling", "max"),
    ("pooling_groups", 3),
    ("pooling_groups", 0),
    ("causal_shift", "none"),
    ("skip", "medium"),
    ("embedding", "onehot"),
    ("dropout", 1.0),
    ("sqrt_max_gradient", 0),
    ("scan_implementation", "cuda"),
    ("scan_chunk_size", -2),
    ("fused_rglru", "yes"),
    ("activation_checkpointing", "yes"),
    ("checkpoint_chunk_size", -1),
    ("checkpoint_chunk_size", 16.5),
    ("sample_rate", 0),
    ("quantization", "a-law"),
    ("output_head", "softmax-65536"),
    ("bos_token_id", 256),
    ("eos_token_id", 256),
    ("eos_token_id", []),
    ("pad_token_id", -1),
    ("use_cache", "yes"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"PoolformerConfig\.{field}=.*expected"):
        PoolformerConfig(**{field: value})


def test_every_field_has_an_invalid_case_and_a_docstring_line():
    fields = set(PoolformerConfig().to_diff_dict()) | {
        name for name in PoolformerConfig.__init__.__code__.co_varnames if not name.startswith("_")
    }
    fields -= {"self", "kwargs", "tie_word_embeddings", "architectures", "transformers_version", "model_type",
               "auto_map", "is_int", "is_num", "is_bool", "need"}
    fields &= set(PoolformerConfig.__init__.__code__.co_varnames[1 : PoolformerConfig.__init__.__code__.co_argcount])
    tested = {f for f, _ in INVALID}
    assert fields - tested == set(), f"fields without an invalid-value test: {fields - tested}"
    for field in fields:
        assert f"{field} (" in PoolformerConfig.__doc__, f"{field} is not documented"


def test_tied_embeddings_refused():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        PoolformerConfig(tie_word_embeddings=True)


def test_overrides_and_later_edits_are_validated(tmp_path):
    PoolformerConfig.from_pretrained(HUB_CONFIGS / "tiny").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"PoolformerConfig\.hidden_size=-4"):
        PoolformerConfig.from_pretrained(tmp_path, hidden_size=-4)
    with pytest.raises(ValueError, match=r"PoolformerConfig\.quantization='a-law'"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization="a-law")
    config = PoolformerConfig.from_pretrained(tmp_path, dropout=0.3)  # a valid override is applied
    assert config.dropout == 0.3
    config.pooling_groups = 5
    with pytest.raises(ValueError, match=r"PoolformerConfig\.pooling_groups=5"):
        PoolformerForCausalLM(config)


@pytest.mark.parametrize("width", [32, 96, 200])
def test_the_defaults_build_at_any_even_width(width):
    config = PoolformerConfig(hidden_size=width, lru_width=64, num_gate_blocks=4, layers_per_level=1)
    assert config.pooling_groups == width  # depthwise pooling, whatever the width
    model = PoolformerForCausalLM(config)
    assert model.model.body.down_pool.proj.groups == width


def test_every_error_comes_from_the_rule_table():
    from modeling_poolformer.configuration_poolformer import _RULES

    assert [field for field, _, _ in _RULES] == list(dict.fromkeys(field for field, _, _ in _RULES))  # once each
    assert {f for f, _ in INVALID} <= {field for field, _, _ in _RULES}


def test_a_key_close_to_a_field_warns():
    for typo, field in [("pooling_group", "pooling_groups"), ("drpout", "dropout"), ("hiden_size", "hidden_size"),
                        ("causal_shfit", "causal_shift")]:
        with pytest.warns(UserWarning, match=f"unknown key '{typo}'.*did you mean '{field}'"):
            PoolformerConfig(**{typo: 1})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' own keys and far-off ones are kept quietly
        PoolformerConfig(architectures=["PoolformerForCausalLM"], my_note="x")
