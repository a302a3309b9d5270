"""Byte data for Poolformer: text (or any file) read as raw bytes, cut into windows of `--seq_len` bytes, for byte
models (`quantization="bytes"`, `hub_configs/enwik8`, `hub_configs/tiny-bytes`).

| protocol | source                                                   | split                                       |
|----------|----------------------------------------------------------|---------------------------------------------|
| bytes    | a Hub dataset's `--text_column` (str or binary), a local | the dataset's splits, or train/validation/  |
|          | folder of text files (any file; zips are unpacked), or a | test subfolders; without a validation split |
|          | local parquet/arrow folder                               | a stable 5% of the documents (hash of each  |
|          |                                                          | file's path or row number), as for audio    |
| enwik8   | one file (`enwik8`, or the folder or zip that holds it)  | first 90% / next 5% / last 5% of the bytes: |
|          |                                                          | 90M / 5M / 5M of enwik8's 10^8 (the usual)  |

A split is one byte stream: its documents (files, or rows) in order, joined by the separator byte (`bytes`:
`--separator_byte`, by default the model's start byte 0, NUL, which text does not contain; -1 joins them with
nothing, for datasets whose rows are lines that keep their newline, such as wikitext; `enwik8`: nothing, the file
is one stream). Items are the stream's consecutive windows of `seq_len` bytes (the last one shorter, padded and
masked), each prefixed with the start byte: `input_ids`, `attention_mask`, `labels` of `seq_len + 1`, as the audio
items. Nothing of audio applies: no min-max scaling, no codec, no token 128.

Map-style, a split's stream is written once to `<cache_dir>/bytes/<key>.bin` (the key from the files' paths, sizes
and modification times, or the Hub dataset's fingerprint, the separator and the split) and read back memory-mapped;
a window is a slice. With `--streaming` the documents are read as they come (a Hub dataset through
`load_dataset(..., streaming=True)`, a folder's file list or enwik8's byte range in shards) and windows are cut on the
fly, carrying the bytes of an unfinished window from one document to the next: with `--shuffle_buffer 0` a stream
yields exactly the map-style windows. Shards per process, the shuffle buffer and the exact resume (the window
carried over is part of the saved state) are the audio stream's (`AudioTokenStream`).
"""

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from training.hub_data import _data_files, load_tables
from training.splits import (
    SPLITS,
    STREAM_SHARDS,
    VALIDATION_FRACTION,
    _stable_fraction,
    carve_validation_stream,
    mark_stream_source,
    split_generic,
    unpack_zips,
)
from training.stream import AudioTokenStream
from training.tokens import token_item

logger = logging.getLogger(__name__)

BYTE_PROTOCOLS = ("bytes", "enwik8")
ENWIK8_FRACTIONS = (0.9, 0.05, 0.05)  # of enwik8's 10^8 bytes: 90M / 5M / 5M
DEFAULT_SEQ_LEN = 2048
TABLE_EXTENSIONS = (".parquet", ".arrow")
CACHE_VERSION = 1  # bump when the cached streams' layout changes
WRITE_BATCH = 1024  # documents per batch when a split is written to its cache file


@dataclass
class ByteSpec:
    """What a byte item is made of. The audio fields that train.py and evaluate.py read (quantisation, levels, the
    scaling flag) are set to what bytes are."""

    seq_len: int = DEFAULT_SEQ_LEN  # bytes per item, not counting the start byte
    bos: int = 0  # the start byte every item begins with
    separator: Optional[int] = 0  # the byte between documents; None: documents follow each other directly
    quantization: str = "bytes"
    levels: int = 256
    mode: str = "window"
    minmax: bool = False
    sample_rate: int = 0  # bytes have none

    @property
    def pcm16(self) -> bool:
        return False


def is_byte_data(protocol: str, config) -> bool:
    """Whether the data layer reads bytes: a byte protocol, or a byte model with `--protocol auto`."""
    return protocol in BYTE_PROTOCOLS or (protocol == "auto" and config.quantization == "bytes")


# ---------------------------------------------------------------------------------------------------------------------
# Sources: documents per split
# ---------------------------------------------------------------------------------------------------------------------


def _files(root: Path) -> list:
    """Every regular file under `root` (symlinked folders followed once), hidden ones and zips (unpacked beside
    themselves) left out; in path order."""
    files, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(folder) / n for n in names if not n.startswith(".") and not n.lower().endswith(".zip")]
    return sorted(f for f in files if f.is_file())


def _file_entries(root: Path, files: list) -> list:
    return [f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0{f.stat().st_mtime_ns}" for f in files]


def _carve_documents(train: Dataset) -> tuple:
    """(train, validation) of a map-style split without validation: the stable VALIDATION_FRACTION of the documents
    (at least one) by a hash of each one's `key` (its path) or its row number, as `data.carve_validation` for audio."""
    keys = list(train["key"]) if "key" in train.column_names else [f"row {i}" for i in range(len(train))]
    hashes = [_stable_fraction(k) for k in keys]
    held = [i for i, h in enumerate(hashes) if h < VALIDATION_FRACTION] or [int(np.argmin(hashes))]
    held_set = set(held)
    return train.select([i for i in range(len(keys)) if i not in held_set]), train.select(held)


def _with_validation(splits: dict) -> dict:
    if "validation" in splits or "train" not in splits:
        return splits
    if isinstance(splits["train"], IterableDataset):
        splits["train"], splits["validation"] = carve_validation_stream(splits["train"])
    else:
        if len(splits["train"]) < 2:
            raise ValueError("the dataset has one training document and no validation split, so none can be held out: "
                             "add a validation/ subfolder (or split) or more documents")
        splits["train"], splits["validation"] = _carve_documents(splits["train"])
    logger.info("no validation split: a stable %.0f%% of the training documents is held out (hash of the path or row)",
                100 * VALIDATION_FRACTION)
    return splits


def _table_splits(data, text_column: str) -> dict:
    """A datasets source's splits with its text in a `text` column (str or binary)."""
    if isinstance(data, (Dataset, IterableDataset)):
        data = (IterableDatasetDict if isinstance(data, IterableDataset) else DatasetDict)({"train": data})
    first = next(iter(data.values()))
    columns = first.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"--text_column {text_column!r} is not a column of the dataset; it has {columns}")
    feature = (first.features or {}).get(text_column)
    kind = getattr(feature, "dtype", None)
    if feature is not None and kind not in ("string", "large_string", "binary", "large_binary"):
        raise ValueError(f"--text_column {text_column!r} holds {feature} values, not text: expected strings (read as "
                         "UTF-8) or binary (raw bytes)")
    names = {"valid": "validation", "val": "validation", "dev": "validation"}
    out = {}
    for split, ds in data.items():
        keep = [c for c in (ds.column_names or [text_column]) if c not in (text_column, "key", "path")]
        if keep and ds.column_names is not None:
            ds = ds.remove_columns(keep)
        if text_column != "text":
            ds = ds.rename_column(text_column, "text")
        out[names.get(split, split)] = ds
    return _with_validation(out)


def _enwik8_file(dataset: str) -> Path:
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix.lower() != ".zip":
        return path
    root = path if path.is_dir() else path.parent
    unpack_zips(root)
    files = _files(root)
    named = [f for f in files if f.name == "enwik8"]
    if len(named) == 1:
        return named[0]
    if len(files) == 1:
        return files[0]
    raise ValueError(f"--protocol enwik8 reads one file (enwik8, or the folder or zip holding it); {dataset} holds "
                     f"{len(files)} files: {', '.join(f.name for f in files[:5])}")


def enwik8_ranges(size: int) -> dict:
    """{split: (start, end)}: the first 90% / next 5% / last 5% of `size` bytes (90M / 5M / 5M of enwik8)."""
    train_end = int(size * ENWIK8_FRACTIONS[0])
    val_end = int(size * (ENWIK8_FRACTIONS[0] + ENWIK8_FRACTIONS[1]))
    return {"train": (0, train_end), "validation": (train_end, val_end), "test": (val_end, size)}


def load_byte_splits(dataset: Optional[str], protocol: str, text_column: str = "text", cache_dir: Optional[str] = None,
                     dataset_config: Optional[str] = None, streaming: bool = False, seq_len: int = DEFAULT_SEQ_LEN) -> tuple:
    """(protocol, {split: documents}, identity): the documents as a `datasets.Dataset` (or, streamed, an
    `IterableDataset`) with either a `text` column (str or bytes) or `path`, `start`, `length` columns (a file's
    byte range; length -1: to its end); `identity` names the source for the cache keys."""
    if dataset is None:
        raise ValueError(f"--protocol {protocol} needs --dataset: a Hub text dataset, a folder of text files or a file")
    path = Path(dataset).expanduser()
    if protocol == "auto":
        protocol = "enwik8" if path.name.lower().startswith("enwik8") else "bytes"
    if protocol == "enwik8":
        if not path.exists():
            raise ValueError(f"--protocol enwik8 reads a local file (enwik8, from http://mattmahoney.net/dc/enwik8.zip); "
                             f"--dataset {dataset}: no such file or folder")
        file = _enwik8_file(dataset)
        size = file.stat().st_size
        if size != 10**8:
            logger.info("%s has %d bytes, not enwik8's 10^8: split 90%% / 5%% / 5%% of them", file, size)
        chunk = seq_len * max(1, 2**20 // seq_len)  # documents of whole windows: no window spans two shards
        splits = {}
        for split, (start, end) in enwik8_ranges(size).items():
            starts = list(range(start, end, chunk))
            splits[split] = Dataset.from_dict({"path": [str(file)] * len(starts), "start": starts,
                                               "length": [min(chunk, end - s) for s in starts]})
        identity = _file_entries(file.parent, [file])
    elif path.is_dir() and not any(next(path.rglob(f"*{ext}"), None) for ext in TABLE_EXTENSIONS):
        unpack_zips(path)
        files = _files(path)
        if not files:
            raise ValueError(f"--dataset {dataset}: no files to read as bytes")
        splits = {}
        for name, paths in split_generic(path, files).items():
            if paths:
                rel = [p.relative_to(path).as_posix() for p in paths]
                splits[name] = Dataset.from_dict({"path": [str(p) for p in paths], "start": [0] * len(paths),
                                                  "length": [-1] * len(paths), "key": rel})
        if "train" not in splits:
            raise ValueError(f"--dataset {dataset}: no training files")
        splits = _with_validation(splits)
        identity = _file_entries(path, files)
    elif path.is_file():
        raise ValueError(f"--dataset {dataset}: one file is one document, and no validation split can be held out of it; "
                         "pass its folder with more files, or --protocol enwik8 to split its bytes 90/5/5")
    else:
        data = load_tables(str(path) if path.is_dir() else dataset, dataset_config, cache_dir=cache_dir,
                           streaming=streaming)
        splits = _table_splits(data, text_column)
        identity = None
    if streaming:
        if any(isinstance(ds, Dataset) for ds in splits.values()):  # files: shards of the document list
            splits = {name: ds.to_iterable_dataset(num_shards=max(1, min(len(ds), STREAM_SHARDS)))
                      if isinstance(ds, Dataset) else ds for name, ds in splits.items()}
            mark_stream_source(splits, identity)
        else:  # a streamed Hub or parquet dataset: marked with the data files it reads, as for audio
            files = sorted({f for ds in splits.values() for f in _data_files(ds)})
            mark_stream_source(splits, [f"{f}\0{os.path.getsize(f) if os.path.isfile(f) else ''}" for f in files] or None)
    return protocol, splits, identity


def document_bytes(example: dict) -> bytes:
    """The bytes of one document: its `text` (UTF-8 for a str), or its file's byte range."""
    if "text" in example:
        text = example["text"]
        if text is None:
            return b""
        return text.encode("utf-8") if isinstance(text, str) else bytes(text)
    with open(example["path"], "rb") as f:
        f.seek(int(example["start"]))
        length = int(example["length"])
        return f.read() if length < 0 else f.read(length)


# ---------------------------------------------------------------------------------------------------------------------
# Windows: map-style (a cached byte stream, memory-mapped) and streamed (cut on the fly)
# ---------------------------------------------------------------------------------------------------------------------


def _cache_key(identity, docs: Dataset, separator: Optional[int], split: str) -> str:
    source = "\n".join(identity) if identity is not None else str(getattr(docs, "_fingerprint", None))
    blob = f"v{CACHE_VERSION}\n{split}\n{separator}\n{len(docs)}\n{source}"
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def write_stream(docs: Dataset, path: Path, separator: Optional[int]) -> int:
    """Writes a split's documents joined by `separator` to `path` (through a temporary file, renamed when complete);
    returns its size. Unreadable files are skipped with a warning."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sep = b"" if separator is None else bytes([separator])
    size, first = 0, True
    with open(tmp, "wb") as out:
        for start in range(0, len(docs), WRITE_BATCH):
            batch = docs[start : start + WRITE_BATCH]
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            for row in rows:
                try:
                    data = document_bytes(row)
                except OSError as e:
                    logger.warning("skipped an unreadable document %s: %s", row.get("path"), e)
                    continue
                piece = data if first else sep + data
                out.write(piece)
                size, first = size + len(piece), False
    os.replace(tmp, path)
    return size


class ByteWindowDataset(torch.utils.data.Dataset):
    """The consecutive windows of `spec.seq_len` bytes of one split's byte stream (documents joined by the
    separator), the last one shorter and padded; each item starts with the start byte."""

    def __init__(self, data, spec: ByteSpec, name: str = "train"):
        self.data, self.spec, self.name = data, spec, name  # data: a 1-D uint8 array (memory-mapped)
        self.skipped, self.bad_items = 0, 0

    @classmethod
    def from_documents(cls, docs: Dataset, spec: ByteSpec, name: str, identity, cache_dir: Optional[str] = None):
        folder = Path(cache_dir or Path.home() / ".cache" / "poolformer-hf") / "bytes"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_cache_key(identity, docs, spec.separator, name)}.bin"
        if not path.exists():
            write_stream(docs, path, spec.separator)
        size = path.stat().st_size
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        return cls(data, spec, name)

    @property
    def num_bytes(self) -> int:
        return len(self.data)

    def __len__(self):
        return -(-len(self.data) // self.spec.seq_len)

    def window(self, i: int) -> np.ndarray:
        start = i * self.spec.seq_len
        return np.asarray(self.data[start : start + self.spec.seq_len])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of {len(self)}")
        return token_item(torch.from_numpy(self.window(i).astype(np.int64)), self.spec)


class ByteTokenStream(AudioTokenStream):
    """`AudioTokenStream` over documents: each document's bytes (after the separator, from the second document on)
    extend the bytes carried from the previous ones, and every full window becomes an item; the bytes of an
    unfinished window wait for the next document (and are part of `state_dict()`, so a resume is exact). A stream
    that does not repeat (validation, test) ends with its last, shorter window."""

    def __init__(self, source, spec: ByteSpec, name: str = "train", shuffle_buffer: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, repeat: bool = True):
        super().__init__(source, spec, name, shuffle_buffer, seed, rank, world_size, repeat)
        self._carry, self._joined = b"", False

    def _items(self, example: dict) -> list:
        try:
            data = document_bytes(example)
        except OSError as err:  # a bad file in a stream is skipped and counted, never a crash
            self.skipped += 1
            self.first_error = self.first_error or f"{example.get('path')}: {err}"
            logger.warning("%s: skipped an unreadable streamed document (%d so far): %s", self.name, self.skipped, err)
            return []
        sep = b"" if self.spec.separator is None or not self._joined else bytes([self.spec.separator])
        self._joined = True
        buffer = self._carry + sep + data
        n, length = len(buffer) // self.spec.seq_len, self.spec.seq_len
        self._carry = buffer[n * length :]
        return [np.frombuffer(buffer[i * length : (i + 1) * length], dtype=np.uint8).copy() for i in range(n)]

    def __iter__(self):
        if not self.repeat:  # every pass of a held-out stream is the same
            self._carry, self._joined = b"", False
        yield from super().__iter__()
        if not self.repeat and self._carry:
            tail, self._carry = self._carry, b""
            yield token_item(torch.from_numpy(np.frombuffer(tail, dtype=np.uint8).astype(np.int64)), self.spec)

    def state_dict(self) -> dict:
        """The audio stream's state, plus the bytes of the unfinished window (a uint8 tensor: checkpoints are read
        with `weights_only`) and whether a document was read (the next one is preceded by the separator)."""
        carry = torch.from_numpy(np.frombuffer(self._carry, dtype=np.uint8).copy())
        return {**super().state_dict(), "carry": carry, "joined": self._joined}

    def load_state_dict(self, state: dict):
        super().load_state_dict(state)
        carry = state["carry"]
        self._carry = carry.numpy().tobytes() if isinstance(carry, torch.Tensor) else bytes(carry)
        self._joined = bool(state["joined"])


def build_byte_datasets(data_args, config, rank: int = 0, world_size: int = 1, seed: int = 0) -> tuple:
    """(protocol, spec, {split: ByteWindowDataset, or ByteTokenStream with --streaming}) for a byte model; the
    counterpart of `data.build_datasets` for audio."""
    if config.quantization != "bytes":
        raise ValueError(f"--protocol {data_args.protocol} reads bytes, for a byte model (quantization='bytes', e.g. "
                         f"--model_config hub_configs/tiny-bytes); this model's quantization is {config.quantization!r}")
    seq_len = data_args.seq_len or DEFAULT_SEQ_LEN
    protocol, splits, identity = load_byte_splits(data_args.dataset, data_args.protocol, data_args.text_column,
                                                  data_args.cache_dir, data_args.dataset_config, data_args.streaming,
                                                  seq_len)
    if protocol == "enwik8":
        separator = None
    else:
        separator = config.bos_token_id if data_args.separator_byte is None else data_args.separator_byte
        separator = None if separator < 0 else separator
    spec = ByteSpec(seq_len=seq_len, bos=config.bos_token_id, separator=separator)
    if data_args.streaming:
        sets = {name: ByteTokenStream(ds, spec, name, data_args.shuffle_buffer if name == "train" else 0, seed,
                                      *((rank, world_size) if name == "train" else (0, 1)), repeat=name == "train")
                for name, ds in splits.items()}
    else:
        sets = {name: ByteWindowDataset.from_documents(ds, spec, name, identity, data_args.cache_dir)
                for name, ds in splits.items() if name in SPLITS}
    return protocol, spec, sets
