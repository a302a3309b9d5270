"""Token sequences: the spec of a split's items (rate, quantisation, length, padding or windows), one clip or window
quantised into tokens, and the map-style dataset of items cut from a split by its header index."""

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from datasets import Dataset

from modeling_poolformer import encode_audio
from modeling_poolformer.audio import pcm_tokens
from training.arrow_memory import RELEASE_EVERY, arrow_files, release_mapped_pages
from training.audio_index import build_index
from training.audio_read import read_audio
from training.hub_data import array_dtype

logger = logging.getLogger(__name__)


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
        self._mapped, self._reads = arrow_files(data), 0
        header = build_index(data, cache_dir, num_proc).data  # the Arrow table: whole columns at once
        self.file_frames = header.column("frames").to_numpy().astype(np.int64)
        self.file_rate = header.column("rate").to_numpy().astype(np.int64)
        self.array_dtype = array_dtype(data.features)  # of decoded integer arrays (lists of ints)
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
