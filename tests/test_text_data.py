"""The byte data protocols (`training/text_data.py`): splits, windows of documents joined by the separator byte,
map-style against streamed, exact stream resume, enwik8's 90/5/5, datasets' text columns, and the errors."""

import hashlib
import shutil
import zipfile

import datasets
import numpy as np
import pytest
import torch
from packaging.version import Version

from helpers import hub_config
from training.data import STREAMING_DATASETS, DataArguments, build_datasets
from training.text_data import ByteWindowDataset, enwik8_ranges

needs_streaming = pytest.mark.skipif(Version(datasets.__version__) < Version(STREAMING_DATASETS),
                                     reason="--streaming needs a newer datasets")


@pytest.fixture(scope="module")
def config():
    return hub_config("tiny-bytes")


def _docs(folder, count=40, seed=0):
    """Text files of different lengths (multi-byte characters included), named doc00.txt ..."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        words = rng.choice(["alpha", "béta", "γάμμα", "delta", "東京", "\n"], size=int(rng.integers(1, 60)))
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words), encoding="utf-8")
    return folder


def _build(config, dataset, tmp_path, **kwargs):
    args = DataArguments(dataset=str(dataset), cache_dir=str(tmp_path / "cache"), **{"seq_len": 64, **kwargs})
    return build_datasets(args, config)


def _item_bytes(item) -> bytes:
    n = int(item["attention_mask"].sum()) - 1
    return bytes(item["input_ids"][1 : 1 + n].tolist())


def _held_out(keys: list) -> list:
    """The documented rule, computed here: the documents whose SHA-1 of the relative path (or "row i") read as a
    fraction of 2^32 is below 5% (the lowest one when none is)."""
    fraction = {k: int(hashlib.sha1(k.encode()).hexdigest()[:8], 16) / 2**32 for k in keys}
    return [k for k in keys if fraction[k] < 0.05] or [min(keys, key=fraction.get)]


def _stream_of(split) -> bytes:
    return b"".join(_item_bytes(split[i]) for i in range(len(split)))


def test_folder_split_is_a_stable_hash_and_items_are_windows_of_the_joined_documents(config, tmp_path):
    docs = _docs(tmp_path / "docs")
    protocol, spec, sets = _build(config, docs, tmp_path)
    assert protocol == "bytes" and set(sets) == {"train", "validation"}
    assert (spec.bos, spec.separator, spec.seq_len, spec.minmax) == (0, 0, 64, False)
    # the documents of each split, joined by the separator byte, are the split's windows end to end
    all_bytes = {p.name: p.read_bytes() for p in sorted(docs.iterdir())}
    streams = {name: _stream_of(ds) for name, ds in sets.items()}
    held = _held_out(list(all_bytes))
    kept = [n for n in all_bytes if n not in held]
    assert held and len(held) < len(all_bytes) // 5
    assert streams["train"] == b"\x00".join(all_bytes[n] for n in kept)
    assert streams["validation"] == b"\x00".join(all_bytes[n] for n in held)
    # every item: the start byte, then seq_len bytes; only the last one shorter, padded and masked
    train = sets["train"]
    assert len(train) == -(-len(streams["train"]) // 64)
    for i in (0, len(train) - 1):
        item = train[i]
        assert item["input_ids"][0] == 0 and item["input_ids"].shape == (65,)
        n = int(item["attention_mask"].sum())
        assert (item["labels"][:n] == item["input_ids"][:n]).all() and (item["labels"][n:] == -100).all()
    assert int(train[0]["attention_mask"].sum()) == 65
    # the same documents held out wherever the folder lives (the hash is of the relative path)
    moved = shutil.copytree(docs, tmp_path / "elsewhere" / "docs")
    _, _, again = _build(config, moved, tmp_path / "other")
    assert _stream_of(again["validation"]) == streams["validation"]


def test_split_subfolders_and_separator_choices(config, tmp_path):
    root = tmp_path / "data"
    for split, count in (("train", 6), ("valid", 2), ("test", 2)):
        _docs(root / split, count, seed=len(split))
    _, _, sets = _build(config, root, tmp_path, separator_byte=-1)
    assert set(sets) == {"train", "validation", "test"}
    files = sorted((root / "test").iterdir())
    assert _stream_of(sets["test"]) == b"".join(p.read_bytes() for p in files)  # -1: no separator
    _, _, sets = _build(config, root, tmp_path, separator_byte=10)
    assert _stream_of(sets["test"]) == b"\n".join(p.read_bytes() for p in files)


def test_map_style_split_is_cached_and_rebuilt_when_a_file_changes(config, tmp_path):
    docs = _docs(tmp_path / "docs", 12)
    _, _, first = _build(config, docs, tmp_path)
    cached = sorted((tmp_path / "cache" / "bytes").glob("*.bin"))
    assert len(cached) == 2
    _build(config, docs, tmp_path)
    assert sorted((tmp_path / "cache" / "bytes").glob("*.bin")) == cached  # read back, not written again
    target = sorted(docs.iterdir())[0]
    target.write_text(target.read_text(encoding="utf-8") + " more", encoding="utf-8")
    _, _, changed = _build(config, docs, tmp_path)
    assert len(list((tmp_path / "cache" / "bytes").glob("*.bin"))) > 2
    assert _stream_of(changed["train"]) + _stream_of(changed["validation"]) != (
        _stream_of(first["train"]) + _stream_of(first["validation"]))


@needs_streaming
def test_stream_yields_the_map_style_windows(config, tmp_path):
    docs = _docs(tmp_path / "docs")
    _, _, mapped = _build(config, docs, tmp_path)
    _, _, streamed = _build(config, docs, tmp_path, streaming=True, shuffle_buffer=0)
    # a held-out stream: every window, the last one shorter, exactly as map-style
    val = list(streamed["validation"])
    assert len(val) == len(mapped["validation"])
    for got, i in zip(val, range(len(val))):
        want = mapped["validation"][i]
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert len(list(streamed["validation"])) == len(val)  # a second pass is the same
    # the training stream (endless): its first pass is the map-style windows (bar the shorter last one)
    stream = iter(streamed["train"])
    for i in range(len(mapped["train"]) - 1):
        assert torch.equal(next(stream)["input_ids"], mapped["train"][i]["input_ids"])


@needs_streaming
def test_stream_resumes_exactly_with_its_carried_window(config, tmp_path):
    docs = _docs(tmp_path / "docs")
    kwargs = dict(streaming=True, shuffle_buffer=8, seq_len=48)
    _, _, sets = _build(config, docs, tmp_path, **kwargs)
    whole = iter(sets["train"])
    want = [next(whole)["input_ids"] for _ in range(60)]  # past the end of the first pass

    _, _, sets = _build(config, docs, tmp_path, **kwargs)
    first = iter(sets["train"])
    got = [next(first)["input_ids"] for _ in range(23)]
    state = sets["train"].state_dict()
    assert len(state["carry"]) > 0 or state["joined"]  # the window in progress is part of the state
    path = tmp_path / "state.pt"
    torch.save({**state, "buffer": [torch.from_numpy(t) for t in state["buffer"]]}, path)  # as train.py saves it
    loaded = torch.load(path, weights_only=True)
    loaded["buffer"] = [t.numpy() for t in loaded["buffer"]]

    _, _, resumed = _build(config, docs, tmp_path, **kwargs)
    resumed["train"].load_state_dict(loaded)
    rest = iter(resumed["train"])
    got += [next(rest)["input_ids"] for _ in range(60 - 23)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    # a changed document set is refused: its windows and held-out documents would be others
    (docs / "doc99.txt").write_text("new", encoding="utf-8")
    _, _, changed = _build(config, docs, tmp_path, **kwargs)
    with pytest.raises(ValueError, match="dataset changed"):
        changed["train"].load_state_dict(loaded)


@needs_streaming
def test_streams_of_two_processes_read_disjoint_documents(config, tmp_path):
    docs = _docs(tmp_path / "docs", 16)
    args = DataArguments(dataset=str(docs), cache_dir=str(tmp_path / "cache"), seq_len=1_000_000, streaming=True,
                         shuffle_buffer=0)
    seen = []
    for rank in (0, 1):
        _, _, sets = build_datasets(args, config, rank=rank, world_size=2)
        stream = sets["train"]
        stream.repeat = False  # one pass: the one window is the rank's documents joined
        seen.append(_item_bytes(next(iter(stream))))
    _, _, mapped = _build(config, docs, tmp_path)
    assert sorted(seen[0].split(b"\x00") + seen[1].split(b"\x00")) == sorted(_stream_of(mapped["train"]).split(b"\x00"))


@pytest.mark.parametrize("zipped", [False, True])
def test_enwik8_protocol_is_the_first_90_5_5_percent_of_the_bytes(config, tmp_path, zipped):
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    folder = tmp_path / "enwik8-data"
    folder.mkdir()
    if zipped:
        with zipfile.ZipFile(folder / "enwik8.zip", "w") as z:
            z.writestr("enwik8", data)
    else:
        (folder / "enwik8").write_bytes(data)
    protocol, spec, sets = _build(config, folder, tmp_path, protocol="enwik8", seq_len=128)
    assert protocol == "enwik8" and spec.separator is None
    assert {k: _stream_of(v) for k, v in sets.items()} == {
        "train": data[:9000], "validation": data[9000:9500], "test": data[9500:]}
    assert enwik8_ranges(10**8) == {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000),
                                    "test": (95_000_000, 100_000_000)}
    if Version(datasets.__version__) >= Version(STREAMING_DATASETS):  # streamed: the same windows
        _, _, streamed = _build(config, folder, tmp_path, protocol="enwik8", seq_len=128, streaming=True,
                                shuffle_buffer=0)
        assert b"".join(_item_bytes(item) for item in streamed["test"]) == data[9500:]
    # auto-detected from the name
    protocol, _, _ = _build(config, folder, tmp_path, seq_len=128)
    assert protocol == "enwik8"


@pytest.mark.parametrize("binary", [False, True])
def test_a_datasets_text_column_is_read_as_utf8_or_raw_bytes(config, tmp_path, binary):
    from datasets import Dataset

    rows = [f"row {i}: {'é' * i}\n" for i in range(30)]
    folder = tmp_path / "table"
    folder.mkdir()
    column = [r.encode("utf-8") for r in rows] if binary else rows
    Dataset.from_dict({"content": column, "n": list(range(30))}).to_parquet(str(folder / "train.parquet"))
    _, spec, sets = _build(config, folder, tmp_path, text_column="content", separator_byte=-1)
    streams = {k: _stream_of(v) for k, v in sets.items()}
    assert sorted(streams) == ["train", "validation"]
    assert len(streams["train"]) + len(streams["validation"]) == sum(len(r.encode("utf-8")) for r in rows)
    held = set(_held_out([f"row {i}" for i in range(len(rows))]))
    assert streams["train"] == "".join(r for i, r in enumerate(rows) if f"row {i}" not in held).encode("utf-8")
    assert streams["validation"] == "".join(r for i, r in enumerate(rows) if f"row {i}" in held).encode("utf-8")
    with pytest.raises(ValueError, match="--text_column 'text' is not a column"):
        _build(config, folder, tmp_path)
    with pytest.raises(ValueError, match="--text_column 'n' holds"):
        _build(config, folder, tmp_path, text_column="n")


def test_errors_name_the_argument(config, tmp_path):
    docs = _docs(tmp_path / "docs", 4)
    with pytest.raises(ValueError, match="byte model"):
        _build(hub_config("tiny"), docs, tmp_path, protocol="bytes")
    with pytest.raises(ValueError, match="audio protocol"):
        _build(config, docs, tmp_path, protocol="sc09")
    with pytest.raises(ValueError, match="one file is one document"):
        _build(config, docs / "doc00.txt", tmp_path)
    with pytest.raises(ValueError, match="--separator_byte 256"):
        DataArguments(dataset=str(docs), separator_byte=256)
    with pytest.raises(ValueError, match="enwik8.*holds 4 files"):
        _build(config, docs, tmp_path, protocol="enwik8")


def test_an_empty_split_has_no_items():
    from training.text_data import ByteSpec

    assert len(ByteWindowDataset(np.zeros(0, np.uint8), ByteSpec(seq_len=8))) == 0
