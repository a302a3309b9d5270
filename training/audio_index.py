"""The header index of a split: each item's frame count and rate (or why it cannot be read), read from file headers
(never the samples) by `Dataset.map`, in several processes for large splits, and cached under `<cache>/index/`
by a fingerprint of the files, so that a second launch or a resume reads it back."""

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa
from datasets import Dataset

from training.arrow_memory import arrow_files, release_mapped_pages
from training.audio_read import read_header
from training.utils import cache_root

logger = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the index's columns or their meaning change: old cached indexes are then not reused


def _index_batch(audio: list, mapped: tuple = ()) -> dict:
    """`Dataset.map` body: the header of each item (never its samples); an error string where it cannot be read.
    The pages of the `mapped` Arrow files that the batch's rows were read from are dropped afterwards."""
    out = {"frames": [], "rate": [], "error": [], "name": []}
    for a in audio:
        try:
            frames, rate = read_header(a)
            error = "" if frames > 0 and rate > 0 else "empty"
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, whatever the reason
            frames, rate, error = 0, 0, f"{type(err).__name__}: {err}"
        out["frames"].append(int(frames))
        out["rate"].append(int(rate))
        out["error"].append(error)
        out["name"].append(str(a.get("path") or ""))
    release_mapped_pages(mapped)
    return out


def _index_fingerprint(data: Dataset) -> Optional[str]:
    """A name for `data`'s index that changes when its files do: datasets' own fingerprint for a dataset backed by
    cache files (a Hub or parquet dataset), else the paths, sizes and modification times of a folder's files. None
    for an in-memory dataset without paths (its index is not cached)."""
    if data.cache_files:
        return hashlib.sha1(f"v{INDEX_VERSION} {data._fingerprint}".encode()).hexdigest()
    if "path" not in data.column_names:
        return None
    digest = hashlib.sha1(f"v{INDEX_VERSION}".encode())
    for path in data["path"]:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


STALE_BUILD_SECONDS = 24 * 3600  # a build folder untouched this long is abandoned, whoever made it


def remove_stale_builds(folder: Path) -> list:
    """Removes the `.building-<host>-<pid>-*` folders of index builds that will never finish: made on this host by a
    process that is gone (a kill -9, a crash), or, whatever made them (another host, an older version's unnamed
    ones), untouched for STALE_BUILD_SECONDS. A live builder's folder is left alone, so concurrent builders are
    safe. Returns the folders removed."""
    removed = []
    for work in Path(folder).glob(".building-*"):
        parts = work.name[len(".building-"):].rsplit("-", 2)
        stale = False
        if len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                stale = True
            except OSError:  # alive, owned by another user
                pass
        if not stale:
            try:
                touched = max([work.stat().st_mtime] + [p.stat().st_mtime for p in work.iterdir()])
            except OSError:  # removed meanwhile (by its builder or another cleaner)
                continue
            stale = time.time() - touched > STALE_BUILD_SECONDS
        if stale:
            shutil.rmtree(work, ignore_errors=True)
            logger.info("removed %s, left by an index build that did not finish", work)
            removed.append(work)
    return removed


def build_index(data: Dataset, cache_dir: Optional[str] = None, num_proc: Optional[int] = None) -> Dataset:
    """Columns `frames`, `rate` (the file's own), `error`, `name`, one row per item of `data`, read from headers by
    `Dataset.map` in batches (the audio column is never held whole), in `num_proc` processes (default: up to 8 for
    10,000 items or more), and cached under `cache_dir/index/` so that a second launch or a resume reads it back."""
    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if len(data) >= 10000 else None
    num_proc = num_proc if num_proc and num_proc > 1 and len(data) >= 2 * num_proc else None
    fingerprint = _index_fingerprint(data)
    if fingerprint is None:
        return data.map(_index_batch, batched=True, batch_size=256, input_columns=["audio"],
                        remove_columns=data.column_names, num_proc=num_proc, desc="reading audio headers")
    folder = cache_root(cache_dir) / "index"
    final = folder / f"{fingerprint}.arrow"
    if final.exists():
        return Dataset.from_file(str(final))
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(folder)
    work = Path(tempfile.mkdtemp(dir=folder, prefix=f".building-{socket.gethostname()}-{os.getpid()}-"))
    try:
        index = data.map(_index_batch, batched=True, batch_size=256, input_columns=["audio"],
                         remove_columns=data.column_names, num_proc=num_proc, cache_file_name=str(work / "part.arrow"),
                         new_fingerprint=fingerprint, desc="reading audio headers",
                         fn_kwargs={"mapped": arrow_files(data)})
        # one Arrow stream file, renamed into place when complete (num_proc writes one file per process)
        table = index.data.table if hasattr(index.data, "table") else index.data
        with pa.OSFile(str(work / "index.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(work / "index.arrow", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Dataset.from_file(str(final))
