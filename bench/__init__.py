"""Benchmarks: component floors, then the gateway itself (``python -m bench``; see bench/README.md)."""
