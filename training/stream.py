"""The streamed variant of the token items: read on the fly from a `datasets.IterableDataset`, shuffled through a
buffer, each process on its own shards, and resumable exactly from `state_dict()`."""

import logging

import numpy as np
import pyarrow as pa
import torch

from training.arrow_memory import STREAM_RELEASE_EVERY
from training.audio_read import read_audio
from training.hub_data import array_dtype
from training.tokens import AudioSpec, quantize, token_item

logger = logging.getLogger(__name__)


def compact(tokens: torch.Tensor) -> np.ndarray:
    """Tokens in the smallest unsigned type that holds them: what a shuffle buffer keeps (and a checkpoint saves)."""
    return tokens.numpy().astype(np.uint8 if (tokens.numel() == 0 or int(tokens.max()) < 256) else np.uint16)


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

        self.array_dtype = array_dtype(source.features)
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
            return [compact(quantize(p, spec)) for p in pieces]
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


class HeldOut(torch.utils.data.Dataset):
    """A streamed run's validation items, held as a list (the same items at every evaluation and after a resume)."""

    def __init__(self, items: list, stream: AudioTokenStream):
        self.items, self.skipped = items, stream.skipped

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
