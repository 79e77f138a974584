"""lcow's benchmark suite: ``python -m bench``, described in docs/benchmarks.md."""
