"""The standard library's compressors as the yardstick of a byte model: gzip -9, bz2 -9 and xz -9e on the same bytes
the model is scored on, in bits per byte, as FLAC is for the audio models.

A model's NLL in bits is the size an arithmetic coder driven by it reaches, without the coder's own header. So each
compressor is counted by its compressed stream, without its container's fixed header and trailer: for gzip the raw
deflate stream of level 9 (the 18 bytes of gzip's header and CRC trailer left out), for bz2 the stream after its
4-byte `BZh9` magic (block headers, CRCs and the end-of-stream marker kept: bz2 needs them to decode), for xz the raw
LZMA2 stream of preset 9e (xz's stream header, block header, index and footer left out). The `.gz`/`.bz2`/`.xz` file
sizes of the whole are reported beside, for reference.

Two figures per compressor: `whole`, the split's bytes as one stream (the compressor sees all the context there is),
and `per_window`, every window of the model's items coded alone, the sum of the sizes. The model scores each window
from its start byte with no memory of the window before, so **`per_window` is the fair comparison**; `whole` is what
a coder with the whole split as context reaches, a bar a model with carried context (longer windows, or state carried
across them) would be held to.
"""

import bz2
import gzip
import lzma
import zlib

COMPRESSORS = ("gzip", "bz2", "xz")
LABELS = {"gzip": "gzip -9", "bz2": "bz2 -9", "xz": "xz -9e"}


def _xz_filters(size: int) -> list:
    # preset 9e; a dictionary larger than the input changes nothing in a raw stream, and costs 674 MiB a call
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": min(64 << 20, max(4096, size))}]


def stream_size(data: bytes, name: str) -> int:
    """Bytes of `data`'s compressed stream under `name` (gzip, bz2 or xz), container header and trailer excluded."""
    if name == "gzip":
        coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9)  # raw deflate at gzip -9's settings
        return len(coder.compress(data) + coder.flush())
    if name == "bz2":
        return len(bz2.compress(data, 9)) - 4  # after the "BZh9" magic
    if name == "xz":
        return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=_xz_filters(len(data))))
    raise ValueError(f"compressor must be one of {COMPRESSORS}, got {name!r}")


def file_size(data: bytes, name: str) -> int:
    """Bytes of the file `gzip -9`, `bzip2 -9` or `xz -9e` would write for `data` (headers included)."""
    if name == "gzip":
        return len(gzip.compress(data, 9, mtime=0))
    if name == "bz2":
        return len(bz2.compress(data, 9))
    if name == "xz":
        return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    raise ValueError(f"compressor must be one of {COMPRESSORS}, got {name!r}")


def compressor_bits(windows: list, names=COMPRESSORS) -> dict:
    """{name: {"whole": bits/byte of the joined windows as one stream, "per_window": bits/byte with every window
    coded alone, "file": bits/byte of the whole's .gz/.bz2/.xz file}} over `windows` (a list of bytes, in order);
    plus "bytes", the number of bytes."""
    whole = b"".join(windows)
    if not whole:
        raise ValueError("no bytes to compress: the split (or the evaluated part of it) is empty")
    out = {"bytes": len(whole)}
    for name in names:
        out[name] = {"whole": 8 * stream_size(whole, name) / len(whole),
                     "per_window": 8 * sum(stream_size(w, name) for w in windows if w) / len(whole),
                     "file": 8 * file_size(whole, name) / len(whole)}
    return out


def item_bytes(item: dict) -> bytes:
    """The bytes one data item holds: `input_ids` after the start byte, where `attention_mask` is 1."""
    length = int(item["attention_mask"].sum()) - 1
    return bytes(item["input_ids"][1 : 1 + length].tolist())
