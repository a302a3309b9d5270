"""The supported transformers range: the cache under its new name (`cache`, transformers >= 5.24) and its old one
(`past_key_values`), one clear message outside the range, and CI's floor pins equal to pyproject's floors."""

import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import tomllib
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from helpers import ROOT, hub_model
from modeling_poolformer import PoolformerCache
from modeling_poolformer.configuration_poolformer import TESTED_TRANSFORMERS
from modeling_poolformer.outputs import CACHE_FIELD

pytestmark = pytest.mark.compat


def test_both_names_of_the_cache_work_in_forward_and_outputs():
    model = hub_model("sc09")
    ids = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :20], use_cache=True)
        cache = first.cache
        assert isinstance(cache, PoolformerCache) and getattr(first, CACHE_FIELD) is cache
        with warnings.catch_warnings():  # newer releases log a deprecation for the old name; it still reads
            warnings.simplefilter("ignore")
            assert first.past_key_values is cache and first["past_key_values"] is cache
        pieces = [first.logits]
        for t in range(20, 50):  # alternate the names: the same cache object either way
            name = "cache" if t % 2 else "past_key_values"
            out = model(ids[:, t : t + 1], **{name: cache})
            assert out.cache is cache
            pieces.append(out.logits)
        both = model.model(ids[:, :1], cache=PoolformerCache(model.config), past_key_values=None)
        assert both.cache.get_seq_length() == 1
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, :1], cache=PoolformerCache(model.config), past_key_values=PoolformerCache(model.config))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_takes_a_cache_by_either_name(name):
    model = hub_model()
    prompt = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        whole = model.generate(prompt, max_new_tokens=12, do_sample=False)
        cache = PoolformerCache(model.config)
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                             **{name: cache})
    assert getattr(out, CACHE_FIELD) is cache and cache.get_seq_length() == 9 + 11  # the prompt, then one step per new sample
    assert torch.equal(out.sequences, whole)


@pytest.mark.integration
def test_a_release_outside_the_range_gets_one_clear_message(tmp_path):
    from modeling_poolformer.configuration_poolformer import check_transformers_version

    oldest, newest = TESTED_TRANSFORMERS
    for version in ("4.57.1", "5.0.0rc1", "6.0.0"):
        with pytest.raises(ImportError, match=rf"transformers >= {oldest}, < 6 .*has transformers {version}"):
            check_transformers_version(version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version(oldest)
        check_transformers_version(newest)
    with pytest.warns(UserWarning, match=f"tested on transformers {oldest} to {newest}"):
        check_transformers_version("5.999.0")
    # and it is what importing the package (or a saved folder's code) does first
    script = textwrap.dedent("""
        import transformers
        transformers.__version__ = "4.57.1"
        try:
            import modeling_poolformer
        except ImportError as e:
            print("ImportError:", e)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ImportError: Poolformer needs transformers"), run.stderr


def test_the_installed_release_is_in_the_tested_range():
    assert Version(TESTED_TRANSFORMERS[0]) <= Version(transformers.__version__)


def test_ci_floor_pins_are_pyprojects_floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["train"]]:
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if lower:
            floors[req.name.lower().replace("-", "_")] = lower[0]
    pins = dict(re.findall(r"^([\w-]+)==(\S+)", (ROOT / ".ci" / "floor.txt").read_text(), flags=re.M))
    assert pins, "no pins in .ci/floor.txt"
    for name, version in pins.items():
        key = name.lower().replace("-", "_")
        assert key in floors, f"{name} is pinned in .ci/floor.txt but has no floor in pyproject.toml"
        assert Version(floors[key]) == Version(version), (name, floors[key], version)
    assert pins["transformers"] == TESTED_TRANSFORMERS[0]
