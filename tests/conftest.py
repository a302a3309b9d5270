import os
import sys
from pathlib import Path

# tests never reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_poolformer import PoolformerConfig  # noqa: E402

HUB_CONFIGS = ROOT / "hub_configs"
HUB_CONFIG_NAMES = sorted(p.name for p in HUB_CONFIGS.iterdir() if (p / "config.json").exists())


def shrink(config: PoolformerConfig, **overrides) -> PoolformerConfig:
    """The same architecture (pooling factors, kinds, flags) at a width that runs in milliseconds."""
    fields = config.to_dict()
    width = 8
    fields.update(
        hidden_size=width,
        lru_width=width,
        num_gate_blocks=2,
        pooling_groups=1 if config.pooling_groups == 1 else width,
        layers_per_level=1,
        dropout=0.0,
    )
    fields.update(overrides)
    for key in ("auto_map", "transformers_version", "model_type"):
        fields.pop(key, None)
    return PoolformerConfig(**fields)


def hub_config(name: str, **overrides) -> PoolformerConfig:
    return shrink(PoolformerConfig.from_pretrained(HUB_CONFIGS / name), **overrides)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
