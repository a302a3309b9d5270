"""Evaluation: NLL convention shared with training, the digit classifier, sample-quality metric sanity, the
depth analysis."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import FAST, ROOT, env, run, summary
from training.data import load_splits
from training.metrics import DigitClassifier, am_score, modified_inception_score, sample_quality
from training.train_classifier import DigitClips
from training.train_classifier import main as train_classifier

SCRIPTS = ROOT / "training"


@pytest.fixture(scope="module")
def digits(cache_dir):
    return cache_dir / "spoken_digits_v1"  # rendered once per session (conftest)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(["--dataset", str(digits), *FAST, "--max_steps", "3", "--eval_every", "3", "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    accuracy = train_classifier(["--dataset", str(digits), "--out", str(path), "--epochs", "16"])
    return path, accuracy


def evaluate(args):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "evaluate.py"), *args], capture_output=True, text=True,
                          env=env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.integration
def test_evaluate_nll_equals_training_validation_and_ignores_batch_size(trained, digits, tmp_path):
    val_bits = summary(trained)["val_bits_per_sample"]
    results = []
    for batch_size in ("1", "7"):
        out = tmp_path / f"eval{batch_size}.json"
        evaluate(["--model", str(trained / "model"), "--dataset", str(digits), "--split", "validation",
                  "--seq_len", "1200", "--batch_size", batch_size, "--out", str(out)])
        results.append(json.loads(out.read_text()))
    for r in results:
        assert r["nll_bits_per_sample"] == pytest.approx(val_bits, rel=1e-6)
        assert r["split"] == "validation" and "unmasked" in r["nll_convention"]
    assert results[0]["predicted_samples"] == results[1]["predicted_samples"] > 0


@pytest.mark.integration  # a heavy end-to-end check: the integration tier
def test_classifier_beats_chance_and_reloads(classifier, tmp_path):
    path, accuracy = classifier
    assert accuracy["validation"] >= 0.5 and accuracy["test"] >= 0.3  # chance is 0.1
    model = DigitClassifier.load(path)
    state = {k: v for k, v in model.state_dict().items()}
    state["__config__"] = json.dumps(model.config)
    torch.save(state, tmp_path / "classifier.pt")  # a torch file, loaded with weights_only=True
    again = DigitClassifier.load(tmp_path / "classifier.pt")
    wave = torch.randn(2, 16000) * 0.1
    torch.testing.assert_close(again(wave), model(wave))
    with pytest.raises(ValueError, match="not a DigitClassifier"):
        torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
        DigitClassifier.load(tmp_path / "other.pt")


@pytest.mark.integration  # a heavy end-to-end check: the integration tier
def test_metric_sanity_on_real_audio(classifier, digits):
    model = DigitClassifier.load(classifier[0])
    _, splits = load_splits(str(digits), "sc09")
    clips = DigitClips(splits["train"])
    waves = torch.stack([clips[i][0] for i in range(len(clips))])
    labels = torch.tensor(clips.labels)
    same = sample_quality(model, waves, waves)
    noise = sample_quality(model, torch.randn(len(waves), 16000) * 0.3, waves)
    assert abs(same["fid"]) < 1e-3 * max(1.0, noise["fid"])
    assert noise["fid"] > 100 * max(same["fid"], 1e-3)

    one_class = waves[labels == 3]
    single = sample_quality(model, one_class, waves)
    assert single["is"] < 1.5

    # a balanced set of confidently and correctly classified clips: IS close to the 10 classes
    with torch.no_grad():
        probs = model(waves).softmax(-1)
    sure = (probs.max(-1).values > 0.95) & (probs.argmax(-1) == labels)
    per_class = min(int((sure & (labels == c)).sum()) for c in range(10))
    assert per_class >= 3, "the classifier is not confident enough on its own training clips"
    balanced = torch.cat([waves[sure & (labels == c)][:per_class] for c in range(10)])
    good = sample_quality(model, balanced, waves)
    assert good["is"] > 8.0, good
    assert good["mis"] > single["mis"] * 5
    assert good["am"] < single["am"]  # AM: the class balance of the train set is matched
    assert sum(same["class_histogram"]) == len(waves)


def test_mis_and_am_by_hand():
    confident = torch.eye(4).repeat(5, 1).double()
    uniform = torch.full((20, 4), 0.25, dtype=torch.float64)
    assert modified_inception_score(uniform) == pytest.approx(1.0)
    assert modified_inception_score(confident) > 1e3
    assert am_score(confident, confident) == pytest.approx(0.0, abs=1e-6)
    assert am_score(confident, uniform) == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-6)


@pytest.mark.integration
def test_evaluate_quality_protocol_end_to_end(trained, digits, classifier, tmp_path):
    out = tmp_path / "quality.json"
    evaluate(["--model", str(trained / "model"), "--dataset", str(digits), "--no_nll", "--quality",
              "--classifier", str(classifier[0]), "--num_generate", "10", "--seconds", "0.05", "--trim",
              "--num_reference", "40", "--out", str(out)])
    q = json.loads(out.read_text())["quality"]
    assert {"fid", "is", "mis", "am", "generation"} <= set(q)
    assert "temperature 1" in q["generation"] and "ranks 40%-95% (5 clips)" in q["generation"]
    assert sum(q["class_histogram"]) == 5


@pytest.mark.integration
def test_analyze_writes_stats_and_png(trained, digits, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "analyze.py"), "--model", str(trained / "model"),
                           "--dataset", str(digits), "--num_clips", "4", "--seq_len", "1200",
                           "--out", str(tmp_path / "decay.png"), "--json", str(tmp_path / "decay.json")],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "decay.json").read_text())
    assert len(stats) == 5 and {s["level"] for s in stats} == {0, 1, 2}
    for s in stats:
        for key in ("at_r1", "on_data"):
            assert 0 < s[key]["q1"] <= s[key]["median"] <= s[key]["q3"] < 1
    png = (tmp_path / "decay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "|a| at r=1" in proc.stdout


@pytest.mark.integration
def test_validation_nll_counts_every_item_once_under_data_parallelism(tmp_path):
    # 5 items over 2 ranks (accelerate's debug launcher, in a fresh process: forking this one, with its thread
    # pools, can hang): accelerate repeats items to even out the last batch; they must not count twice
    script = textwrap.dedent(f"""
        import json, torch
        from accelerate import Accelerator, debug_launcher
        from modeling_poolformer import PoolformerConfig, PoolformerForCausalLM
        from training.metrics import nll_bits

        def rank():
            accelerator = Accelerator(cpu=True)
            torch.manual_seed(0)
            model = PoolformerForCausalLM(PoolformerConfig.from_pretrained({str(ROOT / "hub_configs" / "tiny")!r}))
            items = [dict(input_ids=torch.randint(0, 256, (30,)), attention_mask=torch.ones(30, dtype=torch.long))
                     for _ in range(5)]
            for item in items:
                item["labels"] = item["input_ids"].clone()
            loader = torch.utils.data.DataLoader(items, batch_size=2)
            alone = nll_bits(model, loader)  # every rank: all 5 items in one process
            shared = nll_bits(model, accelerator.prepare(loader), accelerator)
            if accelerator.is_main_process:
                open({str(tmp_path / "nll.json")!r}, "w").write(json.dumps(dict(alone=alone, shared=shared)))

        debug_launcher(rank, num_processes=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "nll.json").read_text())
    assert result["shared"][2] == result["alone"][2] == 5 * 29
    # float32 logits of differently shaped batches round differently (~1e-8 here); an item counted twice moves ~1%
    assert result["shared"][0] == pytest.approx(result["alone"][0], rel=1e-6)


@pytest.mark.integration  # a heavy end-to-end check: the integration tier
def test_evaluate_modules_load_and_match_the_scripts(trained, digits, classifier):
    # bits_per_sample and sc09_quality through `evaluate.load`, against the code the scripts use
    import evaluate

    from modeling_poolformer import PoolformerForCausalLM
    from training.metrics import nll_bits

    model = PoolformerForCausalLM.from_pretrained(trained / "model").eval()
    _, splits = load_splits(str(digits), "sc09")
    clips = DigitClips(splits["validation"])
    items = [clips.tokens[i] for i in range(6)]
    loader = torch.utils.data.DataLoader(items, batch_size=3)
    metric = evaluate.load(str(ROOT / "training" / "evaluate_modules" / "bits_per_sample"))
    with torch.no_grad():
        for batch in loader:
            metric.add_batch(predictions=model(batch["input_ids"]).logits.numpy(), references=batch["labels"].numpy())
    got = metric.compute()
    want = nll_bits(model, loader)
    assert got["predicted_samples"] == want[2] and got["bits_per_sample"] == pytest.approx(want[0], rel=1e-5)

    quality = evaluate.load(str(ROOT / "training" / "evaluate_modules" / "sc09_quality"))
    waves = torch.stack([clips[i][0] for i in range(20)])
    got = quality.compute(predictions=waves[:10].numpy(), reference_waveforms=waves.numpy(),
                          classifier=str(classifier[0]))
    want = sample_quality(DigitClassifier.load(classifier[0]), waves[:10], waves)
    for key in ("fid", "is", "mis", "am"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("rate,n_fft", [(16000, 400), (8000, 256)])
def test_the_mel_filterbank_is_the_htk_triangles_it_replaced(rate, n_fft):
    # librosa's filters against the hand-written HTK triangles the classifier used before (float32, peak 1)
    from training.metrics import N_MELS, mel_filterbank

    def to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = to_hz(torch.linspace(to_mel(torch.tensor(20.0)), to_mel(torch.tensor(rate / 2)), N_MELS + 2))
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    want = torch.clamp(torch.minimum((freqs[:, None] - lower) / (center - lower),
                                     (upper - freqs[:, None]) / (upper - center)), min=0.0)
    got = mel_filterbank(n_fft // 2 + 1, N_MELS, rate)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
