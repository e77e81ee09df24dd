"""Benchmarks and GPU checks, each a script (`python bench/X.py`); a package only so that tests import them as
`bench.X`, which keeps bench/detection.py from standing in for the repository's detection.py."""
