"""Audio data for Poolformer: Hugging Face `datasets` in, fixed-length token sequences out.

Sources: a Hub dataset repo id, a local folder of audio files (wav/flac/ogg, zips are unpacked), a local folder
that `datasets.load_dataset` understands (parquet/arrow), or nothing: a small spoken-digit set rendered offline
with espeak-ng. Protocols fix the split and the quantisation of the thesis' data sets:

| protocol   | split                                                      | quantisation | items                         |
|------------|------------------------------------------------------------|--------------|-------------------------------|
| sc09       | `validation_list.txt` / `testing_list.txt`, rest is train  | mu-law       | one clip per file, padded     |
| beethoven  | file index 0-3807 / 3808-4067 / 4068-4327                  | linear       | one clip per file, padded     |
| youtubemix | files in name order: first 88% / next 6% / last 6%         | mu-law       | fixed windows cut from files  |
| generic    | the dataset's own splits, or train/validation/test         | the model's  | windows (or padded clips)     |
|            | subfolders, or all files as train                          |              |                               |

One rule for every source without a validation split (a Hub dataset or a folder, with or without a test split): a
stable 5% of the training items (at least one) becomes the validation split, chosen by a hash of each item's file
path (or its row number), so the same item always lands on the same side.

Audio is decoded with soundfile (no FFmpeg), mixed to mono, resampled to the model's rate with soxr, optionally
min-max scaled per clip, quantised, and prefixed with the zero token. A 16-bit model (`quantization="pcm"`,
65,536 values) reads any protocol's split as 16-bit PCM: the files' int16 samples themselves (no float round trip,
no min-max scaling), rounded only where channels are mixed, the audio is resampled or the file holds floats.
Padding is masked out of the loss (`labels = -100`). Files that cannot be read or are empty are skipped and counted,
never a crash mid-epoch.

Byte models (`quantization="bytes"`) and the `bytes` and `enwik8` protocols read text as raw bytes instead:
`training/text_data.py`, which `build_datasets` hands them to.
"""

import functools
import hashlib
import inspect
import io
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import soundfile
import torch
from datasets import Audio, Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset_builder

from modeling_poolformer import encode_audio
from modeling_poolformer.audio import float_to_pcm16, pcm_tokens, resample
from training.utils import check_flags, check_local_or_hub

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
PROTOCOLS = ("auto", "sc09", "beethoven", "youtubemix", "generic", "bytes", "enwik8")  # the last two: text_data.py
SPLITS = ("train", "validation", "test")
# the protocol's own settings; None means "take the model config's"
PROTOCOL_DEFAULTS = {
    "sc09": dict(quantization="mu-law", mode="pad", seq_len=16000),
    "beethoven": dict(quantization="linear", mode="pad", seq_len=128000),
    "youtubemix": dict(quantization="mu-law", mode="window", seq_len=131072),
    "generic": dict(quantization=None, mode="window", seq_len=16000),
}
KNOWN_REPOS = {"krandiash/sc09": "sc09", "krandiash/beethoven": "beethoven", "krandiash/youtubemix": "youtubemix"}
VALIDATION_FRACTION = 0.05
STREAMING_DATASETS = "4.0.0"  # the oldest datasets release whose stream state_dict() resumes exactly (tested)
STREAM_SHARDS = 64  # shards of a streamed folder: any process count up to 64 that divides it reads whole shards


@dataclass
class DataArguments:
    """The data flags of every script (train, evaluate, train_classifier, analyze), parsed with transformers'
    `HfArgumentParser`."""

    dataset: Optional[str] = field(default=None, metadata={
        "help": "a Hub dataset repo id or a local folder (audio files, zips, or parquet/arrow); default: the "
                "built-in spoken digits"})
    protocol: str = field(default="auto", metadata={"help": "split and quantisation protocol", "choices": PROTOCOLS})
    audio_column: str = field(default="audio", metadata={"help": "audio column of a generic Hub dataset"})
    dataset_config: Optional[str] = field(default=None, metadata={
        "help": "the Hub dataset's configuration (e.g. v0.02 of google/speech_commands)"})
    seq_len: Optional[int] = field(default=None, metadata={
        "help": "samples per item (default: the protocol's, 16000 for SC09)"})
    mode: Optional[str] = field(default=None, metadata={
        "help": "pad whole clips, or cut fixed windows (default: the protocol's)", "choices": ("pad", "window")})
    no_minmax: bool = field(default=False, metadata={"help": "skip per-clip min-max scaling before quantisation"})
    cache_dir: Optional[str] = field(default=None, metadata={
        "help": "where datasets, file indexes (index/) and the rendered default set are cached (default: "
                "~/.cache/poolformer-hf; Hub downloads: datasets' own cache)"})
    streaming: bool = field(default=False, metadata={
        "help": "read the dataset as a stream (load_dataset(..., streaming=True)): nothing is downloaded or indexed "
                "ahead; each process reads its own shards; training counts --max_steps"})
    shuffle_buffer: int = field(default=1000, metadata={
        "help": "with --streaming: items in the shuffle buffer (0: stream order); checkpoints hold the buffer"})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={
        "help": "processes that read the file headers for the index (default: up to 8 for 10,000 files or more)"})
    text_column: str = field(default="text", metadata={
        "help": "byte models: the text (or binary) column of a Hub or parquet dataset"})
    separator_byte: Optional[int] = field(default=None, metadata={
        "help": "byte models, protocol bytes: the byte between documents (default: the model's start byte, 0); -1: "
                "none, for datasets whose rows are lines that keep their newline (wikitext)"})

    def __post_init__(self):
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq_len must be >= 1, got {self.seq_len}")
        if self.streaming:
            import datasets
            from packaging.version import Version

            if Version(datasets.__version__) < Version(STREAMING_DATASETS):
                raise ValueError(f"--streaming needs datasets >= {STREAMING_DATASETS} (older releases do not resume a "
                                 f"stream exactly), this is {datasets.__version__}: pip install -U datasets")
        check_flags(self, [("shuffle_buffer", lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
                           ("preprocessing_num_workers", lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
                           ("separator_byte", lambda v: isinstance(v, int) and -1 <= v <= 255,
                            "an int in [0, 255], or -1 for none")])
        if self.dataset is not None:
            check_local_or_hub(self.dataset, "--dataset")


# ---------------------------------------------------------------------------------------------------------------------
# The embedded default: spoken digits rendered with espeak-ng, laid out like SC09
# ---------------------------------------------------------------------------------------------------------------------

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# voice names both the espeak-ng tool and its library resolve ("en" is British English; "en-gb+m3" would lose its variant)
VOICES = ("en-us", "en", "en-gb-scotland", "en-029", "en-us+f3", "en+m3", "en-gb-x-rp", "en-us+f2")
VARIANTS = ((120, 40), (150, 50), (180, 60), (140, 70), (165, 35), (130, 55))  # (words per minute, pitch)


def espeak_renderer(prefer_library: bool = False):
    """A function `(text, voice, words_per_minute, pitch) -> (float32 waveform, rate)` speaking through espeak-ng:
    its command-line tool when installed (Debian: apt-get install espeak-ng), else the library and voice data that
    the `espeakng-loader` wheel ships (installed with the `train` extra), so no system package is required."""
    if shutil.which("espeak-ng") and not prefer_library:
        def render_cli(text, voice, speed, pitch):
            proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                                  capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"espeak-ng failed with voice {voice!r}: {proc.stderr.decode().strip()}")
            return soundfile.read(io.BytesIO(proc.stdout), dtype="float32")

        return render_cli
    try:
        import espeakng_loader
    except ImportError:
        raise RuntimeError(
            "The built-in spoken-digit set is rendered with espeak-ng: install the espeakng-loader wheel "
            "(pip install espeakng-loader, part of the train extra) or the espeak-ng tool (apt-get install "
            "espeak-ng). Or pass --dataset."
        ) from None
    import ctypes

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
    rate = lib.espeak_Initialize(2, 0, data_parent, 0)  # AUDIO_OUTPUT_SYNCHRONOUS: samples come to the callback
    if rate <= 0:
        raise RuntimeError(f"espeak-ng (from espeakng-loader) failed to initialise: {rate}")
    chunks = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    def collect(samples, count, events):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    lib.espeak_SetSynthCallback(collect)

    def render_library(text, voice, speed, pitch):
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(1, speed, 0)  # espeakRATE
        lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
        chunks.clear()
        data = text.encode()
        lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)  # POS_CHARACTER, espeakCHARS_AUTO
        return np.concatenate(chunks).astype(np.float32) / 32768.0, rate

    render_library.callback = collect  # the library holds a pointer to it: keep it alive with the renderer
    return render_library


def make_spoken_digits(root: Path, voices=VOICES, variants=VARIANTS, sample_rate: int = 16000, render=None) -> Path:
    """Renders `len(voices) * len(variants)` clips per digit into `root` (once), SC09-style: `<digit>/<id>.wav`,
    at most 1 s, with the last voice as the test speakers and the one before as validation speakers. `render`:
    see `espeak_renderer` (its default)."""
    root = Path(root)
    if (root / "testing_list.txt").exists():
        return root
    render = render or espeak_renderer()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".tmp"))
    lists = {"validation": [], "test": []}
    for digit in DIGITS:
        (tmp / digit).mkdir()
        for v, voice in enumerate(voices):
            for k, (speed, pitch) in enumerate(variants):
                wave, rate = render(digit, voice, speed, pitch)
                wave = resample(wave, rate, sample_rate)[:sample_rate]
                name = f"{digit}/v{v}_{k}.wav"
                soundfile.write(tmp / name, wave, sample_rate, subtype="PCM_16")
                if v == len(voices) - 2:
                    lists["validation"].append(name)
                elif v == len(voices) - 1:
                    lists["test"].append(name)
    (tmp / "validation_list.txt").write_text("\n".join(lists["validation"]) + "\n")
    (tmp / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n")
    try:
        tmp.rename(root)  # atomic: a half-rendered set is never seen
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return root


def spoken_digits_folder(cache: Path, sample_rate: int) -> Path:
    """Where the built-in set rendered at `sample_rate` is cached: `spoken_digits_v1` at 16 kHz (its name from the
    start), `spoken_digits_v1_<rate>hz` at any other rate. A `spoken_digits_v1` whose clips are at another rate (older
    versions rendered it there for any model) is left alone: the 16 kHz set goes to `spoken_digits_v1_16000hz`."""
    cache = Path(cache)
    if sample_rate != 16000:
        return cache / f"spoken_digits_v1_{sample_rate}hz"
    root = cache / "spoken_digits_v1"
    clip = next(root.glob("*/*.wav"), None) if (root / "testing_list.txt").exists() else None
    if clip is not None and soundfile.info(str(clip)).samplerate != sample_rate:
        logger.warning("%s holds clips at %d Hz (rendered for another model by an older version): the %d Hz set is "
                       "rendered in %s_%dhz", root, soundfile.info(str(clip)).samplerate, sample_rate, root.name,
                       sample_rate)
        return cache / f"spoken_digits_v1_{sample_rate}hz"
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Sources and split protocols
# ---------------------------------------------------------------------------------------------------------------------


def _unpack_zips(root: Path) -> None:
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


def _audio_files(root: Path) -> list:
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


def _find(root: Path, name: str) -> Optional[Path]:
    hits = sorted(Path(folder) / name for folder, _, names in os.walk(root, followlinks=True) if name in names)
    return hits[0] if hits else None


def split_sc09(root: Path, files: list) -> dict:
    val_list, test_list = _find(root, "validation_list.txt"), _find(root, "testing_list.txt")
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


SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}


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
    release_mapped_pages(_arrow_files(train))
    return train.select(kept), train.select(held)


SPLITTERS = {"sc09": split_sc09, "beethoven": split_beethoven, "youtubemix": split_youtubemix, "generic": split_generic}


def load_splits(dataset: Optional[str], protocol: str = "auto", audio_column: str = "audio",
                cache_dir: Optional[str] = None, sample_rate: int = 16000, dataset_config: Optional[str] = None,
                streaming: bool = False) -> tuple:
    """Returns (protocol, {split: datasets.Dataset with an undecoded `audio` column}), or with `streaming`
    {split: datasets.IterableDataset}: parquet/arrow sources (Hub or local) through `load_dataset(...,
    streaming=True)`, never downloaded or converted as a whole; a folder of audio files as its file list in
    STREAM_SHARDS shards. Errors are raised here, before any training starts."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    cache = Path(cache_dir or Path.home() / ".cache" / "poolformer-hf")
    if dataset is None:
        root, protocol = make_spoken_digits(spoken_digits_folder(cache, sample_rate), sample_rate=sample_rate), "sc09"
    elif Path(dataset).expanduser().is_dir():
        root = Path(dataset).expanduser()
    else:
        check_local_or_hub(dataset, "--dataset")
        if protocol == "auto":
            protocol = KNOWN_REPOS.get(dataset, "generic")
        if protocol in ("generic", "sc09") and dataset not in KNOWN_REPOS:  # a parquet/arrow dataset on the Hub
            data = load_tables(dataset, dataset_config, cache_dir=cache_dir, streaming=streaming)
            return protocol, _hub_splits(data, audio_column, digits_only=protocol == "sc09")
        from huggingface_hub import snapshot_download  # file-based repos (zips, lists) come down as a folder

        root = Path(snapshot_download(dataset, repo_type="dataset", cache_dir=cache_dir))
    _unpack_zips(root)
    files = _audio_files(root)
    if not files:
        tables = any(next(root.rglob(f"*.{ext}"), None) for ext in ("parquet", "arrow"))
        if protocol in ("auto", "generic") or (protocol == "sc09" and tables):  # parquet/arrow: datasets reads it
            data = load_tables(str(root), cache_dir=cache_dir, streaming=streaming)
            protocol = "sc09" if protocol == "sc09" else "generic"
            return protocol, _hub_splits(data, audio_column, digits_only=protocol == "sc09")
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")
    if protocol == "auto":
        protocol = "sc09" if _find(root, "testing_list.txt") else "generic"
    splits = SPLITTERS[protocol](root, files)
    out = {}
    for name, paths in splits.items():
        if paths:
            rel = [p.relative_to(root).as_posix() for p in paths]  # the hash of a path must not depend on `root`
            ds = Dataset.from_dict({"audio": [str(p) for p in paths], "path": [str(p) for p in paths], "key": rel})
            out[name] = ds.cast_column("audio", Audio(decode=False))
    if "train" not in out:
        raise ValueError(f"protocol {protocol!r} found no training files under {root}")
    out = _with_validation(out)
    if streaming:  # shards of the file list, so that processes and workers each read their own files
        out = {name: ds.to_iterable_dataset(num_shards=min(len(ds), STREAM_SHARDS)) for name, ds in out.items()}
        _mark_stream_source(out, [f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}"
                                  for paths in splits.values() for p in paths])
    return protocol, out


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


MADV_DONTNEED = 4
RELEASE_EVERY = 64  # a map-style dataset drops the Arrow pages it mapped every this many items
STREAM_RELEASE_EVERY = 256  # a stream hands Arrow's freed memory back every this many files read


def release_mapped_pages(paths) -> int:
    """Drops the pages of the memory-mapped files `paths` (a Dataset's Arrow cache files) from this process
    (`madvise(MADV_DONTNEED)` over their mappings, found in /proc/self/maps): reading rows maps their pages (and the
    kernel's read-around), and they would stay counted in the process's RSS (RssFile) until it ends. The mappings
    stay valid: a later read maps the pages again from the page cache. Returns the bytes of the mappings released
    (0 where this is not Linux)."""
    global _libc
    paths = {os.path.realpath(p) for p in paths}
    if not paths or not os.path.exists("/proc/self/maps"):
        return 0
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                if _libc.madvise(start, end - start, MADV_DONTNEED) == 0:
                    released += end - start
    return released


_libc = None


def _arrow_files(data: Dataset) -> list:
    return [f["filename"] for f in data.cache_files]


def _stable_fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def carve_validation_stream(train) -> tuple:
    """carve_validation for a stream: the same hash of each item's key or path (its position in the stream when it
    has neither), applied as a filter on the fly."""
    def held(example, i):
        key = example.get("key") or example.get("path") or (example.get("audio") or {}).get("path") or f"row {i}"
        return _stable_fraction(key) < VALIDATION_FRACTION

    return (train.filter(lambda ex, i: not held(ex, i), with_indices=True), train.filter(held, with_indices=True))


def _with_validation(splits: dict) -> dict:
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


def _array_dtype(features) -> Optional[str]:
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
        dtype = _array_dtype({"audio": feature})
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


def _hub_splits(data, audio_column: str, digits_only: bool = False) -> dict:
    if isinstance(data, IterableDataset):
        data = IterableDatasetDict({"train": data})
    elif not isinstance(data, (DatasetDict, IterableDatasetDict)):
        data = DatasetDict({"train": data})
    if digits_only:
        data = _digits_only(data)
    columns = next(iter(data.values())).column_names
    if columns is not None and audio_column not in columns:
        raise ValueError(f"--audio_column {audio_column!r} is not a column of the dataset; it has {columns}")
    names = {"valid": "validation", "val": "validation", "dev": "validation"}
    feature = (next(iter(data.values())).features or {}).get(audio_column)
    _check_audio_feature(feature, audio_column)
    decoded = isinstance(feature, dict) and {"array", "sampling_rate"} <= set(feature)
    out = {}
    for split, ds in data.items():
        if not decoded:  # encoded audio (bytes or paths): decoded by soundfile per item; arrays are used as they are
            ds = ds.cast_column(audio_column, Audio(decode=False))
        if audio_column != "audio":
            ds = ds.rename_column(audio_column, "audio")
        out[names.get(split, split)] = ds
    out = _with_validation(out)
    if isinstance(next(iter(out.values())), IterableDataset):  # streamed: marked with the data files it reads (for
        # the Hub, addresses that name the commit: the dataset's revision)
        files = sorted({f for ds in out.values() for f in _data_files(ds)})
        _mark_stream_source(out, [f"{f}\0{os.path.getsize(f) if os.path.isfile(f) else ''}" for f in files] or None)
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


def _mark_stream_source(splits: dict, entries: Optional[list]):
    """Records on each streamed split what defines the stream (`defined_by`: the number of files and a digest of
    their names and sizes): a checkpoint's stream state keeps it, and a resume on other files is refused."""
    if entries is None:
        return
    digest = hashlib.sha1("\n".join(sorted(entries)).encode()).hexdigest()
    for ds in splits.values():
        ds.defined_by = {"files": len(entries), "digest": digest}


# ---------------------------------------------------------------------------------------------------------------------
# Token sequences: a header-only index (cached), windowed reads, and the streamed variant
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class AudioSpec:
    sample_rate: int = 16000
    quantization: str = "mu-law"
    levels: int = 256
    bos: int = 128
    seq_len: int = 16000  # samples per item, not counting the zero token
    mode: str = "pad"  # "pad": one clip per file, padded and masked; "window": fixed windows cut from files
    minmax: bool = True  # per-clip min-max scaling to [-1, 1] before quantisation

    @property
    def pcm16(self) -> bool:
        """16-bit linear PCM: samples are read as int16 and become tokens without a float in between."""
        return self.quantization == "pcm" and self.levels == 65536


INDEX_VERSION = 1  # bump when the index's columns or their meaning change: old cached indexes are then not reused
RESAMPLE_MARGIN = 512  # extra frames read on both sides of a resampled window: soxr's filter sees real context
# soundfile subtypes whose samples are floats: read as float32 and rounded, never read as int16 (unscaled there)
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE", "VORBIS", "OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III")


def _source(audio: dict):
    return io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"]


def _header(audio: dict) -> tuple:
    """(frames, sample rate) at the item's own rate: its header, or a decoded array's length."""
    if audio.get("array") is not None:
        return len(audio["array"]), int(audio["sampling_rate"])
    info = soundfile.info(_source(audio))
    return info.frames, info.samplerate


def _index_batch(audio: list, mapped: tuple = ()) -> dict:
    """`Dataset.map` body: the header of each item (never its samples); an error string where it cannot be read.
    The pages of the `mapped` Arrow files that the batch's rows were read from are dropped afterwards."""
    out = {"frames": [], "rate": [], "error": [], "name": []}
    for a in audio:
        try:
            frames, rate = _header(a)
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
    folder = Path(cache_dir or Path.home() / ".cache" / "poolformer-hf") / "index"
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
                         fn_kwargs={"mapped": _arrow_files(data)})
        # one Arrow stream file, renamed into place when complete (num_proc writes one file per process)
        table = index.data.table if hasattr(index.data, "table") else index.data
        with pa.OSFile(str(work / "index.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(work / "index.arrow", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Dataset.from_file(str(final))


def read_audio(audio: dict, sample_rate: int, start: int = 0, length: Optional[int] = None,
               file_frames: Optional[int] = None, file_rate: Optional[int] = None, pcm16: bool = False,
               array_dtype: Optional[str] = None) -> np.ndarray:
    """Mono float32 samples `[start, start + length)` of an item at `sample_rate`. Encoded audio is read from the
    frames that hold them only (soundfile `start`/`frames` at the file's own rate); when it must be resampled,
    RESAMPLE_MARGIN frames more on each side are read, from a frame that maps onto a whole output sample, so the
    window equals the same slice of the whole file resampled up to float rounding at the resampler's precision.
    Decoded arrays are resampled whole and sliced; integer arrays are PCM, scaled by their type's range
    (`pcm_to_float`; `array_dtype` names the type of arrays that arrive as lists of Python ints).

    `pcm16`: int16 samples instead. A mono integer-PCM file at `sample_rate` gives its own samples, read as integers
    (soundfile's `dtype="int16"`; libsndfile converts other integer widths); channels are averaged and rounded, and
    floating-point files (FLOAT, DOUBLE, lossy codecs) and resampled audio are rounded to int16 as libsndfile scales
    floats. Non-finite samples are an error (the caller masks or skips the item)."""
    if audio.get("array") is not None:
        samples = pcm_to_float(np.asarray(audio["array"], dtype=array_dtype))
        samples = samples.mean(axis=1) if samples.ndim == 2 else samples
        wave = resample(samples, int(audio["sampling_rate"]), sample_rate)
        wave = wave[start : None if length is None else start + length]
        return _to_pcm16(wave) if pcm16 else wave
    if file_frames is None or file_rate is None:
        file_frames, file_rate = _header(audio)
    if file_rate == sample_rate:
        first, stop, offset = start, file_frames if length is None else min(file_frames, start + length), 0
    else:
        step = file_rate // math.gcd(file_rate, sample_rate)  # file frames per whole number of output samples
        first = max(0, (start * file_rate // sample_rate - RESAMPLE_MARGIN) // step * step)
        stop = file_frames if length is None else min(file_frames, -(-(start + length) * file_rate // sample_rate)
                                                      + RESAMPLE_MARGIN)
        offset = start - first * sample_rate // file_rate
    if stop <= first:
        return np.zeros(0, dtype=np.float32)
    if pcm16 and file_rate == sample_rate:  # the file's integers, never through a float
        with soundfile.SoundFile(_source(audio)) as f:
            if f.subtype not in FLOAT_SUBTYPES:  # (libsndfile's int16 reading of a float file does not scale it)
                f.seek(first)
                samples = f.read(stop - first, dtype="int16", always_2d=True)
                if samples.shape[1] == 1:
                    return samples[:, 0]
                return np.round(samples.mean(axis=1)).astype(np.int16)
    samples, rate = soundfile.read(_source(audio), start=first, frames=stop - first, dtype="float32", always_2d=True)
    wave = resample(samples.mean(axis=1), rate, sample_rate)
    wave = wave[offset : None if length is None else offset + length]
    return _to_pcm16(wave) if pcm16 else wave


def _to_pcm16(wave: np.ndarray) -> np.ndarray:
    if not np.isfinite(wave).all():  # NaN has no int16 value: the same error as quantize's
        raise ValueError(f"{int((~np.isfinite(wave)).sum())} samples are NaN or infinite")
    return float_to_pcm16(torch.from_numpy(np.ascontiguousarray(wave))).numpy()


def pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Decoded samples as float32 in [-1, 1]: floats as they are; integer PCM divided by its type's half range
    (int8 by 128, int16 by 32768, int32 by 2**31), unsigned types offset-binary (uint8 128 is silence), as
    libsndfile reads such files."""
    if samples.dtype.kind == "f":
        return samples.astype(np.float32)
    if samples.dtype.kind not in "iu" or samples.dtype.itemsize > 4:
        raise ValueError(f"decoded audio arrays must be floats in [-1, 1] or integer PCM (int8, uint8, int16, "
                         f"uint16, int32, uint32), got {samples.dtype} (a list of Python ints has no width: store the "
                         "arrays typed)")
    half = 2.0 ** (8 * samples.dtype.itemsize - 1)
    offset = half if samples.dtype.kind == "u" else 0.0
    return ((samples.astype(np.float64) - offset) / half).astype(np.float32)


def quantize(wave: np.ndarray, spec: AudioSpec) -> torch.Tensor:
    """Tokens of one clip or window (no zero token): optional min-max scaling to [-1, 1], then the spec's
    quantisation. Integer samples (`read_audio(..., pcm16=True)`) of a 16-bit pcm spec become tokens as they are."""
    if np.issubdtype(np.asarray(wave).dtype, np.integer):
        if not spec.pcm16:
            raise ValueError(f"integer samples need a 16-bit pcm spec, this one is {spec.levels}-level "
                             f"{spec.quantization}")
        return pcm_tokens(wave, spec.levels)
    wave = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if not torch.isfinite(wave).all():  # NaN/inf would defeat min-max scaling and quantise to 0/255
        raise ValueError(f"{int((~torch.isfinite(wave)).sum())} samples are NaN or infinite")
    if spec.minmax and wave.numel() and wave.max() > wave.min():
        wave = (wave - wave.min()) / (wave.max() - wave.min()) * 2 - 1
    return encode_audio(wave, spec.quantization, spec.levels)


def token_item(tokens: torch.Tensor, spec: AudioSpec) -> dict:
    """`input_ids`, `attention_mask`, `labels`, each `(seq_len + 1,)`: the zero token, the tokens, padding that the
    mask and the labels (-100) leave out."""
    tokens = tokens[: spec.seq_len].long()
    input_ids = torch.full((spec.seq_len + 1,), spec.bos, dtype=torch.long)
    input_ids[1 : 1 + len(tokens)] = tokens
    attention_mask = torch.zeros(spec.seq_len + 1, dtype=torch.long)
    attention_mask[: 1 + len(tokens)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _compact(tokens: torch.Tensor) -> np.ndarray:
    """Tokens in the smallest unsigned type that holds them: what a shuffle buffer keeps (and a checkpoint saves)."""
    return tokens.numpy().astype(np.uint8 if (tokens.numel() == 0 or int(tokens.max()) < 256) else np.uint16)


class AudioTokenDataset(torch.utils.data.Dataset):
    """Items are dicts of `input_ids`, `attention_mask`, `labels`, each `(seq_len + 1,)`, the first token the zero
    token. The index (`self.index`, rows of `(row, start)`) comes from the files' headers (`build_index`, cached);
    an item reads only its own frames. Unreadable or empty files are dropped when the index is built
    (`self.skipped` names them); a file that fails later gives a fully masked item (`self.bad_items` counts them in
    this process)."""

    def __init__(self, data: Dataset, spec: AudioSpec, name: str = "train", cache_dir: Optional[str] = None,
                 num_proc: Optional[int] = None):
        self.data, self.spec, self.name = data, spec, name
        self.bad_items = 0
        self._mapped, self._reads = _arrow_files(data), 0
        header = build_index(data, cache_dir, num_proc).data  # the Arrow table: whole columns at once
        self.file_frames = header.column("frames").to_numpy().astype(np.int64)
        self.file_rate = header.column("rate").to_numpy().astype(np.int64)
        self.array_dtype = _array_dtype(data.features)  # of decoded integer arrays (lists of ints)
        errors = np.asarray(header.column("error").to_pylist(), dtype=str)
        names = header.column("name").to_pylist()
        self.skipped = [f"{names[r]}: {errors[r]}" for r in np.flatnonzero(errors != "")]
        good = np.flatnonzero(errors == "")
        frames = self.file_frames[good] * spec.sample_rate // np.maximum(self.file_rate[good], 1)
        good, frames = good[frames > 0], frames[frames > 0]
        if spec.mode == "pad":
            self.index = np.stack([good, np.zeros_like(good)], axis=1)
        else:  # every full window; a file shorter than one window gives one padded item
            counts = np.maximum(frames - spec.seq_len, 0) // spec.seq_len + 1
            rows = np.repeat(good, counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            self.index = np.stack([rows, (np.arange(len(rows)) - first) * spec.seq_len], axis=1)
        if self.skipped:
            logger.warning("%s: skipped %d unreadable or empty files, e.g. %s", name, len(self.skipped), self.skipped[0])

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        row, start = (int(v) for v in self.index[i])
        spec = self.spec
        audio = self.data[row]["audio"]
        self._reads += 1
        if self._mapped and self._reads % RELEASE_EVERY == 0:  # RssFile stays bounded over an epoch
            release_mapped_pages(self._mapped)
        try:
            wave = read_audio(audio, spec.sample_rate, start, spec.seq_len, int(self.file_frames[row]),
                              int(self.file_rate[row]), pcm16=spec.pcm16, array_dtype=self.array_dtype)
            tokens = quantize(wave, spec)
        except Exception as err:  # noqa: BLE001 - a file that breaks after its header was read: a masked item
            self.bad_items += 1
            logger.warning("%s: item %d (%s) is masked out: %s (%d such items in this process)", self.name, i,
                           audio.get("path"), err, self.bad_items)
            tokens = torch.zeros(0, dtype=torch.long)
        return token_item(tokens, spec)


class AudioTokenStream(torch.utils.data.IterableDataset):
    """Token items cut on the fly from a streamed `datasets.IterableDataset` (one item per clip in pad mode, every
    window of a file in window mode), shuffled through a buffer of `shuffle_buffer` items (0: stream order). Each
    process reads its own shards (`split_dataset_by_node`); the stream restarts at its end (`self.epoch` counts),
    so training counts steps. `state_dict()` is exact: the source stream's own `state_dict()` taken after the last
    file that went into the buffer, the buffer (tokens in 1 or 2 bytes each) and the shuffle's RNG, so a resumed
    stream yields what the uninterrupted one would have. Iterate it in the main process (DataLoader num_workers=0)
    when its state is saved: a worker's position is not visible to the main process. Unreadable or empty files
    are skipped and counted (`self.skipped`)."""

    def __init__(self, source, spec: AudioSpec, name: str = "train", shuffle_buffer: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, repeat: bool = True):
        from datasets.distributed import split_dataset_by_node

        self.array_dtype = _array_dtype(source.features)
        self.defined_by = getattr(source, "defined_by", None)  # the files the stream reads (load_splits)
        self.source = split_dataset_by_node(source, rank, world_size) if world_size > 1 else source
        self.spec, self.name, self.shuffle_buffer, self.repeat = spec, name, shuffle_buffer, repeat
        self.seed, self.rank = seed, rank
        self.epoch, self.skipped, self.bad_items, self.first_error = 0, 0, 0, None
        self._buffer, self._source_state = [], None
        self._rng = np.random.default_rng([seed, rank])

    def _items(self, example: dict) -> list:
        """The compact token arrays of one streamed file: its clip, or all its windows."""
        spec, audio = self.spec, example["audio"]
        try:
            wave = read_audio(audio, spec.sample_rate, pcm16=spec.pcm16, array_dtype=self.array_dtype)
            if wave.size == 0:
                raise ValueError("empty")
            if spec.mode == "pad":
                pieces = [wave[: spec.seq_len]]
            else:
                starts = range(0, max(len(wave) - spec.seq_len, 0) + 1, spec.seq_len)
                pieces = [wave[s : s + spec.seq_len] for s in starts]
            return [_compact(quantize(p, spec)) for p in pieces]
        except Exception as err:  # noqa: BLE001 - a bad file in a stream is skipped and counted, never a crash
            self.skipped += 1
            self.first_error = self.first_error or f"{audio.get('path')}: {err}"
            logger.warning("%s: skipped an unreadable or empty streamed file (%d so far): %s", self.name,
                           self.skipped, f"{audio.get('path')}: {err}")
            return []

    def __iter__(self):
        epoch_items = read = 0
        while True:
            self.source.set_epoch(self.epoch)
            if self._source_state is not None:
                self.source.load_state_dict(self._source_state)
            examples = iter(self.source)
            exhausted = False
            while True:
                while not exhausted and len(self._buffer) < max(1, self.shuffle_buffer):
                    example = next(examples, None)
                    if example is None:
                        exhausted = True
                        break
                    self._buffer.extend(self._items(example))
                    self._source_state = self.source.state_dict()
                    read += 1
                    if read % STREAM_RELEASE_EVERY == 0:  # what the parquet reader freed goes back to the system
                        pa.default_memory_pool().release_unused()
                if not self._buffer:
                    break
                i = int(self._rng.integers(len(self._buffer))) if self.shuffle_buffer > 1 else 0
                tokens = self._buffer.pop(i) if i == 0 else self._swap_pop(i)
                epoch_items += 1
                yield token_item(torch.from_numpy(tokens.astype(np.int64)), self.spec)
            self.epoch, self._source_state = self.epoch + 1, None
            if not self.repeat:
                return
            if epoch_items == 0:
                raise ValueError(f"{self.name}: the stream gave no readable item in a whole pass "
                                 f"({self.skipped} files skipped, e.g. {self.first_error})")
            epoch_items = 0

    def _swap_pop(self, i):
        self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
        return self._buffer.pop()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "source": self._source_state, "buffer": list(self._buffer),
                "rng": self._rng.bit_generator.state, "skipped": self.skipped, "rank": self.rank,
                "defined_by": self.defined_by}

    def load_state_dict(self, state: dict):
        """Resumes the stream; refused when its files changed since the state was saved (files added, removed or
        resized, another revision of a Hub dataset): its shards and hash-carved validation items would be others."""
        if state["rank"] != self.rank:
            raise ValueError(f"a stream state saved by process {state['rank']} cannot resume process {self.rank}")
        then, now = state.get("defined_by"), self.defined_by
        if then is None or now is None:
            logger.warning("%s: the stream's files cannot be compared with the saved state's (%s): if they changed, the "
                           "resumed stream is not the one the run read", self.name,
                           "an older version saved it" if then is None else "this source does not name its files")
        elif then != now:
            raise ValueError(f"{self.name}: the dataset changed since the stream state was saved (it read "
                             f"{then['files']} files, digest {then['digest'][:12]}; it has {now['files']} files, digest "
                             f"{now['digest'][:12]}, now: files added, removed or resized, or another revision), so "
                             "its shards and held-out validation items are others and the run cannot resume exactly. "
                             "Restore the dataset as it was, or start a new run.")
        self.epoch, self._source_state, self.skipped = state["epoch"], state["source"], state["skipped"]
        self._buffer = list(state["buffer"])
        self._rng.bit_generator.state = state["rng"]


def held_out_items(stream: AudioTokenStream, count: int) -> list:
    """The first `count` items of a (validation) stream, in stream order, as a list: the fixed held-out set that
    every evaluation of a streamed run uses."""
    items = []
    for item in stream:
        items.append(item)
        if len(items) >= count:
            break
    return items


def build_datasets(data_args: DataArguments, config, rank: int = 0, world_size: int = 1, seed: int = 0) -> tuple:
    """(protocol, spec, {split: AudioTokenDataset, or AudioTokenStream with --streaming}). The spec's quantisation is
    the protocol's (the model config's for `generic`), except that a pcm model (16-bit) reads every protocol's
    split as pcm, never min-max scaled: its samples are the files' own. The config is only read: a caller whose
    model quantises otherwise decides what to do. Byte models and the byte protocols go to `text_data`."""
    from training.text_data import build_byte_datasets, is_byte_data

    if is_byte_data(data_args.protocol, config):
        return build_byte_datasets(data_args, config, rank, world_size, seed)
    if config.quantization == "bytes":
        raise ValueError(f"--protocol {data_args.protocol} is an audio protocol; this is a byte model "
                         "(quantization='bytes'): use --protocol bytes or enwik8 (or auto)")
    protocol, splits = load_splits(data_args.dataset, data_args.protocol, data_args.audio_column, data_args.cache_dir,
                                   config.sample_rate, data_args.dataset_config, streaming=data_args.streaming)
    defaults = PROTOCOL_DEFAULTS[protocol]
    pcm = config.quantization == "pcm"
    if pcm and not data_args.no_minmax:
        logger.info("pcm quantisation: per-clip min-max scaling is off (the samples are the files' own)")
    spec = AudioSpec(
        sample_rate=config.sample_rate, quantization="pcm" if pcm else defaults["quantization"] or config.quantization,
        levels=config.vocab_size, bos=config.bos_token_id, seq_len=data_args.seq_len or defaults["seq_len"],
        mode=data_args.mode or defaults["mode"], minmax=not (data_args.no_minmax or pcm),
    )
    if data_args.streaming:  # each process reads its own shards of the training stream, and the whole of the others
        # (a validation split may be a single file, one shard): the evaluation's loader divides their items
        sets = {name: AudioTokenStream(ds, spec, name, data_args.shuffle_buffer if name == "train" else 0, seed,
                                       *((rank, world_size) if name == "train" else (0, 1)), repeat=name == "train")
                for name, ds in splits.items()}
    else:
        sets = {name: AudioTokenDataset(ds, spec, name, data_args.cache_dir, data_args.preprocessing_num_workers)
                for name, ds in splits.items()}
    return protocol, spec, sets
