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
min-max scaled per clip, quantised, and prefixed with the zero token. Padding is masked out of the loss
(`labels = -100`). Files that cannot be read or are empty are skipped and counted, never a crash mid-epoch.
"""

import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile
import torch
from datasets import Audio, Dataset, DatasetDict, load_dataset

from modeling_poolformer import encode_audio
from modeling_poolformer.audio import resample
from training.utils import check_local_or_hub

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
PROTOCOLS = ("auto", "sc09", "beethoven", "youtubemix", "generic")
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
        "help": "where datasets and the rendered default set are cached"})

    def __post_init__(self):
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"--seq_len must be >= 1, got {self.seq_len}")
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
    paths = train[column] if column else [a.get("path") for a in train["audio"]]
    keys = [p if p else f"row {i}" for i, p in enumerate(paths)]
    hashes = [int(hashlib.sha1(k.encode()).hexdigest()[:8], 16) / 2**32 for k in keys]
    held = [i for i, h in enumerate(hashes) if h < VALIDATION_FRACTION]
    if not held:
        held = [min(range(len(hashes)), key=hashes.__getitem__)]
    held_set = set(held)
    kept = [i for i in range(len(keys)) if i not in held_set]
    return train.select(kept), train.select(held)


SPLITTERS = {"sc09": split_sc09, "beethoven": split_beethoven, "youtubemix": split_youtubemix, "generic": split_generic}


def load_splits(dataset: Optional[str], protocol: str = "auto", audio_column: str = "audio",
                cache_dir: Optional[str] = None, sample_rate: int = 16000, dataset_config: Optional[str] = None) -> tuple:
    """Returns (protocol, {split: datasets.Dataset with an undecoded `audio` column}). Errors are raised here,
    before any training starts."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    cache = Path(cache_dir or Path.home() / ".cache" / "poolformer-hf")
    if dataset is None:
        root, protocol = make_spoken_digits(cache / "spoken_digits_v1", sample_rate=sample_rate), "sc09"
    elif Path(dataset).expanduser().is_dir():
        root = Path(dataset).expanduser()
    else:
        check_local_or_hub(dataset, "--dataset")
        if protocol == "auto":
            protocol = KNOWN_REPOS.get(dataset, "generic")
        if protocol in ("generic", "sc09") and dataset not in KNOWN_REPOS:  # a parquet/arrow dataset on the Hub
            data = load_dataset(dataset, dataset_config, cache_dir=cache_dir)
            return protocol, _hub_splits(data, audio_column, digits_only=protocol == "sc09")
        from huggingface_hub import snapshot_download  # file-based repos (zips, lists) come down as a folder

        root = Path(snapshot_download(dataset, repo_type="dataset", cache_dir=cache_dir))
    _unpack_zips(root)
    files = _audio_files(root)
    if not files:
        tables = any(next(root.rglob(f"*.{ext}"), None) for ext in ("parquet", "arrow"))
        if protocol in ("auto", "generic") or (protocol == "sc09" and tables):  # parquet/arrow: datasets reads it
            data = load_dataset(str(root), cache_dir=cache_dir)
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
    return protocol, _with_validation(out)


def _with_validation(splits: dict) -> dict:
    if "validation" not in splits and "train" in splits:
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
    label = next((c for c, f in first.features.items() if hasattr(f, "names") and set(DIGITS) <= set(f.names)), None)
    if label is None:
        raise ValueError("protocol 'sc09' on a dataset without audio files needs a class-label column whose names "
                         f"include the ten digits (as google/speech_commands has); columns: {first.column_names}")
    names = first.features[label].names
    out = {}
    for split, ds in data.items():
        ds = ds.filter(lambda value: names[value] in DIGITS, input_columns=label)
        files = ds["file"] if "file" in ds.column_names else [f"{i}.wav" for i in range(len(ds))]
        paths = [f"{names[v]}/{Path(f).name}" for v, f in zip(ds[label], files)]
        out[split] = ds.remove_columns([c for c in ("path", "key") if c in ds.column_names]).add_column(
            "path", paths).add_column("key", paths)
    return DatasetDict(out)


def _hub_splits(data, audio_column: str, digits_only: bool = False) -> dict:
    if not isinstance(data, DatasetDict):
        data = DatasetDict({"train": data})
    if digits_only:
        data = _digits_only(data)
    columns = next(iter(data.values())).column_names
    if audio_column not in columns:
        raise ValueError(f"--audio_column {audio_column!r} is not a column of the dataset; it has {columns}")
    names = {"valid": "validation", "val": "validation", "dev": "validation"}
    feature = next(iter(data.values())).features[audio_column]
    decoded = isinstance(feature, dict) and {"array", "sampling_rate"} <= set(feature)
    out = {}
    for split, ds in data.items():
        if not decoded:  # encoded audio (bytes or paths): decoded by soundfile per item; arrays are used as they are
            ds = ds.cast_column(audio_column, Audio(decode=False))
        if audio_column != "audio":
            ds = ds.rename_column(audio_column, "audio")
        out[names.get(split, split)] = ds
    return _with_validation(out)


# ---------------------------------------------------------------------------------------------------------------------
# Token sequences
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


def _source(audio: dict):
    return io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"]


def _frames_and_rate(audio: dict) -> tuple:
    """(frames, sample rate) of an item's audio: its header, or a decoded array's length."""
    if audio.get("array") is not None:
        return len(audio["array"]), int(audio["sampling_rate"])
    info = soundfile.info(_source(audio))
    return info.frames, info.samplerate


def _decode(audio: dict) -> tuple:
    """(mono float32 waveform, sample rate): soundfile for encoded audio, the array itself for decoded audio."""
    if audio.get("array") is not None:
        samples = np.asarray(audio["array"], dtype=np.float32)
        return (samples.mean(axis=1) if samples.ndim == 2 else samples), int(audio["sampling_rate"])
    samples, rate = soundfile.read(_source(audio), dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate


class AudioTokenDataset(torch.utils.data.Dataset):
    """Items are dicts of `input_ids`, `attention_mask`, `labels`, each `(seq_len + 1,)`, the first token the zero
    token. Unreadable or empty files are dropped when the dataset is built (`self.skipped` counts them)."""

    def __init__(self, data: Dataset, spec: AudioSpec, name: str = "train"):
        self.data, self.spec, self.name = data, spec, name
        self.index, self.skipped, self.bad_items = [], [], 0
        for row, audio in enumerate(data["audio"]):
            try:
                frames, rate = _frames_and_rate(audio)
                frames = int(frames * spec.sample_rate / rate)
            except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, whatever the reason
                self.skipped.append(f"{audio.get('path')}: {err}")
                continue
            if frames <= 0:
                self.skipped.append(f"{audio.get('path')}: empty")
                continue
            if spec.mode == "pad":
                self.index.append((row, 0))
            else:  # every full window; a file shorter than one window gives one padded item
                starts = range(0, max(frames - spec.seq_len, 0) + 1, spec.seq_len)
                self.index.extend((row, s) for s in starts)
        if self.skipped:
            logger.warning("%s: skipped %d unreadable or empty files, e.g. %s", name, len(self.skipped), self.skipped[0])

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        row, start = self.index[i]
        spec = self.spec
        audio = self.data[row]["audio"]
        try:
            wave, rate = _decode(audio)
            wave = resample(wave, rate, spec.sample_rate)[start : start + spec.seq_len]
            if not np.isfinite(wave).all():  # NaN/inf would defeat min-max scaling and quantise to 0/255
                raise ValueError(f"{int((~np.isfinite(wave)).sum())} samples are NaN or infinite")
        except Exception as err:  # noqa: BLE001 - a file that breaks after its header was read: a masked item
            self.bad_items += 1
            logger.warning("%s: item %d (%s) is masked out: %s (%d such items in this process)", self.name, i,
                           audio.get("path"), err, self.bad_items)
            wave = np.zeros(0, dtype=np.float32)
        return self.tokenize(wave)

    def tokenize(self, wave: np.ndarray) -> dict:
        spec = self.spec
        wave = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        if spec.minmax and wave.numel() and wave.max() > wave.min():
            wave = (wave - wave.min()) / (wave.max() - wave.min()) * 2 - 1
        tokens = encode_audio(wave, spec.quantization, spec.levels)
        input_ids = torch.full((spec.seq_len + 1,), spec.bos, dtype=torch.long)
        input_ids[1 : 1 + len(tokens)] = tokens
        attention_mask = torch.zeros(spec.seq_len + 1, dtype=torch.long)
        attention_mask[: 1 + len(tokens)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_datasets(data_args: DataArguments, config) -> tuple:
    """(protocol, spec, {split: AudioTokenDataset}). The spec's quantisation is the protocol's (the model config's
    for `generic`); the config is only read: a caller whose model quantises otherwise decides what to do."""
    protocol, splits = load_splits(data_args.dataset, data_args.protocol, data_args.audio_column, data_args.cache_dir,
                                   config.sample_rate, data_args.dataset_config)
    defaults = PROTOCOL_DEFAULTS[protocol]
    spec = AudioSpec(
        sample_rate=config.sample_rate, quantization=defaults["quantization"] or config.quantization,
        levels=config.vocab_size, bos=config.bos_token_id, seq_len=data_args.seq_len or defaults["seq_len"],
        mode=data_args.mode or defaults["mode"], minmax=not data_args.no_minmax,
    )
    return protocol, spec, {name: AudioTokenDataset(ds, spec, name) for name, ds in splits.items()}
