"""The compressor baselines of byte models (`training/compressors.py`) and evaluate.py's report of them."""

import bz2
import gzip
import lzma
import zlib

import pytest

from helpers import hub_model
from training.compressors import COMPRESSORS, _xz_filters, compressor_bits, file_size, stream_size

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 40).encode()


def test_streams_decode_to_the_data_and_exclude_only_the_containers():
    raw = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    deflate = raw.compress(TEXT) + raw.flush()
    assert zlib.decompress(deflate, -15) == TEXT and stream_size(TEXT, "gzip") == len(deflate)
    assert file_size(TEXT, "gzip") == stream_size(TEXT, "gzip") + 18  # gzip's 10-byte header, 8-byte CRC/size
    assert gzip.decompress(gzip.compress(TEXT, 9, mtime=0)) == TEXT
    assert bz2.decompress(b"BZh9" + bz2.compress(TEXT, 9)[4:]) == TEXT and stream_size(TEXT, "bz2") == file_size(TEXT, "bz2") - 4
    xz_raw = lzma.compress(TEXT, format=lzma.FORMAT_RAW, filters=_xz_filters(len(TEXT)))
    assert lzma.decompress(xz_raw, format=lzma.FORMAT_RAW, filters=_xz_filters(len(TEXT))) == TEXT
    # the raw LZMA2 stream is xz -9e's: the same size with a dictionary as large as xz's preset
    full = lzma.compress(TEXT, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    assert stream_size(TEXT, "xz") == len(xz_raw) == len(full) < file_size(TEXT, "xz")
    with pytest.raises(ValueError, match="compressor must be one of"):
        stream_size(TEXT, "zstd")


def test_whole_and_per_window_bits_per_byte():
    windows = [TEXT[i : i + 256] for i in range(0, len(TEXT), 256)]
    report = compressor_bits(windows)
    assert report["bytes"] == len(TEXT)
    for name in COMPRESSORS:
        r = report[name]
        assert r["whole"] == 8 * stream_size(TEXT, name) / len(TEXT)
        assert r["per_window"] == 8 * sum(stream_size(w, name) for w in windows) / len(TEXT)
        # repeated text: a window alone cannot refer back to the windows before it
        assert r["whole"] < r["per_window"]
    with pytest.raises(ValueError, match="no bytes"):
        compressor_bits([b"", b""])


def test_evaluate_reports_bits_per_byte_beside_the_compressors_on_the_same_bytes(tmp_path):
    from training.evaluate import main

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(f"document {i}: " + "some words again " * (i + 3), encoding="utf-8")
    model = hub_model("tiny-bytes")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval.json"
    result = main(["--model", str(tmp_path / "model"), "--dataset", str(docs), "--seq_len", "64", "--split", "train",
                   "--cache_dir", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"])
    assert result["protocol"] == "bytes" and result["quantization"] == "bytes"
    assert result["nll_bits_per_byte"] == result["nll_bits_per_sample"]
    compressors = result["compressors"]
    assert compressors["bytes"] == result["predicted_samples"]  # every byte the model predicted, and only those
    assert set(COMPRESSORS) <= set(compressors) and "per_window" in result["compressors_fair_comparison"]
    assert result["model_to_xz_per_window_ratio"] == pytest.approx(
        result["nll_bits_per_byte"] / compressors["xz"]["per_window"])
    assert out.is_file()
