"""Tables in, audio splits out: Hub datasets and local parquet/arrow folders read through `datasets`, with memory
that does not grow with the dataset (parquet read page by page, a first conversion in a child process), and their
audio column checked and renamed to `audio`."""

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Optional

import pyarrow as pa
from datasets import Audio, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset_builder

from training.splits import DIGITS, SPLIT_ALIASES, mark_stream_source, with_validation

logger = logging.getLogger(__name__)

READ_BATCH_BYTES = 8 * 2**20  # parquet is read (converted or streamed) in record batches of about this many bytes
READ_BUFFER_BYTES = 2**20  # through a buffered stream of this size


def load_tables(path: str, name: Optional[str] = None, cache_dir: Optional[str] = None, streaming: bool = False):
    """`datasets.load_dataset(path, name, cache_dir=..., streaming=...)` with memory that does not grow with the
    dataset: parquet is read page by page in record batches of about READ_BATCH_BYTES (`_read_parquet`), a dataset
    not cached yet is converted in a child process (`_prepare_apart`), and Arrow's memory pool hands what it freed
    back to the system (it otherwise keeps it for the whole run). The reader is set on the builder after it has named
    its cache folder: the same cache as `load_dataset`'s."""
    from datasets.packaged_modules.parquet.parquet import Parquet
    from datasets.utils.info_utils import is_small_dataset

    builder = load_dataset_builder(path, name, cache_dir=cache_dir)
    # datasets releases before the (files, row_groups_list) reader keep their own one (bounded only by row groups)
    if (isinstance(builder, Parquet) and getattr(builder.config, "filters", None) is None
            and "row_groups_list" in inspect.signature(builder._generate_tables).parameters):
        builder._generate_tables = functools.partial(_read_parquet, builder)
    if streaming:
        return builder.as_streaming_dataset()
    try:
        _prepare_apart(builder)
        builder.download_and_prepare()  # finds the converted copy (or converts it here)
        return builder.as_dataset(in_memory=is_small_dataset(builder.info.dataset_size))
    finally:
        pa.default_memory_pool().release_unused()


def _prepare_apart(builder) -> None:
    """Downloads and converts a dataset that is not cached yet in a forked child process, so that the conversion's
    heap (Arrow's buffers and pool, the writer's) leaves with it instead of staying in the training process for the
    whole run. Where it fails (or fork is not available), the caller converts in this process, raising the error."""
    import multiprocessing

    if os.path.exists(os.path.join(builder.cache_dir, "dataset_info.json")):
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        return
    child = multiprocessing.get_context("fork").Process(target=builder.download_and_prepare, daemon=False)
    child.start()
    child.join()
    if child.exitcode != 0:
        logger.warning("converting the dataset in a child process failed (exit code %s): converting it here",
                       child.exitcode)


def _read_parquet(builder, files, row_groups_list):
    """The parquet builder's `_generate_tables`, read with `pyarrow.parquet.ParquetFile.iter_batches` through a
    buffered stream: it decodes one page at a time, where datasets' reader (Arrow's dataset scanner) decodes a whole
    row group, hundreds of MB of audio in large files, before slicing it into batches. Same tables, same keys."""
    import sys

    import pyarrow.parquet as pq
    from datasets.builder import Key

    config = builder.config
    opener = getattr(sys.modules[type(builder).__module__], "open", open)  # datasets' remote `open` when streaming
    for file_idx, (file, row_groups) in enumerate(zip(files, row_groups_list)):
        try:
            with opener(file, "rb") as f:
                reader = pq.ParquetFile(f, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
                meta = reader.metadata
                groups = list(row_groups) if row_groups is not None else list(range(meta.num_row_groups))
                row_bytes = max([meta.row_group(g).total_byte_size / max(meta.row_group(g).num_rows, 1)
                                 for g in groups] or [1])
                rows = config.batch_size or max(1, int(READ_BATCH_BYTES // max(row_bytes, 1)))
                batches = reader.iter_batches(batch_size=rows, row_groups=groups, columns=config.columns,
                                              use_threads=False) if groups else []
                for batch_idx, batch in enumerate(batches):
                    yield Key(file_idx, batch_idx), builder._cast_table(pa.Table.from_batches([batch]))
        except (pa.ArrowInvalid, ValueError) as e:
            if config.on_bad_files == "error":
                raise
            logger.warning("skipping the unreadable parquet file %s: %s: %s", file, type(e).__name__, e)


def _digits_only(data: DatasetDict) -> DatasetDict:
    """SC09 out of a Speech Commands-style dataset (35 words, its own splits): the rows whose class label names a
    digit, with the digit's name in front of their `path` (`zero/...`), as the SC09 folders have it."""
    first = next(iter(data.values()))
    label = next((c for c, f in (first.features or {}).items()
                  if hasattr(f, "names") and set(DIGITS) <= set(f.names)), None)
    if label is None:
        raise ValueError("protocol 'sc09' on a dataset without audio files needs a class-label column whose names "
                         f"include the ten digits (as google/speech_commands has); columns: {first.column_names}")
    names = first.features[label].names
    out = {}
    for split, ds in data.items():
        ds = ds.filter(lambda value: names[value] in DIGITS, input_columns=label)
        if isinstance(ds, IterableDataset):  # named on the fly
            def named(example):
                path = f"{names[example[label]]}/{Path(example.get('file') or 'clip.wav').name}"
                return {"path": path, "key": path}

            out[split] = ds.map(named)
            continue
        files = ds["file"] if "file" in ds.column_names else [f"{i}.wav" for i in range(len(ds))]
        paths = [f"{names[v]}/{Path(f).name}" for v, f in zip(ds[label], files)]
        out[split] = ds.remove_columns([c for c in ("path", "key") if c in ds.column_names]).add_column(
            "path", paths).add_column("key", paths)
    return IterableDatasetDict(out) if isinstance(data, IterableDatasetDict) else DatasetDict(out)


INTEGER_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")


def array_dtype(features) -> Optional[str]:
    """The integer type of a decoded `audio` column's arrays, which datasets hands out as lists of Python ints (their
    width lost); None for float arrays, other columns, or unknown features."""
    feature = (features or {}).get("audio")
    if not (isinstance(feature, dict) and "array" in feature):
        return None
    value = feature["array"]
    while hasattr(value, "feature"):  # List(Value), or List(List(Value)) for channels
        value = value.feature
    dtype = getattr(value, "dtype", None)
    return dtype if dtype in INTEGER_DTYPES else None


def _check_audio_feature(feature, column: str):
    """A clear error for an audio column that holds no audio (numbers, labels...), before a cast fails deep in
    Arrow. Unknown features (None) are let through."""
    if feature is None or isinstance(feature, Audio):
        return
    if isinstance(feature, dict) and {"array", "sampling_rate"} <= set(feature):
        dtype = array_dtype({"audio": feature})
        if dtype in ("int64", "uint64"):
            raise ValueError(f"--audio_column {column!r} holds {dtype} arrays: integer PCM arrays must be int8, uint8, "
                             "int16, uint16, int32 or uint32 (their width gives the scale), or floats in [-1, 1]")
        return
    if isinstance(feature, dict) and set(feature) & {"bytes", "path"}:
        return
    if getattr(feature, "dtype", None) in ("string", "large_string", "binary", "large_binary"):
        return
    raise ValueError(f"--audio_column {column!r} holds {feature} values, not audio: expected an Audio column, file "
                     "paths or encoded bytes (or {bytes, path} rows), or decoded {array, sampling_rate} rows; pass the "
                     "dataset's audio column with --audio_column")


def hub_splits(data, audio_column: str, digits_only: bool = False) -> dict:
    if isinstance(data, IterableDataset):
        data = IterableDatasetDict({"train": data})
    elif not isinstance(data, (DatasetDict, IterableDatasetDict)):
        data = DatasetDict({"train": data})
    if digits_only:
        data = _digits_only(data)
    columns = next(iter(data.values())).column_names
    if columns is not None and audio_column not in columns:
        raise ValueError(f"--audio_column {audio_column!r} is not a column of the dataset; it has {columns}")
    feature = (next(iter(data.values())).features or {}).get(audio_column)
    _check_audio_feature(feature, audio_column)
    decoded = isinstance(feature, dict) and {"array", "sampling_rate"} <= set(feature)
    out = {}
    for split, ds in data.items():
        if not decoded:  # encoded audio (bytes or paths): decoded by soundfile per item; arrays are used as they are
            ds = ds.cast_column(audio_column, Audio(decode=False))
        if audio_column != "audio":
            ds = ds.rename_column(audio_column, "audio")
        out[SPLIT_ALIASES.get(split, split)] = ds
    out = with_validation(out)
    if isinstance(next(iter(out.values())), IterableDataset):  # streamed: marked with the data files it reads (for
        # the Hub, addresses that name the commit: the dataset's revision)
        files = sorted({f for ds in out.values() for f in _data_files(ds)})
        mark_stream_source(out, [f"{f}\0{os.path.getsize(f) if os.path.isfile(f) else ''}" for f in files] or None)
    return out


def _data_files(ds: IterableDataset) -> list:
    """The files a streamed `load_dataset` reads (local paths, or hf:// addresses pinned to a commit), from its
    examples iterables; empty when this datasets release keeps them elsewhere."""
    found, todo = [], [getattr(ds, "_ex_iterable", None)]
    while todo:
        node = todo.pop()
        if node is None:
            continue
        files = (getattr(node, "kwargs", None) or {}).get("files")
        if isinstance(files, (list, tuple)):
            found += [str(f) for f in files]
        todo += [getattr(node, "ex_iterable", None), *(getattr(node, "ex_iterables", None) or [])]
    return sorted(set(found))
