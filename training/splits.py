"""Split protocols: which files of a folder are train, validation and test for each of the thesis' data sets, and
the one rule for every source without a validation split (a stable 5% of the training items, by a hash of each
item's path). See `training/data.py` for the table of protocols."""

import hashlib
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Optional

from datasets import Dataset, IterableDataset

from training.arrow_memory import arrow_files, release_mapped_pages

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
SPLITS = ("train", "validation", "test")
# the names a folder or a dataset may give its splits
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")  # SC09's classes, in order
VALIDATION_FRACTION = 0.05
STREAM_SHARDS = 64  # shards of a streamed folder: any process count up to 64 that divides it reads whole shards


def unpack_zips(root: Path) -> None:
    """Hub repos like krandiash/sc09 ship a zip: unpack each once, next to it."""
    for archive in sorted(root.rglob("*.zip")):
        target = archive.with_suffix("")
        done = target / ".unpacked"
        if done.exists():
            continue
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(target)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{archive}: not a readable zip archive ({e}); re-download or remove it") from None
        done.touch()


def list_audio_files(root: Path) -> list:
    """Every audio file under `root`, following symlinked folders (split folders are often links), each real folder
    once."""
    files, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        files += [Path(folder) / n for n in names if Path(n).suffix.lower() in AUDIO_EXTENSIONS]
    return sorted(f for f in files if f.is_file())


def find_file(root: Path, name: str) -> Optional[Path]:
    hits = sorted(Path(folder) / name for folder, _, names in os.walk(root, followlinks=True) if name in names)
    return hits[0] if hits else None


def split_sc09(root: Path, files: list) -> dict:
    val_list, test_list = find_file(root, "validation_list.txt"), find_file(root, "testing_list.txt")
    if val_list is None or test_list is None:
        raise ValueError(f"protocol 'sc09' needs validation_list.txt and testing_list.txt under {root}")
    base = val_list.parent
    held = {s: set(filter(None, f.read_text().split())) for s, f in (("validation", val_list), ("test", test_list))}
    splits = {s: [] for s in SPLITS}
    for f in files:
        try:
            rel = f.relative_to(base).as_posix()
        except ValueError:
            continue
        if rel.split("/")[0] not in DIGITS:  # SC09 keeps the ten digit words only
            continue
        split = "validation" if rel in held["validation"] else "test" if rel in held["test"] else "train"
        splits[split].append(f)
    return splits


def split_beethoven(root: Path, files: list) -> dict:
    splits = {s: [] for s in SPLITS}
    for f in files:
        numbers = re.findall(r"\d+", f.stem)
        if not numbers:
            raise ValueError(f"protocol 'beethoven' expects files named by index (e.g. 123.wav), got {f.name}")
        index = int(numbers[-1])
        splits["train" if index < 3808 else "validation" if index < 4068 else "test"].append(f)
    return splits


def split_youtubemix(root: Path, files: list) -> dict:
    n = len(files)
    n_train, n_val = int(round(0.88 * n)), int(round(0.06 * n))
    if n >= 3:  # keep every split non-empty on small folders
        n_val = max(n_val, 1)
        n_train = min(n_train, n - n_val - 1)
    return {"train": files[:n_train], "validation": files[n_train : n_train + n_val], "test": files[n_train + n_val :]}


def split_generic(root: Path, files: list) -> dict:
    """train/validation/test subfolders (or their aliases) when the files are laid out so, else all files train;
    a missing validation split is carved out of train by `load_splits`."""
    splits = {s: [] for s in SPLITS}
    top = {f.relative_to(root).parts[0].lower() for f in files if len(f.relative_to(root).parts) > 1}
    if top and top <= set(SPLIT_ALIASES):
        for f in files:
            splits[SPLIT_ALIASES[f.relative_to(root).parts[0].lower()]].append(f)
    else:
        splits["train"] = list(files)
    return splits


def carve_validation(train: Dataset) -> tuple:
    """(train, validation): a stable VALIDATION_FRACTION of the items (at least one) by a hash of each item's path
    (relative to the dataset folder; its row number when it has none). The one rule for every source without a
    validation split."""
    column = next((c for c in ("key", "path") if c in train.column_names), None)
    if column:
        paths = list(train[column])
    else:  # the audio column's `path` field alone (absent for decoded arrays): its bytes are never read
        flat = train.select_columns(["audio"]).flatten()
        paths = list(flat["audio.path"]) if "audio.path" in flat.column_names else [None] * len(train)
    keys = [p if p else f"row {i}" for i, p in enumerate(paths)]
    hashes = [_stable_fraction(k) for k in keys]
    held = [i for i, h in enumerate(hashes) if h < VALIDATION_FRACTION]
    if not held:
        held = [min(range(len(hashes)), key=hashes.__getitem__)]
    held_set = set(held)
    kept = [i for i in range(len(keys)) if i not in held_set]
    release_mapped_pages(arrow_files(train))
    return train.select(kept), train.select(held)


SPLITTERS = {"sc09": split_sc09, "beethoven": split_beethoven, "youtubemix": split_youtubemix, "generic": split_generic}


def _stable_fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def carve_validation_stream(train) -> tuple:
    """carve_validation for a stream: the same hash of each item's key or path (its position in the stream when it
    has neither), applied as a filter on the fly."""
    def held(example, i):
        key = example.get("key") or example.get("path") or (example.get("audio") or {}).get("path") or f"row {i}"
        return _stable_fraction(key) < VALIDATION_FRACTION

    return (train.filter(lambda ex, i: not held(ex, i), with_indices=True), train.filter(held, with_indices=True))


def with_validation(splits: dict) -> dict:
    """`splits` with a validation split: carved out of train (a stable hash) where the source has none."""
    if "validation" not in splits and "train" in splits and isinstance(splits["train"], IterableDataset):
        splits["train"], splits["validation"] = carve_validation_stream(splits["train"])
        logger.info("no validation split: a stable %.0f%% of the streamed training items is held out (hash of the "
                    "path)", 100 * VALIDATION_FRACTION)
    elif "validation" not in splits and "train" in splits:
        if len(splits["train"]) < 2:
            raise ValueError("the dataset has one training file and no validation split, so none can be held out: "
                             "add a validation/ subfolder (or split) or more files")
        splits["train"], splits["validation"] = carve_validation(splits["train"])
        logger.info("no validation split: %d of %d training items held out for validation (stable hash)",
                    len(splits["validation"]), len(splits["validation"]) + len(splits["train"]))
    return splits


def mark_stream_source(splits: dict, entries: Optional[list]):
    """Records on each streamed split what defines the stream (`defined_by`: the number of files and a digest of
    their names and sizes): a checkpoint's stream state keeps it, and a resume on other files is refused."""
    if entries is None:
        return
    digest = hashlib.sha1("\n".join(sorted(entries)).encode()).hexdigest()
    for ds in splits.values():
        ds.defined_by = {"files": len(entries), "digest": digest}
