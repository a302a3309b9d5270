"""Audio files for the training scripts: reading any file soundfile can (wav, flac, ogg, ...) without FFmpeg,
resampling (soxr), 16-bit WAVs and spectrogram PNGs (matplotlib). The model's own code (the token codec, WAV writing
while sampling) is `modeling_poolformer.audio`, which travels with every saved model; these helpers do not."""

import io
from pathlib import Path
from typing import Union

import numpy as np
import torch

from modeling_poolformer.audio import WavWriter


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Mono float waveform from `rate` to `target_rate` Hz (soxr, high quality)."""
    if rate == target_rate:
        return samples
    import soxr

    return soxr.resample(samples, rate, target_rate, quality="HQ").astype(np.float32)


def load_audio(source: Union[str, Path, bytes], target_rate: int, max_seconds: float = None) -> np.ndarray:
    """A file path or encoded bytes -> mono float32 waveform at `target_rate`. Raises `soundfile.LibsndfileError`
    (a `RuntimeError`) on unreadable data."""
    import soundfile

    data = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    samples, rate = soundfile.read(data, dtype="float32", always_2d=True)
    if max_seconds is not None:
        samples = samples[: int(round(max_seconds * rate))]
    return resample(samples.mean(axis=1), rate, target_rate)


def write_wav(path: Union[str, Path], samples, rate: int) -> Path:
    """Writes a float waveform in [-1, 1] as 16-bit PCM WAV (the same writer as `model.save_wav` and the audio
    streamer)."""
    with WavWriter(path, rate) as writer:
        tensor = samples.detach().cpu() if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
        writer.write(tensor)
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
    for i, (ax, samples) in enumerate(zip(axes[:, 0], waves)):
        spec = torch.stft(samples, n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft), return_complex=True)
        db = 20 * torch.log10(spec.abs() + 1e-5)
        ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma",
                  extent=[0, len(samples) / rate, 0, rate / 2000], vmin=float(db.max()) - 80)
        ax.set_ylabel("kHz")
        ax.set_title(titles[i] if titles else f"sample {i}", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
