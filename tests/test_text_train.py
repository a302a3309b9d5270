"""A byte model end to end, each script run as a process: train.py on a small byte corpus (the standard library's own
sources, built offline), evaluate.py (bits/byte beside the compressors), sample.py with a text prompt, a reload by
remote code; and a streamed byte run stopped and resumed that ends with the uninterrupted run's weights."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import ROOT

FAST = ["--model_config", str(ROOT / "hub_configs" / "tiny-bytes"), "--seq_len", "256", "--batch_size", "4",
        "--num_samples", "2", "--sample_bytes", "48", "--log_with", "none", "--warmup_steps", "2"]


def _env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_ENDPOINT"))}
    e.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    e.update(extra)
    return e


def _script(name, *args, timeout=600, **extra_env):
    proc = subprocess.run([sys.executable, str(ROOT / "training" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(**extra_env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The json package's sources: a few documents of real text, on every machine that runs Python."""
    folder = tmp_path_factory.mktemp("corpus") / "docs"
    folder.mkdir()
    for path in sorted(Path(json.__file__).parent.glob("*.py")):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.integration
def test_byte_model_trains_evaluates_samples_and_reloads(corpus, tmp_path):
    out = tmp_path / "run"
    _script("train.py", *FAST, "--dataset", str(corpus), "--cache_dir", str(tmp_path / "cache"), "--output_dir",
            str(out), "--max_steps", "40", "--eval_every", "40", "--learning_rate", "3e-3")
    summary = json.loads((out / "train_summary.json").read_text())
    history = dict(summary["val_history"])
    assert summary["protocol"] == "bytes"
    assert history[40] < history[0] - 1.0  # bits/byte fall from the uniform ~8 within 40 steps
    model = out / "model"
    card = (model / "README.md").read_text()
    assert "bytes" in card and "bits/byte" in card and "Hz" not in card
    samples = sorted((model / "samples").glob("sample_*.txt"))
    assert len(samples) == 2 and all(p.read_text(encoding="utf-8") for p in samples)
    assert not list((model / "samples").glob("*.wav"))

    result = tmp_path / "eval.json"
    proc = _script("evaluate.py", "--model", str(model), "--dataset", str(corpus), "--seq_len", "256", "--split",
                   "validation", "--cache_dir", str(tmp_path / "cache"), "--out", str(result))
    assert "bits/byte" in proc.stdout and "xz -9e" in proc.stdout
    report = json.loads(result.read_text())
    assert report["nll_bits_per_byte"] == pytest.approx(history[40], abs=1e-6)  # train.py's validation, same bytes
    assert report["compressors"]["bytes"] == report["predicted_samples"]

    proc = _script("sample.py", "--model", str(model), "--prompt", "import json", "--num_bytes", "30",
                   "--num_samples", "2", "--out", str(tmp_path / "samples"))
    written = sorted((tmp_path / "samples").glob("sample_*.txt"))
    assert len(written) == 2 and all(p.read_text(encoding="utf-8").startswith("import json") for p in written)
    assert json.loads((tmp_path / "samples" / "generation.json").read_text())["num_bytes"] == 30

    load = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(model)!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        ids = m.generate(m.encode_text("def "), max_new_tokens=8, do_sample=False)
        print("TEXT", repr(m.decode_text(ids)[0]))
    """)
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "HF_MODULES_CACHE": str(tmp_path / "modules")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TEXT 'def " in proc.stdout


@pytest.mark.integration
def test_streamed_byte_run_resumes_exactly(corpus, tmp_path):
    common = [*FAST, "--dataset", str(corpus), "--cache_dir", str(tmp_path / "cache"), "--streaming",
              "--shuffle_buffer", "16", "--max_steps", "6", "--max_eval_batches", "1", "--eval_every", "100",
              "--num_samples", "1", "--sample_bytes", "4"]
    _script("train.py", *common, "--output_dir", str(tmp_path / "whole"))
    _script("train.py", *common, "--output_dir", str(tmp_path / "split"), "--stop_after_steps", "3")
    _script("train.py", *common, "--output_dir", str(tmp_path / "split"), "--resume_from_checkpoint", "latest")
    whole = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert whole.keys() == split.keys()
    assert all((whole[k] == split[k]).all() for k in whole)
