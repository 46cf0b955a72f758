"""Benchmarks of the engine and its baselines. They are run by hand, never by pytest.

Run them from the repository root, e.g. ``.venv/bin/python -m bench.quality --help``;
their outputs go to the git-ignored ``bench/out/``.
"""
