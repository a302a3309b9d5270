"""Helpers shared by the scripts and the benchmarks: argument parsing, local-or-Hub paths, the CPU allocator."""

import argparse
import math
import os
import sys
from pathlib import Path

from transformers import HfArgumentParser


class UsageError(ValueError):
    """A problem with the arguments (or a train.py run's output folder) found before any long compute: the scripts
    print it as `<script>: error: <message>` and exit with code 2, as argparse does for its own errors."""


def usage_exit(error: Exception, script: str):
    """Report a usage error the scripts' one way: the message on stderr, exit code 2."""
    print(f"{script}: error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def parse_arguments(dataclass_types, argv=None, description=None):
    """transformers' `HfArgumentParser` over the dataclasses; a `ValueError` from a dataclass's `__post_init__`
    becomes a usage error (exit code 2, the message on stderr), like argparse's own."""
    parser = HfArgumentParser(dataclass_types, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        return parser.parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    except ValueError as e:
        parser.error(str(e))


def check_flags(args, rules):
    """`rules`: (flag, ok(value), what it allows) rows. A flag left at None (optional, not given) passes; any other
    value must be a finite number (not a bool) that `ok` accepts, else a ValueError names the flag and its range."""
    for name, ok, expected in rules:
        value = getattr(args, name)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not ok(value):
            raise ValueError(f"--{name} {value!r}: expected {expected}")


def at_least(minimum):
    return lambda v: v >= minimum


def positive(v):
    return v > 0


def check_local_or_hub(value: str, flag: str):
    """A path that exists, or a valid Hub repo id. A path that does not exist gets 'no such file or folder' instead
    of huggingface_hub's 'Repo id must be in the form ...'."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(value).expanduser().exists():
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value
    try:
        validate_repo_id(value)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise ValueError(f"{flag} {value}: no such file or folder (and not a Hub repo id)")


def check_file(value: str, flag: str):
    if not Path(value).expanduser().is_file():
        raise ValueError(f"{flag} {value}: no such file")


def check_writable_folder(value: str, flag: str):
    """A folder this process can write into, checked before any long compute: the folder itself when it exists,
    else the nearest folder above it that does (where it would be created). Nothing is left behind."""
    import tempfile

    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value}: a file is in the way (expected a folder)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {value}: {existing} is a file, so the folder cannot be created")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {value}: cannot write into {existing} ({e.strerror or e})") from None


def cache_root(cache_dir=None) -> Path:
    """Where the scripts cache what they make (the rendered spoken digits, file indexes): `--cache_dir`, else
    ~/.cache/poolformer-hf."""
    return Path(cache_dir or Path.home() / ".cache" / "poolformer-hf")


def tune_cpu_allocator(long_sequences: bool = False):
    """glibc's malloc settings for CPU training (no-op outside glibc, and when MALLOC_MMAP_THRESHOLD_ is set).
    Normal lengths: keep freed memory in the heap; glibc otherwise hands every freed tensor above 32 MB back to the
    OS and the next step page-faults it in again (steps ~1.5x faster). Long sequences trained in checkpointed time
    chunks: send every freed tensor of 1 MB or more straight back instead, since the heap otherwise fragments and
    holds ~2.5x the step's real peak (measured at T = 2^18)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**20 if long_sequences else 2**31 - 1)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
