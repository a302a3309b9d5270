"""SC09 sample quality as SaShiMi's `test_speech_commands.py` computes it: our evaluator against the numbers that
script printed on the same classifier checkpoint and WAVs (tests/data/sashimi/README.md says how they were made)."""

import pickle
import re

import numpy as np
import pytest
import torch

from helpers import ROOT
from training.sashimi_eval import CifarResNeXt, classify, load_resnext, natural_key, sashimi_quality

pytest.importorskip("librosa")

DATA = ROOT / "tests" / "data" / "sashimi"


def printed_scores(path) -> dict:
    """{section: {FID, Inception, M Inception, AM}} from the script's output (a complex FID: its real part)."""
    sections, current = {}, None
    for line in path.read_text().splitlines():
        if line.strip().endswith("Scores") or "Scores (" in line:
            current = sections.setdefault(line.strip(), {})
        match = re.match(r"\s+(FID|Inception|M Inception|AM): \(?(-?\d+(?:\.\d*)?(?:e[-+]?\d+)?)", line)
        if match and current is not None:
            current[match.group(1)] = float(match.group(2))
        if "Best thresholds" in line:
            sections["thresholds"] = [float(x) for x in re.findall(r"np\.float64\(([0-9.]+)\)", line)]
    return sections


def _close(ours: dict, theirs: dict):
    names = {"fid": "FID", "is": "Inception", "mis": "M Inception", "am": "AM"}
    for key, name in names.items():
        # a set against itself has an FID of 0, which sqrtm of the singular covariance product returns as round-off
        # (-4.9e-5 in the script's run, -5.1e-5 with scipy 1.17.1): that noise, not a score, gets 1e-5
        small = 1e-5 if key == "fid" else 1e-6
        assert ours[key] == pytest.approx(theirs[name], rel=1e-4, abs=small), (key, ours[key], theirs[name])


@pytest.fixture(scope="module")
def ours():
    return sashimi_quality(DATA / "resnext_small.pth", DATA / "train", DATA / "test", DATA / "samples", threshold=True)


def test_reproduces_the_reference_scripts_scores(ours):
    got, want = ours, printed_scores(DATA / "reference_output.txt")
    _close(got["train_set"], want["Train Set Scores"])
    _close(got["test_set"], want["Test Set Scores"])
    _close(got["samples"], want["Sample Scores (no Threshold Tuning)"])
    assert got["train_accuracy"] == got["test_accuracy"] == pytest.approx(0.10)  # the script printed 10.000000%


def test_reproduces_the_reference_scripts_threshold_tuning(ours):
    got, want = ours, printed_scores(DATA / "reference_output_threshold.txt")
    assert got["samples_tuned"]["thresholds"] == pytest.approx(want["thresholds"])
    _close(got["samples_tuned"], want["Sample Scores (with Tuned Thresholds)"])


def test_waveforms_score_as_their_wav_files():
    import soundfile

    from training.sashimi_eval import sample_files

    files = sample_files(DATA / "samples")
    assert [f.name for f in files[:3]] == ["0.wav", "1.wav", "2.wav"] and files[10].name == "10.wav"
    import librosa

    model = load_resnext(DATA / "resnext_small.pth")
    waves = [librosa.load(f, sr=16000)[0] for f in files[:8]]
    for got, want in zip(classify(model, waves), classify(model, files[:8])):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert soundfile.info(files[0]).samplerate == 8000


def test_natural_order_matches_natsort():
    names = ["10.wav", "2.wav", "1.wav", "a10.wav", "a9.wav", "b.wav"]
    assert sorted(names, key=natural_key) == ["1.wav", "2.wav", "10.wav", "a9.wav", "a10.wav", "b.wav"]


def test_the_classifier_loads_without_running_pickled_code(tmp_path):
    model = load_resnext(DATA / "resnext_small.pth")
    assert isinstance(model, CifarResNeXt) and not model.training
    assert sum(p.numel() for p in model.parameters()) == 209_098

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")  # a pickle that would call a function when loaded
    with pytest.raises(ValueError, match="not a SaShiMi classifier checkpoint"):
        load_resnext(tmp_path / "evil.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "other.pth")  # a whole module of another kind
    with pytest.raises(ValueError, match="not a SaShiMi classifier checkpoint|holds a Linear"):
        load_resnext(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(pickle.dumps(np.arange(3)) + b"junk")
    with pytest.raises(ValueError, match="not a SaShiMi classifier checkpoint"):
        load_resnext(tmp_path / "junk.pth")


def _sc09_folder(tmp_path):
    """The fixture laid out as SC09: digit folders, validation/testing lists."""
    import shutil

    from training.sashimi_eval import CLASSES

    root = tmp_path / "sc09"
    for digit in CLASSES:
        (root / digit).mkdir(parents=True)
        for f in (DATA / "train" / digit).glob("*.wav"):
            shutil.copy(f, root / digit / f.name)
        shutil.copy(DATA / "test" / digit / "0.wav", root / digit / "t0.wav")
    shutil.copy(DATA / "samples" / "0.wav", root / "zero" / "v0.wav")
    (root / "testing_list.txt").write_text("".join(f"{d}/t0.wav\n" for d in CLASSES))
    (root / "validation_list.txt").write_text("zero/v0.wav\n")
    return root


@pytest.mark.integration
def test_evaluate_py_runs_sashimis_evaluator_on_an_sc09_folder(tmp_path):
    # the fixture laid out as SC09 (digit folders, validation/testing lists): evaluate.py --quality with the
    # ResNeXt file prints the reference script's numbers
    import json
    import subprocess
    import sys

    from helpers import hub_model

    root = _sc09_folder(tmp_path)
    hub_model().save_pretrained(tmp_path / "model")
    run = subprocess.run([sys.executable, str(ROOT / "training" / "evaluate.py"), "--model", str(tmp_path / "model"),
                          "--dataset", str(root), "--no_nll", "--quality", "--classifier",
                          str(DATA / "resnext_small.pth"), "--sample_dir", str(DATA / "samples"), "--threshold",
                          "--out", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    quality = json.loads((tmp_path / "eval.json").read_text())["quality"]
    assert "SaShiMi" in quality["evaluator"] and quality["num_samples"] == 24
    _close(quality["test_set"], printed_scores(DATA / "reference_output.txt")["Test Set Scores"])
    _close(quality["samples"], printed_scores(DATA / "reference_output.txt")["Sample Scores (no Threshold Tuning)"])
    tuned = printed_scores(DATA / "reference_output_threshold.txt")["Sample Scores (with Tuned Thresholds)"]
    _close(quality["samples_tuned"], tuned)


def test_sc09_out_of_a_speech_commands_style_dataset(tmp_path):
    # google/speech_commands' layout (parquet, 35 words in a class label, its own splits, audio as bytes), here the
    # fixture's clips plus other words: --protocol sc09 keeps the digits, and the evaluator scores them as it
    # scores the same clips in SC09 folders
    from datasets import Audio, ClassLabel, Dataset, Features, Value

    from training.data import load_splits
    from training.evaluate import sashimi_items
    from training.sashimi_eval import CLASSES

    words = ["yes", "no", "up", "down", *CLASSES, "_silence_"]
    features = Features({"file": Value("string"), "audio": {"bytes": Value("binary"), "path": Value("string")},
                         "label": ClassLabel(names=words)})
    (tmp_path / "sc" / "data").mkdir(parents=True)
    for split, folder in (("train", "train"), ("test", "test"), ("validation", "test")):
        rows = {"file": [], "audio": [], "label": []}
        for digit in CLASSES:
            for f in sorted((DATA / folder / digit).glob("*.wav")):
                rows["file"].append(f"{digit}/{f.name}")
                rows["audio"].append({"bytes": f.read_bytes(), "path": None})
                rows["label"].append(words.index(digit))
        rows["file"].append("yes/0.wav")  # not a digit: dropped
        rows["audio"].append({"bytes": (DATA / "samples" / "0.wav").read_bytes(), "path": None})
        rows["label"].append(0)
        ds = Dataset.from_dict(rows, features=features).cast_column("audio", Audio(decode=False))
        ds.to_parquet(str(tmp_path / "sc" / "data" / f"{split}-0.parquet"))
    protocol, splits = load_splits(str(tmp_path / "sc"), protocol="sc09", cache_dir=str(tmp_path / "cache"))
    assert protocol == "sc09" and {k: len(v) for k, v in splits.items()} == {"train": 20, "test": 10, "validation": 10}
    assert all(p.split("/")[0] in CLASSES for p in splits["train"]["path"])
    got = sashimi_quality(DATA / "resnext_small.pth", sashimi_items(splits["train"]), sashimi_items(splits["test"]),
                          DATA / "samples")
    want = printed_scores(DATA / "reference_output.txt")
    _close(got["test_set"], want["Test Set Scores"])
    _close(got["samples"], want["Sample Scores (no Threshold Tuning)"])


def test_clips_of_another_rate_reach_the_classifier_at_16khz():
    # the fixture's samples are 8 kHz WAVs: as generated clips of an 8 kHz model they must give the features of the
    # same audio at 16 kHz (what SaShiMi's evaluator computes from the files), not those of 8 kHz samples read as 16 kHz
    import librosa
    import soundfile

    from training.evaluate import to_classifier_rate
    from training.sashimi_eval import mel_features, sample_files

    for f in sample_files(DATA / "samples")[:4]:
        wave, rate = soundfile.read(f, dtype="float32")
        assert rate == 8000
        want = mel_features(f)  # librosa.load(sr=16000)
        clip = to_classifier_rate(torch.from_numpy(wave)[None], rate, 16000)[0]
        assert clip.shape == (16000,)
        np.testing.assert_allclose(clip[: 2 * len(wave)].numpy(), librosa.load(f, sr=16000)[0][:16000], atol=0.02)
        off = np.linalg.norm(mel_features(wave) - want) / np.linalg.norm(want)  # what evaluate.py fed it before
        assert np.linalg.norm(mel_features(clip.numpy()) - want) / np.linalg.norm(want) < 0.2 * off


@pytest.mark.integration
def test_evaluate_py_resamples_generated_clips_of_an_8khz_model(tmp_path, capsys):
    from helpers import hub_model
    from training.evaluate import main

    root = _sc09_folder(tmp_path)
    hub_model(sample_rate=8000).save_pretrained(tmp_path / "model")
    result = main(["--model", str(tmp_path / "model"), "--dataset", str(root), "--no_nll", "--quality", "--classifier",
                   str(DATA / "resnext_small.pth"), "--num_generate", "2", "--seconds",
                   "0.005", "--out", str(tmp_path / "eval.json")])
    assert "resampled from the model's 8000 Hz to the classifier's 16000 Hz" in result["quality"]["generation"]
    assert result["quality"]["num_samples"] == 2
    out = capsys.readouterr().out
    assert f"the results go to {tmp_path / 'eval.json'}" in out and "resampled from the model's 8000 Hz" in out


@pytest.mark.parametrize("flags,match", [
    (["--classifier", "{tmp}/empty.pth"], r"--classifier \S+empty.pth: not a classifier checkpoint"),
    (["--classifier", "{tmp}/pickle.safetensors"], r"--classifier \S+pickle.safetensors: not a classifier checkpoint"),
    (["--classifier", "{tmp}/empty.pth", "--threshold"], r"--classifier \S+empty.pth: not a classifier checkpoint"),
    (["--classifier", "{tmp}/small.safetensors", "--threshold"], "--threshold needs SaShiMi's ResNeXt classifier"),
    (["--sample_dir", "{tmp}/one"], r"--sample_dir \S+one holds 1 WAV file\(s\): 1 clip\(s\) would be scored"),
    (["--sample_dir", "{tmp}/none"], r"--sample_dir \S+none holds 0 WAV file\(s\): 0 clip"),
    (["--num_generate", "3", "--trim"], r"--num_generate 3: 1 clip\(s\) would be scored after --trim"),
    (["--num_generate", "4", "--threshold"], r"--num_generate 4: 1 clip\(s\) would be scored after --threshold's cut"),
    (["--sample_dir", "{tmp}/three", "--threshold"], r"holds 3 WAV file\(s\): 0 clip\(s\) .* after --threshold"),
    (["--out", "{tmp}"], "a folder; expected the path of the JSON file"),
    (["--out", "{tmp}/empty.pth/eval.json"], "empty.pth: a file is in the way"),
])
def test_evaluate_py_checks_every_quality_input_before_any_compute(tmp_path, flags, match, capsys):
    # each of these used to compute the NLL, FLAC and every clip first, then fail (EOFError, header too large, a
    # hang in sqrtm on one clip's NaN covariance, torch.cat of nothing)
    import shutil

    from training.data import DataArguments
    from training.evaluate import EvaluateArguments
    from training.metrics import DigitClassifier
    from training.utils import parse_arguments

    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "pickle.safetensors")
    DigitClassifier().save(tmp_path / "small.safetensors")
    for name, count in (("one", 1), ("none", 0), ("three", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            shutil.copy(DATA / "samples" / f"{i}.wav", tmp_path / name)
    argv = ["--model", str(tmp_path), "--no_nll", "--quality", "--classifier", str(DATA / "resnext_small.pth"),
            *[f.format(tmp=tmp_path) for f in flags]]
    with pytest.raises(SystemExit) as exit_:
        parse_arguments((EvaluateArguments, DataArguments), argv)
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_evaluate_py_refuses_a_read_only_out_before_any_compute(tmp_path, read_only_folder, capsys):
    from training.data import DataArguments
    from training.evaluate import EvaluateArguments
    from training.utils import parse_arguments

    with pytest.raises(SystemExit) as exit_:
        parse_arguments((EvaluateArguments, DataArguments), ["--model", str(tmp_path), "--out",
                                                             str(read_only_folder / "eval.json")])
    assert exit_.value.code == 2 and f"cannot write into {read_only_folder}" in capsys.readouterr().err


def test_fid_of_one_clip_is_an_error_not_a_hang():
    from training.sashimi_eval import fid

    with pytest.raises(ValueError, match="at least 2 clips"):
        fid(np.random.rand(5, 64), np.random.rand(1, 64))
