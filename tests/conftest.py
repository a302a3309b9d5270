"""Shared test helpers. The suite runs against the installed packages (`pip install -e ".[test]"`): nothing here
edits sys.path."""

import os
from pathlib import Path

# tests never reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import GenerationConfig  # noqa: E402

from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM  # noqa: E402

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


# the compiled decoding step is one code object for every model a process decodes with, and Dynamo's default of 8
# compilations per code object is reached when one pytest process decodes tiny models of many shapes and batch sizes
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write into: mode 0o555, and for root (whom modes do not stop) immutable as well."""
    import subprocess

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no folder is read-only")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The built-in spoken-digit set, rendered once (espeak-ng) where train.py's --cache_dir finds it."""
    from training.spoken_digits import make_spoken_digits

    cache = tmp_path_factory.mktemp("cache")
    make_spoken_digits(cache / "spoken_digits_v1")
    return cache
