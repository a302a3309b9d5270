"""Inputs the data layer must read right or refuse clearly: float files and integer arrays for 16-bit and 8-bit
models, non-audio columns, the rendered digit set per sample rate, streams whose files changed, a single validation
file under 2 processes, builds of the header index killed mid-way."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from datasets import Audio, Dataset

from modeling_poolformer import PoolformerConfig
from modeling_poolformer.audio import encode_audio
from training.audio_read import read_audio
from training.data import (
    AudioSpec,
    AudioTokenDataset,
    AudioTokenStream,
    DataArguments,
    build_datasets,
    load_splits,
)

PCM16 = AudioSpec(quantization="pcm", levels=65536, bos=32768, seq_len=1600, mode="pad", minmax=False)
LINEAR8 = AudioSpec(quantization="linear", levels=256, bos=128, seq_len=1600, mode="pad", minmax=False)


def one_file_dataset(*paths):
    paths = [str(p) for p in paths]
    return Dataset.from_dict({"audio": paths, "path": paths}).cast_column("audio", Audio(decode=False))


def libsndfile_pcm16(wave):
    """What libsndfile stores when it writes these floats as PCM_16: x * 32768, rounded, clipped."""
    return np.clip(np.round(np.asarray(wave, dtype=np.float64) * 32768), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("amplitude", [0.5, 1.0])
def test_float_wavs_are_scaled_for_16bit_models(tmp_path, subtype, channels, amplitude):
    wave = amplitude * np.sin(np.arange(1600) / 5)
    frames = wave if channels == 1 else np.stack([wave, 0.5 * wave], axis=1)
    soundfile.write(tmp_path / "f.wav", frames, 16000, subtype=subtype)
    got = read_audio({"path": str(tmp_path / "f.wav")}, 16000, pcm16=True)
    want = libsndfile_pcm16(frames if channels == 1 else frames.astype(np.float32).mean(axis=1))
    assert got.dtype == np.int16 and np.abs(got.astype(int) - want).max() <= 1, np.unique(got)[:5]
    assert len(np.unique(got)) > 100  # not the silence (or -1, 0, 1) of unscaled int16 reading
    item = AudioTokenDataset(one_file_dataset(tmp_path / "f.wav"), PCM16)[0]
    assert torch.equal(item["input_ids"][1:], torch.from_numpy(got.astype(np.int64)) + 32768)


def test_16bit_integer_files_still_read_their_own_samples(tmp_path):
    pcm = (np.arange(1600) * 41 % 65536 - 32768).astype(np.int16)
    soundfile.write(tmp_path / "i.wav", pcm, 16000, subtype="PCM_16")
    assert np.array_equal(read_audio({"path": str(tmp_path / "i.wav")}, 16000, pcm16=True), pcm)


@pytest.mark.parametrize("rate", [16000, 8000])
def test_a_nan_in_a_float_wav_is_masked_and_counted_for_16bit_models(tmp_path, caplog, rate):
    wave = 0.5 * np.sin(np.arange(800) / 5).astype(np.float32)
    wave[100] = np.nan
    soundfile.write(tmp_path / "a_nan.wav", wave, rate, subtype="FLOAT")
    soundfile.write(tmp_path / "b_fine.wav", np.nan_to_num(wave), rate, subtype="FLOAT")
    ds = AudioTokenDataset(one_file_dataset(tmp_path / "a_nan.wav", tmp_path / "b_fine.wav"), PCM16)
    nan_item, fine_item = ds[0], ds[1]
    assert nan_item["attention_mask"].sum() == 1 and (nan_item["labels"][1:] == -100).all()
    assert fine_item["attention_mask"].sum() == 1 + 800 * 16000 // rate
    assert ds.bad_items == 1 and "NaN or infinite" in caplog.text
    # the stream skips and counts it
    stream = AudioTokenStream(one_file_dataset(tmp_path / "a_nan.wav", tmp_path / "b_fine.wav").to_iterable_dataset(),
                              PCM16, repeat=False)
    assert len(list(stream)) == 1 and stream.skipped == 1


def int_array_parquet(folder, dtype, rows=6, length=800):
    """A parquet dataset of decoded integer arrays (`{"array": [...], "sampling_rate": 16000}` rows), typed."""
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    arrays = [rng.integers(info.min, int(info.max) + 1, length, dtype=np.int64).astype(dtype) for _ in range(rows)]
    for a in arrays:
        a[:2] = (info.min, info.max)
    struct = pa.struct([("array", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))), ("sampling_rate", pa.int64())])
    table = pa.table({"audio": pa.array([{"array": a, "sampling_rate": 16000} for a in arrays], type=struct),
                      "key": [f"row{i}" for i in range(rows)]})
    (folder / "data").mkdir(parents=True)
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    return {f"row{i}": a for i, a in enumerate(arrays)}


def unit_float(a):
    """Integer PCM as floats in [-1, 1), unsigned types offset-binary: what libsndfile reads from such a file."""
    info = np.iinfo(a.dtype)
    half = 2.0 ** (info.bits - 1)
    return (a.astype(np.float64) - (half if info.min == 0 else 0)) / half


@pytest.mark.parametrize("dtype", ["int16", "uint8", "int8", "int32"])
def test_integer_array_rows_are_scaled_by_their_type_for_16_and_8_bit_models(tmp_path, dtype):
    arrays = int_array_parquet(tmp_path / "repo", dtype)
    want16 = {k: torch.from_numpy(libsndfile_pcm16(unit_float(a)).astype(np.int64)) + 32768 for k, a in arrays.items()}
    want8 = {k: encode_audio(torch.from_numpy(unit_float(a)), "linear", 256) for k, a in arrays.items()}
    if dtype == "int16":  # the very samples
        assert all(torch.equal(want16[k], torch.from_numpy(a.astype(np.int64)) + 32768) for k, a in arrays.items())
    for streaming in (False, True):
        _, splits = load_splits(str(tmp_path / "repo"), cache_dir=str(tmp_path / "cache"), streaming=streaming)
        for spec, want in ((PCM16, want16), (LINEAR8, want8)):
            for split in ("train", "validation"):
                if streaming:
                    keys = [ex["key"] for ex in splits[split]]
                    items = list(AudioTokenStream(splits[split], spec, repeat=False))
                else:
                    keys = splits[split]["key"]
                    ds = AudioTokenDataset(splits[split], spec, cache_dir=str(tmp_path / "cache"))
                    items = [ds[i] for i in range(len(ds))]
                assert len(items) == len(keys) > 0
                for key, item in zip(keys, items):  # int32 (more bits than a float32 holds): to the nearest step
                    error = (item["input_ids"][1:801] - want[key]).abs().max()
                    assert error <= (dtype == "int32"), (streaming, spec.quantization, key, error)


def test_a_list_of_python_ints_without_a_type_is_refused_clearly():
    with pytest.raises(ValueError, match="integer PCM.*int64"):
        read_audio({"array": [1, 2, 3], "sampling_rate": 16000}, 16000)
    # typed, the same list is PCM
    assert np.allclose(read_audio({"array": [16384, -16384], "sampling_rate": 16000}, 16000, array_dtype="int16"),
                       [0.5, -0.5])


@pytest.mark.parametrize("streaming", [False, True])
def test_a_non_audio_column_is_named_with_what_was_expected(tmp_path, streaming):
    (tmp_path / "ints" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"audio": pa.array(range(6), pa.int64())}),
                   tmp_path / "ints" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"--audio_column 'audio' holds Value\('int64'\).*not audio: expected"):
        load_splits(str(tmp_path / "ints"), cache_dir=str(tmp_path / "cache"), streaming=streaming)
    (tmp_path / "wide").mkdir()
    int_array_parquet(tmp_path / "wide", "int64")
    with pytest.raises(ValueError, match="'audio' holds int64 arrays: integer PCM arrays must be"):
        load_splits(str(tmp_path / "wide"), cache_dir=str(tmp_path / "cache"), streaming=streaming)


def clip_rates(splits):
    return {soundfile.info(p).samplerate for ds in splits.values() for p in ds["path"]}


def test_the_built_in_digit_set_is_cached_per_sample_rate(cache_dir, tmp_path):
    from training.spoken_digits import make_spoken_digits

    voices, variants = ("en-us", "en+m3", "en-us+f3"), ((150, 50),)
    # what an older version left after an 8 kHz model: the 8 kHz set under the 16 kHz name
    cache = tmp_path / "old"
    make_spoken_digits(cache / "spoken_digits_v1", voices, variants, sample_rate=8000)
    (cache / "spoken_digits_v1_16000hz").symlink_to(cache_dir / "spoken_digits_v1")  # (rendered once per session)
    assert clip_rates(load_splits(None, cache_dir=str(cache), sample_rate=16000)[1]) == {16000}
    # an 8 kHz run beside an existing 16 kHz set: each rate its own set, the 16 kHz one found where it always was
    cache = tmp_path / "new"
    make_spoken_digits(cache / "spoken_digits_v1_8000hz", voices, variants, sample_rate=8000)
    (cache / "spoken_digits_v1").symlink_to(cache_dir / "spoken_digits_v1")
    assert clip_rates(load_splits(None, cache_dir=str(cache), sample_rate=8000)[1]) == {8000}
    _, splits = load_splits(None, cache_dir=str(cache), sample_rate=16000)
    assert clip_rates(splits) == {16000} and all(str(cache / "spoken_digits_v1") in p for p in splits["train"]["path"])


def start_builder(fifo, cache):
    """An index build in a forked process, held mid-build: its only file is a named pipe that nobody writes, so
    reading its header blocks until the process is killed."""
    import multiprocessing

    from training.audio_index import build_index

    os.mkfifo(fifo)
    builder = multiprocessing.get_context("fork").Process(target=build_index, args=(one_file_dataset(fifo), str(cache)))
    builder.start()
    return builder


def test_a_killed_index_build_leaves_nothing_behind_and_live_builds_are_kept(tmp_path):
    import socket

    from training.audio_index import build_index

    cache, index = tmp_path / "cache", tmp_path / "cache" / "index"
    killed = start_builder(tmp_path / "a.wav", cache)
    deadline = time.time() + 120
    while not list(index.glob(".building-*")):
        assert time.time() < deadline and killed.is_alive(), "the builder never started"
        time.sleep(0.1)
    os.kill(killed.pid, signal.SIGKILL)  # mid-build: no finally runs
    killed.join()
    (left_by_kill,) = index.glob(".building-*")
    live = index / f".building-{socket.gethostname()}-{os.getpid()}-abcd1234"  # a build going on in a live process
    live.mkdir()
    (index / ".building-unnamed").mkdir()  # an older version's, abandoned two days ago
    os.utime(index / ".building-unnamed", (time.time() - 2 * 86400,) * 2)
    (index / ".building-recent").mkdir()  # whoever's it is, it may still be working
    soundfile.write(tmp_path / "c.wav", np.zeros(100), 16000)
    build_index(one_file_dataset(tmp_path / "c.wav"), str(cache))  # the next build cleans up
    assert not left_by_kill.exists() and str(killed.pid) in left_by_kill.name
    assert {p.name for p in index.glob(".building-*")} == {live.name, ".building-recent"}


def noise_folder(folder, names, seconds=0.2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        soundfile.write(folder / name, rng.uniform(-0.5, 0.5, int(16000 * seconds)), 16000, subtype="PCM_16")
    return folder


def stream_state_after(source_folder, steps, cache):
    args = DataArguments(dataset=str(source_folder), seq_len=800, mode="window", streaming=True, shuffle_buffer=4,
                         cache_dir=str(cache))
    stream = build_datasets(args, PoolformerConfig(), seed=1)[2]["train"]
    it = iter(stream)
    for _ in range(steps):
        next(it)
    return stream, args


@pytest.mark.parametrize("layout", ["audio files", "parquet"])
def test_a_stream_resumed_on_changed_files_is_refused(tmp_path, layout):
    folder = noise_folder(tmp_path / "set", [f"{i:02d}.wav" for i in range(8)])
    if layout == "parquet":  # the same clips as encoded bytes in parquet files
        (tmp_path / "pq" / "data").mkdir(parents=True)
        for part, names in enumerate((["00", "01", "02", "03"], ["04", "05", "06", "07"])):
            pq.write_table(pa.table({"audio": [{"bytes": (folder / f"{n}.wav").read_bytes(), "path": f"{n}.wav"}
                                               for n in names]}),
                           tmp_path / "pq" / "data" / f"train-{part:05d}-of-00002.parquet")
        folder = tmp_path / "pq"
    stream, args = stream_state_after(folder, 3, tmp_path / "cache")
    state = stream.state_dict()
    assert state["defined_by"]["files"] == (8 if layout == "audio files" else 2)

    def resumed():
        again = build_datasets(args, PoolformerConfig(), seed=1)[2]["train"]
        again.load_state_dict(state)
        return again

    rest = [next(iter(stream))["input_ids"] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(rest, [x["input_ids"] for x, _ in zip(resumed(), range(2))]))
    if layout == "audio files":
        noise_folder(folder, ["08.wav"])  # a file added
        with pytest.raises(ValueError, match=r"the dataset changed since the stream state was saved \(it read 8 files.*"
                                             r"it has 9 files.*cannot resume exactly"):
            resumed()
        (folder / "08.wav").unlink()
        (folder / "03.wav").unlink()  # one removed
        with pytest.raises(ValueError, match="it has 7 files"):
            resumed()
    else:
        table = pq.read_table(folder / "data" / "train-00001-of-00002.parquet")
        pq.write_table(table.slice(0, 3), folder / "data" / "train-00001-of-00002.parquet")  # rows removed
        with pytest.raises(ValueError, match="the dataset changed since the stream state was saved"):
            resumed()


@pytest.mark.slow  # two train.py launches (a minute on 2 loaded cores); the data-level refusal above is fast
def test_train_refuses_to_resume_a_stream_whose_folder_changed(tmp_path):
    from helpers import FAST, TRAIN, env

    folder = noise_folder(tmp_path / "set", [f"{i:02d}.wav" for i in range(10)], seconds=0.1)
    common = [TRAIN, "--dataset", str(folder), *FAST, "--seq_len", "400", "--streaming", "--shuffle_buffer", "4",
              "--max_steps", "4", "--save_every", "1", "--eval_every", "100", "--max_eval_batches", "1",
              "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache")]
    proc = subprocess.run([sys.executable, *common, "--stop_after_steps", "1"], capture_output=True, text=True,
                          timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise_folder(folder, ["10.wav"], seconds=0.1)
    proc = subprocess.run([sys.executable, *common, "--resume_from_checkpoint", "latest"], capture_output=True,
                          text=True, timeout=600, env=env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the dataset changed since the stream state was saved (it read 10 files" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_evaluate_streaming_scores_the_first_batches_of_the_stream(tmp_path, capsys):
    from helpers import hub_model
    from training.evaluate import main as evaluate
    from training.metrics import DigitClassifier

    for split, n in (("train", 4), ("validation", 1), ("test", 3)):
        noise_folder(tmp_path / "set" / split, [f"{split}{i}.wav" for i in range(n)], seconds=0.1)
    hub_model("tiny").save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "set"), "--seq_len", "400",
              "--batch_size", "2", "--max_batches", "2", "--split", "test", "--device", "cpu",
              "--cache_dir", str(tmp_path / "cache")]
    indexed = evaluate([*common, "--out", str(tmp_path / "indexed.json")])
    streamed = evaluate([*common, "--streaming", "--out", str(tmp_path / "streamed.json")])
    assert streamed["items"] == indexed["items"] == 4
    for key in ("nll_bits_per_sample", "predicted_samples", "flac_bits_per_sample"):
        assert streamed[key] == pytest.approx(indexed[key], rel=1e-6), key
    whole = common[: common.index("--max_batches")] + common[common.index("--max_batches") + 2 :]
    DigitClassifier().save(tmp_path / "classifier.safetensors")
    for argv in (whole, [*common, "--quality", "--classifier", str(tmp_path / "classifier.safetensors")]):
        with pytest.raises(SystemExit) as exit_:  # a usage error: exit code 2, the message on stderr
            evaluate([*argv, "--streaming"])
        assert exit_.value.code == 2
        assert "evaluate.py: error: --streaming scores the first --max_batches batches" in capsys.readouterr().err
