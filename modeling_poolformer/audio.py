"""Audio around the model: the token codec (waveforms in [-1, 1] <-> 8-bit mu-law or linear tokens, as in SaShiMi),
WAV writing (whole files and while `generate` samples) and progress bars with the real-time factor.

The modeling file imports this module, so it travels with every saved model: a model loaded with remote code decodes
and writes its own samples. Reading, resampling and plotting audio files are the training scripts'
(`training/audio_files.py`).
"""

import math
import queue
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

if TYPE_CHECKING:
    from .configuration_poolformer import PoolformerConfig

__all__ = [
    "PoolformerAudioMixin",
    "PoolformerAudioStreamer",
    "decode_audio",
    "encode_audio",
    "float_to_pcm16",
    "pcm_tokens",
    "wav_paths",
    "WavWriter",
    "ProgressStreamer",
    "tokens_to_pcm16",
]


# ---------------------------------------------------------------------------------------------------------------------
# Token codec
# ---------------------------------------------------------------------------------------------------------------------


def encode_audio(waveform: torch.Tensor, quantization: str = "mu-law", levels: int = 256) -> torch.Tensor:
    """Float waveform in [-1, 1] -> token ids in [0, levels). mu-law: `F = sgn(x) ln(1 + mu|x|) / ln(1 + mu)`,
    mu = levels - 1; linear: `F = x`; then `q = floor((levels - 0.01) * (F + 1) / 2 + 0.005)` (SaShiMi's). pcm:
    `q = clamp(round(x * levels / 2), -levels / 2, levels / 2 - 1) + levels / 2`, libsndfile's float -> PCM
    conversion, so a 16-bit file read as float comes back as its own samples (`pcm_tokens` takes the integers)."""
    x = waveform.double().clamp(-1.0, 1.0)
    if quantization == "pcm":
        half = levels // 2
        return (torch.round(x * half).clamp(-half, half - 1) + half).long()
    if quantization == "mu-law":
        mu = levels - 1
        x = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    elif quantization != "linear":
        raise ValueError(f"quantization must be 'mu-law', 'linear' or 'pcm', got {quantization!r}")
    return torch.floor((levels - 0.01) * (x + 1) / 2 + 0.005).long().clamp(0, levels - 1)


def decode_audio(tokens: torch.Tensor, quantization: str = "mu-law", levels: int = 256) -> torch.Tensor:
    """Token ids -> float32 waveform in [-1, 1]: `y = q / (levels / 2) - 1` (linear and pcm), then the inverse
    mu-law. At 16-bit pcm, `y * 32768` is the sample exactly (what the WAV writers store)."""
    y = tokens.double() / (levels / 2) - 1
    if quantization == "mu-law":
        mu = levels - 1
        y = torch.sign(y) * (torch.pow(1.0 + mu, y.abs()) - 1) / mu
    elif quantization not in ("linear", "pcm"):
        raise ValueError(f"quantization must be 'mu-law', 'linear' or 'pcm', got {quantization!r}")
    return y.float()


def pcm_tokens(samples, levels: int = 65536) -> torch.Tensor:
    """Integer PCM samples (e.g. int16 from `soundfile.read(..., dtype="int16")`) -> token ids: sample + levels / 2,
    with no float in between."""
    samples = torch.as_tensor(np.asarray(samples)).long()
    half = levels // 2
    if samples.numel() and (int(samples.min()) < -half or int(samples.max()) >= half):
        raise ValueError(f"PCM samples must lie in [{-half}, {half}) for {levels} levels, got "
                         f"[{int(samples.min())}, {int(samples.max())}]")
    return samples + half


def tokens_to_pcm16(tokens: torch.Tensor, quantization: str = "mu-law", levels: int = 256) -> torch.Tensor:
    """Token ids -> int16 samples, as every WAV written here stores them: `round(decode_audio(q) * 32768)`, clipped
    (libsndfile's scaling); exact for 16-bit pcm tokens, whose float32 waveform holds sample / 32768 exactly."""
    return float_to_pcm16(decode_audio(tokens, quantization, levels))


def float_to_pcm16(waveform: torch.Tensor) -> torch.Tensor:
    """Float waveform -> int16 as libsndfile converts it: x * 32768, rounded, clipped; exact for floats that came
    from 16-bit PCM."""
    return (waveform.double() * 32768.0).round().clamp(-32768, 32767).to(torch.int16)


# ---------------------------------------------------------------------------------------------------------------------
# WAV output and streaming
# ---------------------------------------------------------------------------------------------------------------------


def wav_paths(path: Union[str, Path], count: int) -> list:
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix or '.wav'}") for i in range(count)]


class WavWriter:
    """16-bit mono PCM WAV written piece by piece with the standard library's `wave` (its header is updated on
    every write, so the file is a valid WAV at any time)."""

    def __init__(self, path: Union[str, Path], sample_rate: int):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "wb")
        self.file = wave.open(self.handle, "wb")
        self.file.setnchannels(1)
        self.file.setsampwidth(2)
        self.file.setframerate(sample_rate)

    def write(self, waveform: torch.Tensor):
        pcm = waveform if waveform.dtype == torch.int16 else float_to_pcm16(waveform)  # as libsndfile scales
        self.file.writeframes(pcm.numpy().astype("<i2").tobytes())
        self.handle.flush()  # readable by others while generation goes on

    def close(self):
        self.file.close()
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _RealTimeBar:
    """tqdm over generated samples, with the real-time factor: compute seconds per second of audio (< 1 is faster
    than real time)."""

    def __init__(self, sample_rate: int, total: Optional[int]):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="sample", desc="generating", unit_scale=True)
        self.sample_rate, self.start = sample_rate, time.perf_counter()

    def update(self, samples: int):
        self.bar.update(samples)
        if self.bar.n % 400 < samples or self.bar.n == self.bar.total:
            seconds = (time.perf_counter() - self.start) / (self.bar.n / self.sample_rate)
            self.bar.set_postfix_str(f"RTF {seconds:.2f}", refresh=False)

    def close(self):
        self.bar.close()


class ProgressStreamer(BaseStreamer):
    """`generate(progress=True)`: the bar, forwarding to the user's streamer if any."""

    def __init__(self, sample_rate: int, total: int, inner: Optional[BaseStreamer] = None):
        self.inner, self.sample_rate, self.total, self.bar = inner, sample_rate, total, None

    def put(self, value):
        if self.inner is not None:
            self.inner.put(value)
        if self.bar is None:  # the first call carries the prompt
            self.bar = _RealTimeBar(self.sample_rate, self.total)
        else:
            self.bar.update(1)

    def end(self):
        if self.inner is not None:
            self.inner.end()
        if self.bar is not None:
            self.bar.close()


class PoolformerAudioStreamer(BaseStreamer):
    """Audio while `generate` samples it (transformers' streamer interface): writes 16-bit WAVs as samples come and/or
    hands float32 chunks in [-1, 1] to another thread.

        streamer = model.audio_streamer("out.wav", progress=True)   # out.wav, or out_0.wav, out_1.wav... per row
        model.generate(max_new_tokens=16000, streamer=streamer)

        streamer = model.audio_streamer(chunk_size=1600)             # or consume chunks while it runs:
        threading.Thread(target=model.generate, kwargs=dict(max_new_tokens=16000, streamer=streamer)).start()
        for chunk in streamer:                                       # (batch, <= chunk_size) numpy arrays
            ...

    Args:
        config: the model's `PoolformerConfig` (sample rate, quantisation).
        path: WAV file to write (one per batch row, `<stem>_<i>.wav`, for a batch), a list of paths (one per row),
            or None.
        chunk_size: samples per write / yielded chunk.
        skip_prompt: leave the prompt out (default); the zero token that sequences start with is never audio.
        progress: show a tqdm bar with the real-time factor (`total` samples, if known).
        yield_chunks: queue chunks for iteration (default: when no `path` is given).
        timeout: seconds the iterator waits for the next chunk before `queue.Empty`.
    """

    def __init__(self, config: "PoolformerConfig", path: Union[str, Path, list, None] = None, chunk_size: int = 1600,
                 skip_prompt: bool = True, progress: bool = False, total: Optional[int] = None,
                 yield_chunks: Optional[bool] = None, timeout: Optional[float] = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.config, self.path, self.chunk_size, self.skip_prompt = config, path, chunk_size, skip_prompt
        self.yield_chunks = path is None if yield_chunks is None else yield_chunks
        self.progress, self.total, self.timeout = progress, total, timeout
        self.queue, self.pending, self.writers, self.bar, self.started = queue.Queue(), [], [], None, False
        self.paths = []

    def put(self, value: torch.Tensor):
        value = value.detach().cpu()
        if not self.started:  # transformers first puts the prompt, (batch, T)
            self.started = True
            value = value.view(-1, value.shape[-1]) if value.dim() > 1 else value.view(1, -1)
            if isinstance(self.path, (list, tuple)):
                if len(self.path) != value.shape[0]:
                    raise ValueError(f"{len(self.path)} WAV paths for a batch of {value.shape[0]}")
                self.paths = [Path(p) for p in self.path]
            elif self.path is not None:
                self.paths = wav_paths(self.path, value.shape[0])
            if self.paths:
                self.writers = [WavWriter(p, self.config.sample_rate) for p in self.paths]
            if self.progress:
                self.bar = _RealTimeBar(self.config.sample_rate, self.total)
            if not self.skip_prompt and value.shape[1] > 1:
                self.pending.append(value[:, 1:])
            return
        self.pending.append(value.view(-1, 1))
        if self.bar is not None:
            self.bar.update(1)
        if sum(t.shape[1] for t in self.pending) >= self.chunk_size:
            self._flush()

    def _flush(self):
        if not self.pending:
            return
        tokens, self.pending = torch.cat(self.pending, dim=1), []
        waves = decode_audio(tokens, self.config.quantization, self.config.vocab_size)
        for writer, row in zip(self.writers, waves):
            writer.write(row)
        if self.yield_chunks:
            self.queue.put(waves.numpy())

    def end(self):
        self._flush()
        for writer in self.writers:
            writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.yield_chunks:
            self.queue.put(None)

    def __iter__(self):
        return self

    def __next__(self):
        chunk = self.queue.get(timeout=self.timeout)
        if chunk is None:
            raise StopIteration
        return chunk


def _checked_tokens(tokens, vocab_size: int) -> torch.Tensor:
    """`tokens` as a tensor, after the checks `forward` makes of its input ids: integer ids in [0, vocab_size)."""
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(np.asarray(tokens))
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor of token ids (sample values), got {tokens.dtype}")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"tokens must lie in [0, {vocab_size}) (sample values), got values in [{lo}, {hi}]")
    return tokens


class PoolformerAudioMixin:
    """Audio out for `PoolformerForCausalLM`: tokens to waveforms, WAV files and a streamer for `generate`."""

    def tokens_to_waveform(self, tokens: torch.Tensor, drop_bos: bool = True) -> torch.Tensor:
        """(B, T) or (T,) token ids -> float32 waveforms in [-1, 1] with this model's quantisation. The leading zero
        token that `generate` starts from is dropped when `drop_bos`. Tokens that `forward` would refuse (not an
        integer tensor, or outside `[0, vocab_size)`) raise a ValueError instead of being clipped into audio."""
        if self.config.quantization == "bytes":
            raise ValueError("this is a byte model (quantization='bytes'): its tokens are text, not audio; use "
                             "decode_text / text_streamer")
        tokens = _checked_tokens(tokens, self.config.vocab_size)
        if drop_bos and tokens.shape[-1] > 1:
            tokens = tokens[..., 1:]
        return decode_audio(tokens.cpu(), self.config.quantization, self.config.vocab_size)

    def save_wav(self, tokens: torch.Tensor, path: Union[str, Path], drop_bos: bool = True) -> list:
        """Writes generated tokens as 16-bit WAV at `config.sample_rate`: one file for (T,) tokens or a (1, T)
        batch, `path` stem + `_{i}.wav` per row otherwise. Returns the written paths."""
        waves = self.tokens_to_waveform(tokens, drop_bos)
        waves = waves.unsqueeze(0) if waves.dim() == 1 else waves
        paths = wav_paths(path, len(waves))
        for wave_, target in zip(waves, paths):
            with WavWriter(target, self.config.sample_rate) as writer:
                writer.write(wave_)
        return paths

    def audio_streamer(self, path: Union[str, Path, None] = None, **kwargs) -> "PoolformerAudioStreamer":
        """A streamer for `generate(..., streamer=...)` that writes WAVs while sampling (and/or yields float chunks):
        `PoolformerAudioStreamer(self.config, path, **kwargs)`."""
        return PoolformerAudioStreamer(self.config, path, **kwargs)
