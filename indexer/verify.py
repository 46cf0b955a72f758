"""Geometric verification: is a candidate the same picture as the query?

Tentative matches come from mutual nearest neighbours that also pass Lowe's
ratio test; a homography is fitted to them with MAGSAC. A bare inlier count is
not a safe "same picture" verdict (unrelated photos reach 20+ inliers on
repeated textures and text), so the verdict also asks for a sane geometry: a
plausible scale, bounded anisotropy and perspective, and inliers spread over the
picture rather than clustered on one detail.

Mirrored copies are verified with the query's mirrored features (see
:meth:`LocalFeatures.mirrored`), so a flip costs one more matching pass and no
second KAZE extraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from indexer.features import LocalFeatures, find_homography
from indexer.regions import Region

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class VerifyParams:
    """Thresholds of the verdict, chosen on real photos (see docs/BENCHMARKS.md)."""

    ratio: float = 0.85
    min_matches: int = 8
    min_inliers: int = 12
    # A mirror image of one face lines up with another face of its kind (a cat's,
    # a person's: nearly symmetric), which an unmirrored comparison cannot do:
    # scikit-image's Chelsea verified as the mirror image of another cat with 15-19
    # inliers. Real mirrored copies had 40 or more (bench.quality's 120 flipped
    # copies), copies in the same orientation down to 13.
    min_mirrored_inliers: int = 24
    min_inlier_ratio: float = 0.25
    # MAGSAC threshold as a fraction of the candidate's longest working side.
    reprojection_error: float = 0.01
    max_scale: float = 10.0
    max_anisotropy: float = 4.0
    max_perspective: float = 0.6
    # Inliers must cover at least this share of one of the two pictures (bbox area).
    min_spread: float = 0.05


@dataclass(frozen=True, slots=True)
class Verification:
    """The verdict for one candidate."""

    inliers: int
    verified: bool
    mirrored: bool
    # The fit behind the inliers: (mirrored) query working pixels to the
    # candidate's; None when too few matches to fit one.
    homography: npt.NDArray[np.float64] | None = field(default=None, compare=False)

    @classmethod
    def rejected(cls) -> Verification:
        return cls(inliers=0, verified=False, mirrored=False)


def verify_candidates(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures],
    *,
    params: VerifyParams = VerifyParams(),
    frame_marks: npt.NDArray[np.bool_] | None = None,
) -> list[Verification]:
    """Verify each candidate against the query and against the mirrored query.

    Both orientations and all candidates share one matrix product, which is
    what makes verifying a dozen candidates cost a few milliseconds.

    ``frame_marks`` says which of the query's keypoints are marks on a frame
    around the photo it shows (``Analysis.frame_marks``). A verdict whose
    inliers are mostly such marks needs enough inliers off them too: two
    screenshots of different photos share a phone's status bar, icons and
    buttons, and those alone verify as the same picture as readily as the
    photos themselves.
    """
    if not candidates:
        return []
    matches = batched_mutual_ratio_matches(
        [query.descriptors, query.mirrored().descriptors],
        [candidate.descriptors for candidate in candidates],
        ratio=params.ratio,
    )
    orientations = (query, query.mirrored())
    verdicts = []
    for position, candidate in enumerate(candidates):
        best = Verification.rejected()
        for is_mirrored, oriented in enumerate(orientations):
            verdict = _verify_pair(
                oriented,
                candidate,
                matches[is_mirrored][position],
                params=params,
                is_mirrored=bool(is_mirrored),
                frame_marks=frame_marks,
            )
            if (verdict.verified, verdict.inliers) > (best.verified, best.inliers):
                best = verdict
        verdicts.append(best)
    return verdicts


def _verify_pair(
    query: LocalFeatures,
    candidate: LocalFeatures,
    matches: MatchPairs,
    *,
    params: VerifyParams,
    is_mirrored: bool,
    frame_marks: npt.NDArray[np.bool_] | None = None,
) -> Verification:
    query_index, candidate_index = matches
    if len(query_index) < params.min_matches:
        return Verification(inliers=0, verified=False, mirrored=is_mirrored)
    source = query.points[query_index]
    target = candidate.points[candidate_index]
    threshold = params.reprojection_error * max(candidate.width, candidate.height)
    fit = find_homography(source, target, reprojection_error=max(threshold, 2.0))
    if fit is None:
        return Verification(inliers=0, verified=False, mirrored=is_mirrored)
    homography, inlier_mask = fit
    inliers = int(inlier_mask.sum())
    verified = (
        inliers >= (params.min_mirrored_inliers if is_mirrored else params.min_inliers)
        and inliers >= params.min_inlier_ratio * len(query_index)
        and _plausible_geometry(homography, source[inlier_mask], query, params)
        and _spread_enough(source[inlier_mask], target[inlier_mask], query, candidate, params)
    )
    if verified and frame_marks is not None:
        on_marks = frame_marks[query_index][inlier_mask]
        off_marks = int(np.count_nonzero(~on_marks))
        if off_marks < params.min_inliers and np.mean(on_marks) > MAX_SHARE_ON_FRAME_MARKS:
            verified = False
    return Verification(
        inliers=inliers, verified=verified, mirrored=is_mirrored, homography=homography
    )


@dataclass(frozen=True, slots=True)
class Footprint:
    """Where a query lies in a candidate, by a verification's fit."""

    region: Region  # the candidate's part under the query, with a margin; fractions
    scale: float  # candidate working pixels per query working pixel (linear)


def query_footprint(
    verification: Verification,
    query: LocalFeatures,
    candidate: LocalFeatures,
    *,
    margin: float = 0.05,
) -> Footprint | None:
    """The part of ``candidate`` the query shows by ``verification``'s fit, widened
    by ``margin`` of its size on every side; None without a fit, or when the
    query's outline does not map to a proper part of the candidate."""
    if verification.homography is None:
        return None
    corners = np.array(
        [[0, 0, 1], [query.width, 0, 1], [query.width, query.height, 1], [0, query.height, 1]],
        dtype=np.float64,
    ).T
    mapped = verification.homography @ corners
    if np.any(mapped[2] <= 1e-9):
        return None  # the outline crosses the horizon: no sane part
    x, y = mapped[0] / mapped[2], mapped[1] / mapped[2]
    # Shoelace area of the mapped outline (a convex quadrilateral for a sane fit).
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    if area <= 0:
        return None
    left, right = float(x.min()), float(x.max())
    top, bottom = float(y.min()), float(y.max())
    pad_x, pad_y = margin * (right - left), margin * (bottom - top)
    region = Region(
        left=max(0.0, (left - pad_x) / candidate.width),
        top=max(0.0, (top - pad_y) / candidate.height),
        right=min(1.0, (right + pad_x) / candidate.width),
        bottom=min(1.0, (bottom + pad_y) / candidate.height),
    )
    if region.right <= region.left or region.bottom <= region.top:
        return None
    return Footprint(region=region, scale=math.sqrt(area / (query.width * query.height)))


# A verdict with more than this share of its inliers on the query's frame marks
# needs min_inliers off them (see verify_candidates). The 22 pairs of screenshots
# of different photos that verified by their frames (of 60 tried) had at most 7
# inliers (16%) off the marks; a photo matched by its own content has nearly all
# of its inliers off them.
MAX_SHARE_ON_FRAME_MARKS = 0.5


MatchPairs = tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]
_TIE_DISTANCE = 1e-2


def batched_mutual_ratio_matches(
    queries: Sequence[FloatArray], candidates: Sequence[FloatArray], *, ratio: float
) -> list[list[MatchPairs]]:
    """For every (query, candidate) pair: index pairs that are mutual nearest
    neighbours and pass Lowe's ratio test.

    Descriptors are unit length, so similarities come from one matrix product;
    candidates are padded to a common length so that the per-candidate best and
    second best are plain reductions over one axis.
    """
    longest = max(len(c) for c in candidates)
    padded = np.zeros((len(candidates), longest, candidates[0].shape[1]), dtype=np.float32)
    valid = np.zeros((len(candidates), longest), dtype=bool)
    for position, descriptors in enumerate(candidates):
        padded[position, : len(descriptors)] = descriptors
        valid[position, : len(descriptors)] = True
    stacked = np.concatenate(queries)
    # (query keypoints, candidates, candidate keypoints); padding can never win.
    similarity = (stacked @ padded.reshape(-1, padded.shape[2]).T).reshape(
        len(stacked), len(candidates), longest
    )
    similarity[:, ~valid] = -3.0
    best = np.argmax(similarity, axis=2)
    best_score = np.take_along_axis(similarity, best[..., None], axis=2)[..., 0]
    np.put_along_axis(similarity, best[..., None], -3.0, axis=2)
    second_score = similarity.max(axis=2)
    np.put_along_axis(similarity, best[..., None], best_score[..., None], axis=2)
    best_distance = np.sqrt(np.maximum(2.0 - 2.0 * best_score, 0.0))
    second_distance = np.sqrt(np.maximum(2.0 - 2.0 * second_score, 0.0))
    # A second neighbour within float rounding of the first is a tie, not a match:
    # identical descriptors can come out of the matrix product as 1.0000001 and
    # 0.99999994, i.e. distances 0 and 3.5e-4.
    passes_ratio = (
        (best_distance < ratio * second_distance)
        & (second_distance > _TIE_DISTANCE)
        & (second_score > -2.0)
    )

    results: list[list[MatchPairs]] = []
    start = 0
    for query in queries:
        rows = slice(start, start + len(query))
        start += len(query)
        # Mutual: the query keypoint is also the candidate keypoint's best, i.e. its
        # score equals that column's maximum (a max-reduction is far cheaper than an
        # argmax across the first axis).
        column_best = similarity[rows].max(axis=0)  # (candidates, candidate keypoints)
        per_candidate: list[MatchPairs] = []
        for position in range(len(candidates)):
            chosen = best[rows, position]
            mutual = best_score[rows, position] >= column_best[position, chosen]
            keep = np.flatnonzero(passes_ratio[rows, position] & mutual)
            per_candidate.append((keep, chosen[keep]))
        results.append(per_candidate)
    return results


def _plausible_geometry(
    homography: npt.NDArray[np.float64],
    inlier_points: FloatArray,
    query: LocalFeatures,
    params: VerifyParams,
) -> bool:
    if abs(homography[2, 2]) < 1e-12:
        return False
    h = homography / homography[2, 2]
    # The local affine map at the inliers' centre: under perspective the map at
    # the origin can be far from what the matched region actually undergoes.
    cx, cy = (float(v) for v in inlier_points.mean(axis=0))
    w = h[2, 0] * cx + h[2, 1] * cy + 1.0
    if w <= 1e-6:
        return False
    u = h[0, 0] * cx + h[0, 1] * cy + h[0, 2]
    v = h[1, 0] * cx + h[1, 1] * cy + h[1, 2]
    jacobian = np.array(
        [
            [(h[0, 0] - u * h[2, 0] / w) / w, (h[0, 1] - u * h[2, 1] / w) / w],
            [(h[1, 0] - v * h[2, 0] / w) / w, (h[1, 1] - v * h[2, 1] / w) / w],
        ]
    )
    determinant = float(np.linalg.det(jacobian))
    if determinant <= 0:
        return False  # a reflection: mirrored copies are matched by the mirrored pass
    scale = math.sqrt(determinant)
    if not 1.0 / params.max_scale <= scale <= params.max_scale:
        return False
    singular = np.linalg.svd(jacobian, compute_uv=False)
    if singular[0] > params.max_anisotropy * singular[1]:
        return False
    # How much the scale changes across the query picture: large for a degenerate fit.
    size = max(query.width, query.height)
    return bool(abs(h[2, 0]) * size + abs(h[2, 1]) * size <= params.max_perspective)


def _spread_enough(
    source: FloatArray,
    target: FloatArray,
    query: LocalFeatures,
    candidate: LocalFeatures,
    params: VerifyParams,
) -> bool:
    def covered(points: FloatArray, width: int, height: int) -> float:
        extent = points.max(axis=0) - points.min(axis=0)
        return float(extent[0] * extent[1]) / float(max(width * height, 1))

    return (
        max(
            covered(source, query.width, query.height),
            covered(target, candidate.width, candidate.height),
        )
        >= params.min_spread
    )
