"""The README's Python snippets run, in order, as one session: a renamed argument or function cannot leave the README
wrong. They run in a folder holding what they name (`runs/digits/model`, a digit classifier, the `training`
package's evaluate modules) with the names they take as given (`input_ids`, `logits`, `labels`, `generated`,
`train_clips`); `16000` (one second of samples) becomes `160` so the session takes seconds."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, hub_model

PRELUDE = """
import torch
torch.manual_seed(0)
input_ids = torch.randint(0, 256, (2, 300))
input_ids[:, 0] = 128
logits, labels = torch.randn(2, 300, 256), input_ids.clone()
generated, train_clips = [torch.randn(16000).clamp(-1, 1) * 0.3 for _ in range(8)], [torch.randn(16000) * 0.3 for _ in range(8)]
"""


def readme_snippets() -> list:
    """Every ```python block of the README (indented ones too, as in list items), dedented."""
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)]


def test_the_readme_has_python_snippets():
    assert len(readme_snippets()) >= 3


@pytest.mark.integration
def test_readme_snippets_run(tmp_path):
    from training.metrics import DigitClassifier

    hub_model("tiny").save_pretrained(tmp_path / "runs" / "digits" / "model")
    DigitClassifier().save(tmp_path / "sc09_classifier.safetensors")
    (tmp_path / "training").symlink_to(ROOT / "training")
    session = PRELUDE + "\n".join(re.sub(r"\b16000\b", "160", s).replace("    ...", "    pass")
                                  for s in readme_snippets())
    (tmp_path / "session.py").write_text(session)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")}
    run = subprocess.run([sys.executable, "session.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, session + "\n" + run.stderr[-4000:]
    assert (tmp_path / "samples" / "digit_3.wav").exists() and (tmp_path / "live.wav").exists()


def test_the_readme_prompts_with_a_file_the_quick_start_writes():
    # `--prompt speech.wav` named a file nobody has; the quick start's run leaves its samples in the model folder
    from training.train import TrainArguments

    prompts = re.findall(r"--prompt (\S+)", (ROOT / "README.md").read_text())
    assert prompts
    written = {f"runs/digits/model/samples/sample_{i}.wav" for i in range(TrainArguments.num_samples)}
    assert set(prompts) <= written, prompts
