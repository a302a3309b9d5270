"""Helpers the test modules share (`from helpers import ...`): the repository's paths, the hub configs shrunk to a
width that runs in milliseconds, and train.py launched as a subprocess. The suite runs against the installed
packages (`pip install -e ".[test]"`): nothing here edits sys.path."""

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import GenerationConfig

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM

ROOT = Path(__file__).resolve().parent.parent
HUB_CONFIGS = ROOT / "hub_configs"
HUB_CONFIG_NAMES = sorted(p.name for p in HUB_CONFIGS.iterdir() if (p / "config.json").exists())
# one name per distinct model (configs that differ only in their generation settings are one model to test)
_first_of = {}
for _name in HUB_CONFIG_NAMES:
    _first_of.setdefault((HUB_CONFIGS / _name / "config.json").read_text(), _name)
MODEL_CONFIG_NAMES = list(_first_of.values())


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


def hub_model(name: str = "tiny", **overrides) -> PoolformerForCausalLM:
    """A shrunk hub config's model in eval mode, with that config's saved generation settings."""
    model = PoolformerForCausalLM(hub_config(name, **overrides)).eval()
    model.generation_config = GenerationConfig.from_pretrained(HUB_CONFIGS / name)
    return model


# train.py as a user runs it: a subprocess, offline, on one thread
TRAIN = str(ROOT / "training" / "train.py")
FAST = ["--seq_len", "1200", "--batch_size", "4", "--num_samples", "1", "--sample_seconds", "0.02",
        "--log_with", "none", "--warmup_steps", "2"]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_ENDPOINT"))}
    e.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.update(extra)
    return e


def run(args, timeout=600, **extra_env):
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          env=env(**extra_env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def summary(out):
    return json.loads((Path(out) / "train_summary.json").read_text())
