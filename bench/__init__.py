"""Corral's benchmark suites; run them with `python -m bench SUITE` (see docs/bench.md)."""
