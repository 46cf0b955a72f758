"""Benchmarks of the engine and its baselines. They are run by hand, never by pytest.

Run them from the repository root, e.g. ``.venv/bin/python -m bench.quality --help``;
their outputs go to the git-ignored ``bench/out/``.

Benchmarks that measure the engine as its callers use it import only its public API,
``indexer``, and time it through its own figures (``StageTimings``, ``BuildReport``).
Those that measure one part at a scale no caller reaches (synthetic indexes of a million
images in ``scale``/``scale_end_to_end``, the voting kernel in ``voting`` and
``vote_budget``, the stages of one extraction in ``speed``'s worker profile, segment merges
in ``adds``) import that part's module, and say so where they do.
"""

# The engine is imported before numpy so that its single-threaded BLAS setting
# applies to the benchmarks too (see indexer/__init__.py).
import indexer  # noqa: F401
