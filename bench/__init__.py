"""Benchmarks, installed with the project: `rag bench` mounts ``bench.cli``. They print figures, not test."""
