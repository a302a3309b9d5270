"""The suite's environment (offline, Triton's interpreter on CPU) and fixtures; the helpers that test modules import
are in helpers.py."""

import os

# tests never reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
