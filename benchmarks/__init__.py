"""Poolformer's benchmarks: `python -m benchmarks.run` (see run.py), run from the project root."""
