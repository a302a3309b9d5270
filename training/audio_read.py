"""Reading an item's samples: only the frames of its window (at the file's own rate, with a margin where it is
resampled), mono, at the model's rate, as float32 or (16-bit models) the files' own int16 samples."""

import io
import math
from typing import Optional

import numpy as np
import soundfile
import torch

from modeling_poolformer.audio import float_to_pcm16
from training.audio_files import resample

RESAMPLE_MARGIN = 512  # extra frames read on both sides of a resampled window: soxr's filter sees real context
# soundfile subtypes whose samples are floats: read as float32 and rounded, never read as int16 (unscaled there)
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE", "VORBIS", "OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III")


def audio_source(audio: dict):
    return io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio["path"]


def read_header(audio: dict) -> tuple:
    """(frames, sample rate) at the item's own rate: its header, or a decoded array's length."""
    if audio.get("array") is not None:
        return len(audio["array"]), int(audio["sampling_rate"])
    info = soundfile.info(audio_source(audio))
    return info.frames, info.samplerate


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
        file_frames, file_rate = read_header(audio)
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
        with soundfile.SoundFile(audio_source(audio)) as f:
            if f.subtype not in FLOAT_SUBTYPES:  # (libsndfile's int16 reading of a float file does not scale it)
                f.seek(first)
                samples = f.read(stop - first, dtype="int16", always_2d=True)
                if samples.shape[1] == 1:
                    return samples[:, 0]
                return np.round(samples.mean(axis=1)).astype(np.int16)
    samples, rate = soundfile.read(audio_source(audio), start=first, frames=stop - first, dtype="float32", always_2d=True)
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
