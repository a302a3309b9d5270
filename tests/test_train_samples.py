"""train.py when writing samples fails: the run still exports its model, model card and summary, then exits 1."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import HUB_CONFIGS, ROOT


@pytest.mark.integration
def test_failed_sample_writing_still_exports_then_exits_nonzero(cache_dir, tmp_path):
    # a generation setting that loads but that generate refuses: 4 samples cannot come from 2 beams
    config = tmp_path / "tiny-two-beams"
    shutil.copytree(HUB_CONFIGS / "tiny", config)
    settings = json.loads((config / "generation_config.json").read_text())
    (config / "generation_config.json").write_text(json.dumps({**settings, "num_beams": 2}))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "HF_ENDPOINT"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training" / "train.py"), "--model_config", str(config), "--cache_dir",
         str(cache_dir), "--output_dir", str(out), "--max_steps", "2", "--eval_every", "2", "--max_eval_batches", "1",
         "--seq_len", "1200", "--batch_size", "4", "--num_samples", "4", "--sample_seconds", "0.01",
         "--sample_every", "1", "--log_with", "none", "--warmup_steps", "1"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    # reported, with the cause, after everything was written
    assert "writing samples failed" in proc.stderr and "num_return_sequences" in proc.stderr
    assert "generating 4 samples of 160 steps" in proc.stderr  # the line before the sampling phase
    model = out / "model"
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= {p.name for p in model.iterdir()}
    assert not (model / "samples").exists()
    assert "Writing samples failed: ValueError" in (model / "README.md").read_text()
    summary = json.loads((out / "train_summary.json").read_text())
    errors = summary["sample_errors"]
    assert summary["steps"] == 2 and len(errors) == 3  # steps 1 and 2 during training, then the export
    assert errors[0].startswith("step 1: ValueError") and errors[-1].startswith("export: ValueError")
