"""The progress bar of the long offline commands (build, import): the only module importing tqdm."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int, *, enabled: bool) -> tqdm[None]:
    """A bar counting ``total`` images on stderr; ``enabled=False`` shows nothing.

    Smoothed over many updates: images differ a lot in cost, and a bar that jumps
    with each one says nothing about the time left.
    """
    return tqdm(total=total, unit="img", disable=not enabled, smoothing=0.05)
