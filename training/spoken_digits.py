"""The built-in data set: spoken digits rendered offline with espeak-ng (its command-line tool, or the library and
voices of the `espeakng-loader` wheel), laid out like SC09 (`<digit>/<id>.wav`, `validation_list.txt`,
`testing_list.txt`), so that train.py runs without a download."""

import io
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile

from training.audio_files import resample
from training.splits import DIGITS

logger = logging.getLogger(__name__)

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
