"""What the tests and the benchmarks share: fakes of the world outside the product.

``telegram_emulator`` is a Bot API server on loopback that the real PTB Application talks to
over HTTP. Both ``pytest`` and ``python -m bench.…`` run from the repository root, where
this package is importable; it is not part of the installed product.
"""
