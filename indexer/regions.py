"""Parts of a picture, in fractions of its upright width and height.

Decoding crops to one (a photo framed inside a screenshot), framing finds one,
and the global vectors are also computed per region; none of them owns the idea.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Region:
    """A sub-window of an image, in fractions of its width and height."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def area(self) -> float:
        return (self.right - self.left) * (self.bottom - self.top)

    def overlap(self, other: Region) -> float:
        """Intersection over union with ``other``: 1 for the same region, 0 apart."""
        shared = self._shared_area(other)
        return shared / (self.area + other.area - shared) if shared > 0 else 0.0

    def share_inside(self, other: Region) -> float:
        """How much of ``other``'s area lies inside this region: 1 when it holds all of it."""
        shared = self._shared_area(other)
        return shared / other.area if shared > 0 else 0.0

    def _shared_area(self, other: Region) -> float:
        width = min(self.right, other.right) - max(self.left, other.left)
        height = min(self.bottom, other.bottom) - max(self.top, other.top)
        return width * height if width > 0 and height > 0 else 0.0


def region_grid(scales: Sequence[float] = (0.5, 0.7)) -> list[Region]:
    """Overlapping square-ish windows at each scale, 3x3 positions per scale.

    A photo shown inside a larger frame (a screenshot, a post with a caption)
    fills one of these windows far better than it fills the whole query.
    """
    regions: list[Region] = []
    for scale in scales:
        steps = (0.0, (1.0 - scale) / 2.0, 1.0 - scale)
        regions.extend(Region(x, y, x + scale, y + scale) for y in steps for x in steps)
    return regions
