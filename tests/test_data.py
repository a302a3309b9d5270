"""Data protocols on small synthetic folders laid out like the real repos, skipping of bad files, resampling."""

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from datasets import Audio, Dataset

from modeling_poolformer import PoolformerConfig
from training.data import AudioSpec, AudioTokenDataset, DataArguments, build_datasets, load_splits
from training.spoken_digits import espeak_renderer, make_spoken_digits


def tone(path, seconds=0.25, rate=16000, freq=440.0):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, 0.5 * np.sin(2 * np.pi * freq * t), rate, subtype="PCM_16")
    return path


def names(ds):
    return sorted(Path(p).relative_to(Path(p).parents[1]).as_posix() for p in ds["path"])


def make_sc09(root):
    for digit in ("zero", "one", "two"):
        for i in range(4):
            tone(root / digit / f"spk{i}_nohash_0.wav")
    tone(root / "bed" / "spk0_nohash_0.wav")  # not a digit: SC09 drops it
    (root / "validation_list.txt").write_text("zero/spk1_nohash_0.wav\none/spk1_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("two/spk2_nohash_0.wav\n")
    return root


def test_sc09_protocol_uses_the_official_lists(tmp_path):
    protocol, splits = load_splits(str(make_sc09(tmp_path / "sc09")))
    assert protocol == "sc09"
    assert names(splits["validation"]) == ["one/spk1_nohash_0.wav", "zero/spk1_nohash_0.wav"]
    assert names(splits["test"]) == ["two/spk2_nohash_0.wav"]
    assert len(splits["train"]) == 12 - 3


def test_sc09_zip_like_the_hub_repo_is_unpacked(tmp_path):
    src = make_sc09(tmp_path / "src" / "sc09")
    repo = tmp_path / "repo"
    repo.mkdir()
    with zipfile.ZipFile(repo / "sc09.zip", "w") as z:
        for f in src.rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(src.parent))
    protocol, splits = load_splits(str(repo), protocol="sc09")
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (9, 2, 1)
    load_splits(str(repo), protocol="sc09")  # unpacked once, reused


def test_beethoven_protocol_splits_by_file_index(tmp_path):
    for i in (0, 3806, 3807, 3808, 4067, 4068, 4327):
        tone(tmp_path / "beethoven" / f"{i}.wav", seconds=0.05)
    _, splits = load_splits(str(tmp_path / "beethoven"), protocol="beethoven")
    stems = {k: sorted(int(Path(p).stem) for p in v["path"]) for k, v in splits.items()}
    assert stems == {"train": [0, 3806, 3807], "validation": [3808, 4067], "test": [4068, 4327]}


def test_youtubemix_protocol_88_6_6_by_file_order(tmp_path):
    for i in range(50):
        tone(tmp_path / "ytm" / f"out{i:03d}.wav", seconds=0.02)
    _, splits = load_splits(str(tmp_path / "ytm"), protocol="youtubemix")
    stems = {k: [Path(p).stem for p in v["path"]] for k, v in splits.items()}
    assert len(stems["train"]) == 44 and len(stems["validation"]) == 3 and len(stems["test"]) == 3
    assert stems["train"][-1] == "out043" and stems["test"][0] == "out047"


def test_generic_folder_with_split_subfolders_and_flat(tmp_path):
    for split, n in (("train", 5), ("valid", 2), ("test", 1)):
        for i in range(n):
            tone(tmp_path / "mine" / split / f"{i}.flac")
    protocol, splits = load_splits(str(tmp_path / "mine"))
    assert protocol == "generic"
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "validation": 2, "test": 1}

    for i in range(60):
        tone(tmp_path / "flat" / f"clip{i}.wav", seconds=0.01)
    _, a = load_splits(str(tmp_path / "flat"))
    shutil.copytree(tmp_path / "flat", tmp_path / "moved")
    _, b = load_splits(str(tmp_path / "moved"))
    assert 0 < len(a["validation"]) < 15 and a["validation"]["key"] == b["validation"]["key"]  # stable, wherever


def test_one_validation_rule_for_folders_and_hub_datasets(tmp_path):
    # train/ and test/ without validation/: a folder and a Hub-style dataset get the same stable 5% of train
    names = [f"clip{i:02d}.wav" for i in range(40)]
    for split, files in (("train", names), ("test", names[:3])):
        for name in files:
            tone(tmp_path / "folder" / split / name, seconds=0.01)
    protocol, folder = load_splits(str(tmp_path / "folder"))
    assert protocol == "generic" and set(folder) == {"train", "validation", "test"} and len(folder["test"]) == 3

    def rows(split, files):
        return [{"bytes": (tmp_path / "folder" / split / n).read_bytes(), "path": f"{split}/{n}"} for n in files]

    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split, files in (("train", names), ("test", names[:3])):
        ds = Dataset.from_dict({"audio": rows(split, files)}).cast_column("audio", Audio(decode=False))
        ds.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    _, hub = load_splits(str(tmp_path / "repo"), cache_dir=str(tmp_path / "cache"))
    held = sorted(Path(a["path"]).name for a in hub["validation"]["audio"])
    assert held == sorted(Path(k).name for k in folder["validation"]["key"]) and 1 <= len(held) < 8
    assert len(hub["train"]) + len(held) == 40 and len(hub["test"]) == 3


@pytest.mark.compat
def test_hub_style_parquet_dataset_and_column_errors(tmp_path):
    rows = []
    for i in range(6):
        f = tone(tmp_path / "src" / f"{i}.wav", seconds=0.1, rate=8000)
        rows.append({"bytes": f.read_bytes(), "path": f.name})
    ds = Dataset.from_dict({"sound": rows, "label": list(range(6))}).cast_column("sound", Audio(decode=False))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    protocol, splits = load_splits(str(tmp_path / "repo"), audio_column="sound", cache_dir=str(tmp_path / "cache"))
    assert protocol == "generic" and "validation" in splits and len(splits["train"]) + len(splits["validation"]) == 6
    item = AudioTokenDataset(splits["train"], AudioSpec(seq_len=2000, mode="pad"))[0]
    assert item["attention_mask"].sum() == 1 + 1600  # 0.1 s at 8 kHz -> 1600 samples at 16 kHz, plus the zero token
    with pytest.raises(ValueError, match="--audio_column 'audio' is not a column.*sound"):
        load_splits(str(tmp_path / "repo"), audio_column="audio", cache_dir=str(tmp_path / "cache"))


def test_bad_protocol_and_empty_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="--protocol must be one of"):
        load_splits(str(tmp_path), protocol="librispeech")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        load_splits(str(tmp_path / "empty"), protocol="sc09")
    with pytest.raises(ValueError, match="validation_list.txt"):
        tone(tmp_path / "nolists" / "zero" / "a.wav")
        load_splits(str(tmp_path / "nolists"), protocol="sc09")


def test_corrupt_and_empty_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_sc09(tmp_path / "sc09")
    (root / "one" / "broken_nohash_0.wav").write_bytes(b"RIFF\x00\x00not really a wav file" * 10)
    soundfile.write(root / "two" / "empty_nohash_0.wav", np.zeros(0), 16000)
    _, spec, sets = build_datasets(DataArguments(dataset=str(root), seq_len=4000), PoolformerConfig())
    assert len(sets["train"].skipped) == 2 and len(sets["train"]) == 9
    assert "skipped 2 unreadable or empty files" in caplog.text
    for item in sets["train"]:  # a whole epoch, no crash
        assert item["input_ids"].shape == (4001,)


def test_items_pad_mask_resample_and_windows(tmp_path):
    f = tone(tmp_path / "a.wav", seconds=0.5, rate=8000)  # wrong rate: resampled to 16 kHz
    data = Dataset.from_dict({"audio": [str(f)]}).cast_column("audio", Audio(decode=False))
    item = AudioTokenDataset(data, AudioSpec(seq_len=12000, mode="pad"))[0]
    assert item["input_ids"][0] == 128 and item["attention_mask"].sum() == 8001
    assert (item["labels"][8001:] == -100).all() and (item["labels"][:8001] == item["input_ids"][:8001]).all()
    tokens = item["input_ids"][1:8001]
    assert tokens.min() <= 2 and tokens.max() >= 253  # min-max scaled to the full range before mu-law

    g = tone(tmp_path / "long.wav", seconds=2.5)
    data = Dataset.from_dict({"audio": [str(g)]}).cast_column("audio", Audio(decode=False))
    windows = AudioTokenDataset(data, AudioSpec(seq_len=16000, mode="window"))
    assert len(windows) == 2 and all(w["attention_mask"].all() for w in windows)


def test_protocol_quantization_is_returned_not_written_into_the_config(tmp_path):
    for i in (1, 3900, 4100):
        tone(tmp_path / "b" / f"{i}.wav", seconds=0.05)
    config = PoolformerConfig()
    _, spec, sets = build_datasets(DataArguments(dataset=str(tmp_path / "b"), protocol="beethoven", seq_len=1000),
                                   config)
    assert spec.quantization == "linear" and config.quantization == "mu-law" and spec.mode == "pad"
    assert set(sets) == {"train", "validation", "test"}


def test_paths_that_do_not_exist_are_not_taken_for_hub_repos(tmp_path):
    for value in ("/no/such/dir", "./missing", str(tmp_path / "nothing" / "here")):
        with pytest.raises(ValueError, match="no such file or folder"):
            DataArguments(dataset=value)
        with pytest.raises(ValueError, match="no such file or folder"):
            load_splits(value)
    DataArguments(dataset="krandiash/sc09")  # a repo id stays one (nothing is downloaded here)
    with pytest.raises(ValueError, match="--seq_len must be >= 1"):
        DataArguments(seq_len=0)


@pytest.mark.parametrize("prefer_library", [False, True])
def test_spoken_digits_render_with_the_tool_or_the_pip_library(tmp_path, prefer_library):
    # the espeakng-loader wheel makes the built-in set without a system package; the tool is used when installed
    if not prefer_library and shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng tool not installed")
    render = espeak_renderer(prefer_library=prefer_library)
    root = make_spoken_digits(tmp_path / "digits", voices=("en-us", "en+m3", "en-us+f3"), variants=((150, 50),),
                              render=render)
    assert [len((root / f).read_text().split()) for f in ("validation_list.txt", "testing_list.txt")] == [10, 10]
    assert len(list(root.glob("*/*.wav"))) == 30
    wave, rate = soundfile.read(root / "seven" / "v0_0.wav")
    assert rate == 16000 and 0.2 * rate < len(wave) <= rate and np.abs(wave).max() > 0.1
    with pytest.raises(RuntimeError, match="voice 'xx-nonexistent'"):
        render("one", "xx-nonexistent", 150, 50)


def test_a_single_file_dataset_says_why_it_has_no_validation_split(tmp_path):
    tone(tmp_path / "one" / "only.wav")
    with pytest.raises(ValueError, match="one training file and no validation split"):
        load_splits(str(tmp_path / "one"))
    tone(tmp_path / "one" / "validation" / "held.wav")  # with a validation split of its own it loads
    tone(tmp_path / "one" / "train" / "only.wav")
    (tmp_path / "one" / "only.wav").unlink()
    assert {k: len(v) for k, v in load_splits(str(tmp_path / "one"))[1].items()} == {"train": 1, "validation": 1}


def test_symlinked_split_folders_are_followed(tmp_path):
    for split, count in (("train", 4), ("validation", 2)):
        for i in range(count):
            tone(tmp_path / "store" / split / f"{i}.wav")
    (tmp_path / "linked").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "linked" / split).symlink_to(tmp_path / "store" / split, target_is_directory=True)
    (tmp_path / "linked" / "train" / "loop").symlink_to(tmp_path / "linked", target_is_directory=True)  # a cycle
    _, splits = load_splits(str(tmp_path / "linked"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation": 2}


def test_non_finite_samples_are_masked_out_and_counted(tmp_path, caplog):
    path = tmp_path / "float" / "train" / "nan.wav"
    path.parent.mkdir(parents=True)
    wave = np.sin(np.arange(4000) / 10).astype(np.float32)
    wave[100] = np.nan
    soundfile.write(path, wave, 16000, subtype="FLOAT")
    tone(tmp_path / "float" / "train" / "fine.wav")
    tone(tmp_path / "float" / "validation" / "v.wav")
    _, _, sets = build_datasets(DataArguments(dataset=str(tmp_path / "float"), seq_len=4000, mode="pad"),
                                PoolformerConfig())
    items = {Path(sets["train"].data[int(row)]["audio"]["path"]).name: sets["train"][i]
             for i, (row, _) in enumerate(sets["train"].index)}
    assert items["nan.wav"]["attention_mask"].sum() == 1 and (items["nan.wav"]["labels"][1:] == -100).all()
    assert items["fine.wav"]["attention_mask"].sum() == 1 + 4000
    assert sets["train"].bad_items == 1 and "NaN or infinite" in caplog.text


def test_a_corrupt_zip_is_named(tmp_path):
    make_sc09(tmp_path / "repo")
    (tmp_path / "repo" / "extra.zip").write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(ValueError, match=r"extra\.zip: not a readable zip archive"):
        load_splits(str(tmp_path / "repo"))


def test_parquet_audio_stored_as_decoded_arrays_loads_without_a_decoder(tmp_path):
    # {array, sampling_rate} rows (how some Hub datasets store audio): used as they are, no torchcodec needed
    rows = [{"array": (0.3 * np.sin(np.arange(800) / (3 + i))).tolist(), "sampling_rate": 8000} for i in range(6)]
    (tmp_path / "repo" / "data").mkdir(parents=True)
    Dataset.from_dict({"audio": rows}).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    _, splits = load_splits(str(tmp_path / "repo"), cache_dir=str(tmp_path / "cache"))
    assert len(splits["train"]) + len(splits["validation"]) == 6
    item = AudioTokenDataset(splits["train"], AudioSpec(seq_len=2000, mode="pad"))[0]
    assert item["attention_mask"].sum() == 1 + 1600  # 800 samples at 8 kHz -> 1600 at 16 kHz
