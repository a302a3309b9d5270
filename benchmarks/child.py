"""The entry of a benchmark's child process: one measurement in a fresh process (its own peak memory, an empty
inductor cache, no state left by the model before), its result printed as the last line of JSON.

    python -m benchmarks.child train NAME LENGTH BATCH | generate NAME NEW_TOKENS BATCH | generate_cuda NEW_TOKENS BATCH
                               | data ... | step KIND LENGTH
"""

import sys

from .bench_data import child_startup
from .bench_generate import child_generate, child_generate_cuda
from .bench_length import one_step
from .bench_train import child_train


def main(argv=None):
    mode, *rest = sys.argv[1:] if argv is None else argv
    if mode == "train":
        return child_train(rest[0], int(rest[1]), int(rest[2]))
    if mode == "generate_cuda":
        return child_generate_cuda(int(rest[0]), int(rest[1]))
    if mode == "generate":
        return child_generate(rest[0], int(rest[1]), int(rest[2]))
    if mode == "data":
        return child_startup(*rest)
    if mode == "step":
        return one_step(rest[0], int(rest[1]))
    raise SystemExit(f"benchmarks.child: unknown mode {mode!r}")


if __name__ == "__main__":
    main()
