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

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets import Audio, Dataset

from training.hub_data import hub_splits, load_tables
from training.splits import (
    AUDIO_EXTENSIONS,
    SPLITTERS,
    STREAM_SHARDS,
    find_file,
    list_audio_files,
    mark_stream_source,
    unpack_zips,
    with_validation,
)
from training.spoken_digits import make_spoken_digits, spoken_digits_folder
from training.stream import AudioTokenStream
from training.tokens import AudioSpec, AudioTokenDataset
from training.utils import cache_root, check_flags, check_local_or_hub

logger = logging.getLogger(__name__)

PROTOCOLS = ("auto", "sc09", "beethoven", "youtubemix", "generic", "bytes", "enwik8")  # the last two: text_data.py
# the protocol's own settings; None means "take the model config's"
PROTOCOL_DEFAULTS = {
    "sc09": dict(quantization="mu-law", mode="pad", seq_len=16000),
    "beethoven": dict(quantization="linear", mode="pad", seq_len=128000),
    "youtubemix": dict(quantization="mu-law", mode="window", seq_len=131072),
    "generic": dict(quantization=None, mode="window", seq_len=16000),
}
KNOWN_REPOS = {"krandiash/sc09": "sc09", "krandiash/beethoven": "beethoven", "krandiash/youtubemix": "youtubemix"}
STREAMING_DATASETS = "4.0.0"  # the oldest datasets release whose stream state_dict() resumes exactly (tested)


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


def load_splits(dataset: Optional[str], protocol: str = "auto", audio_column: str = "audio",
                cache_dir: Optional[str] = None, sample_rate: int = 16000, dataset_config: Optional[str] = None,
                streaming: bool = False) -> tuple:
    """Returns (protocol, {split: datasets.Dataset with an undecoded `audio` column}), or with `streaming`
    {split: datasets.IterableDataset}: parquet/arrow sources (Hub or local) through `load_dataset(...,
    streaming=True)`, never downloaded or converted as a whole; a folder of audio files as its file list in
    STREAM_SHARDS shards. Errors are raised here, before any training starts."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
    cache = cache_root(cache_dir)
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
            return protocol, hub_splits(data, audio_column, digits_only=protocol == "sc09")
        from huggingface_hub import snapshot_download  # file-based repos (zips, lists) come down as a folder

        root = Path(snapshot_download(dataset, repo_type="dataset", cache_dir=cache_dir))
    unpack_zips(root)
    files = list_audio_files(root)
    if not files:
        tables = any(next(root.rglob(f"*.{ext}"), None) for ext in ("parquet", "arrow"))
        if protocol in ("auto", "generic") or (protocol == "sc09" and tables):  # parquet/arrow: datasets reads it
            data = load_tables(str(root), cache_dir=cache_dir, streaming=streaming)
            protocol = "sc09" if protocol == "sc09" else "generic"
            return protocol, hub_splits(data, audio_column, digits_only=protocol == "sc09")
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")
    if protocol == "auto":
        protocol = "sc09" if find_file(root, "testing_list.txt") else "generic"
    splits = SPLITTERS[protocol](root, files)
    out = {}
    for name, paths in splits.items():
        if paths:
            rel = [p.relative_to(root).as_posix() for p in paths]  # the hash of a path must not depend on `root`
            ds = Dataset.from_dict({"audio": [str(p) for p in paths], "path": [str(p) for p in paths], "key": rel})
            out[name] = ds.cast_column("audio", Audio(decode=False))
    if "train" not in out:
        raise ValueError(f"protocol {protocol!r} found no training files under {root}")
    out = with_validation(out)
    if streaming:  # shards of the file list, so that processes and workers each read their own files
        out = {name: ds.to_iterable_dataset(num_shards=min(len(ds), STREAM_SHARDS)) for name, ds in out.items()}
        mark_stream_source(out, [f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}"
                                  for paths in splits.values() for p in paths])
    return protocol, out


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
