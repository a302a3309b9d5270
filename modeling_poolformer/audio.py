"""Audio I/O around the token codec: read any file soundfile can (wav, flac, ogg, ...) without FFmpeg, mix to mono,
resample with soxr, write WAVs, plot spectrograms. The codec itself (`encode_audio` / `decode_audio`) lives in the
modeling file, so a model loaded with remote code can decode its own samples."""

import io
from pathlib import Path
from typing import Union

import numpy as np
import soundfile
import soxr
import torch

from .modeling_poolformer import _WavWriter, decode_audio, encode_audio

__all__ = ["load_audio", "resample", "write_wav", "save_spectrogram", "encode_audio", "decode_audio"]


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Mono float waveform from `rate` to `target_rate` Hz (soxr, high quality)."""
    if rate == target_rate:
        return wave
    return soxr.resample(wave, rate, target_rate, quality="HQ").astype(np.float32)


def load_audio(source: Union[str, Path, bytes], target_rate: int, max_seconds: float = None) -> np.ndarray:
    """A file path or encoded bytes -> mono float32 waveform at `target_rate`. Raises `soundfile.LibsndfileError`
    (a `RuntimeError`) on unreadable data."""
    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    wave, rate = soundfile.read(data, dtype="float32", always_2d=True)
    if max_seconds is not None:
        wave = wave[: int(round(max_seconds * rate))]
    return resample(wave.mean(axis=1), rate, target_rate)


def write_wav(path: Union[str, Path], wave, rate: int) -> Path:
    """Writes a float waveform in [-1, 1] as 16-bit PCM WAV (the same writer as `model.save_wav` and the audio
    streamer)."""
    with _WavWriter(path, rate) as writer:
        writer.write(torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave.detach().cpu()))
    return Path(path)


def save_spectrogram(waves, rate: int, path: Union[str, Path], titles=None) -> Path:
    """One PNG with a log-magnitude spectrogram per waveform (rows of a grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    waves = [torch.as_tensor(np.asarray(w), dtype=torch.float32).reshape(-1) for w in waves]
    n_fft = 512 if min(len(w) for w in waves) >= 512 else 64
    waves = [torch.nn.functional.pad(w, (0, max(0, n_fft - len(w)))) for w in waves]  # very short clips: zeros
    fig, axes = plt.subplots(len(waves), 1, figsize=(8, 1.8 * len(waves)), squeeze=False)
    for i, (ax, wave) in enumerate(zip(axes[:, 0], waves)):
        spec = torch.stft(wave, n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft), return_complex=True)
        db = 20 * torch.log10(spec.abs() + 1e-5)
        ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma",
                  extent=[0, len(wave) / rate, 0, rate / 2000], vmin=float(db.max()) - 80)
        ax.set_ylabel("kHz")
        ax.set_title(titles[i] if titles else f"sample {i}", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
