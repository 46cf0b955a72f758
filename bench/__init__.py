"""Benchmarks of the engine and its baselines. They are run by hand, never by pytest.

Run them from the repository root, e.g. ``.venv/bin/python -m bench.quality --help``;
their outputs go to the git-ignored ``bench/out/``.
"""

# The engine is imported before numpy so that its single-threaded BLAS setting
# applies to the benchmarks too (see indexer/__init__.py).
import indexer  # noqa: F401
