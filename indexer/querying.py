"""The query pipeline: from a query's features to verified matches.

A query runs in stages: decode and extract (worker); a quick look, in which
the query's rarest words vote within a fixed budget of postings and the best
few are verified geometrically (worker), and which finds most copies at a cost
that does not grow with the collection. Only if none verifies: encode the
query and its mirror image into global vectors, take candidates from the
serving view (the Annoy generation and the fresh buffer) and from the inverted
file's full vote, and verify the best few. If still none verifies, look at a
photo framed inside the query, then again with regional vectors (the photo may
be a small part of the query, as in a screenshot) and verify more. When still
none verifies, the candidates that came closest get a closer look: the part of
each that the query shows is described again, at the query's own detail, and
verified once more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from indexer.analysis import (
    Analysis,
    QuerySource,
    VideoFrame,
    analyze_bytes,
    analyze_framed,
    analyze_path,
    analyze_video_frame,
)
from indexer.catalog import GLOBAL_SCOPE, Catalog, ImageRecord
from indexer.errors import ImageError, SourceError
from indexer.features import LocalFeatures
from indexer.images import MAX_MADE_AS_SIDES, CopyMaking
from indexer.maintenance import ServingView
from indexer.regions import Region, region_grid
from indexer.segments import SegmentSet
from indexer.settings import EngineSettings
from indexer.verify import Verification, query_footprint, verify_candidates
from indexer.workers import CpuPool

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

REGIONS = region_grid()
# Segments are voted on side by side (SegmentSet.vote): at a million images a
# vote is tens of milliseconds of one thread otherwise, while a core idles.
# One pool for the process; its threads start when first needed.
_SEGMENT_THREADS = ThreadPoolExecutor(
    max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="segment-vote"
)


@dataclass(frozen=True, slots=True)
class Match:
    """One result of a query."""

    image: ImageRecord
    path: Path  # absolute path of the photo file
    score: float  # 0..1; above 0.5 only when verified
    verified: bool  # geometric verification says it is the same picture
    inliers: int
    mirrored: bool  # matched as a mirror image of the query
    similarity: float  # cosine similarity of the global vectors
    # A moving picture found: seconds from its start to the frame that matched best.
    frame_seconds: float | None = None
    # A moving query: seconds from its start to its frame that found this image.
    query_seconds: float | None = None


@dataclass(slots=True)
class StageTimings:
    """Seconds spent in each stage of the last query, and how often the optional
    stages ran (``counts``, e.g. "regional look"): for benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def count(self, event: str) -> None:
        self.counts[event] = self.counts.get(event, 0) + 1


Ranking = list[tuple[int, float]]  # (image id, similarity), best first
FramedLoader = Callable[[], Awaitable[LocalFeatures]]
# Regions with fewer keypoints than this describe too little to rank by.
MIN_REGION_KEYPOINTS = 24
# A query whose outline covers more of a candidate than this shows all of it.
_WHOLE = 0.99
_WHOLE_REGION = Region(0.0, 0.0, 1.0, 1.0)
# A query enlarged this much or more to be described is small enough to be a
# crop a loose fit cannot place (see closer_look_part).
_LOOSE_FIT_MAGNIFICATION = 2.0
# Aspect ratios this close (relative) are one shape: a 29 px side rounds by 2-3%.
_SAME_SHAPE = 0.04
# Inliers beyond which a verified first candidate needs no second opinion.
_CONFIDENT_INLIERS = 30
# Reciprocal-rank fusion constant: how much a first place outweighs a fifth.
RANK_FUSION_K = 3.0


def _best_similarity(
    rankings: Sequence[Ranking], best: dict[int, float] | None = None
) -> dict[int, float]:
    """Each image's highest similarity over ``rankings``, added into ``best`` if given."""
    best = {} if best is None else best
    for ranking in rankings:
        for image_id, value in ranking:
            best[image_id] = max(value, best.get(image_id, -2.0))
    return best


def _by_score(scores: dict[int, float]) -> list[int]:
    """Image ids, highest score first."""
    return sorted(scores, key=scores.__getitem__, reverse=True)


def _fused_ranking(rankings: Sequence[Ranking]) -> list[int]:
    """Image ids by reciprocal-rank fusion over several rankings.

    Regional vectors are noisy one by one (a window of sky resembles many
    photos), but the true original tends to rank well in several overlapping
    windows; summing 1/(k + rank) rewards that agreement where a plain maximum
    of similarities rewards the luckiest window.
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (image_id, _) in enumerate(ranking):
            scores[image_id] = scores.get(image_id, 0.0) + 1.0 / (RANK_FUSION_K + rank)
    return _by_score(scores)


def _alternated(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """The items of both lists taken in turns, each once, in order."""
    seen: set[int] = set()
    taken = []
    for pair in itertools.zip_longest(first, second):
        for item in pair:
            if item is not None and item not in seen:
                seen.add(item)
                taken.append(item)
    return taken


@dataclass(frozen=True, slots=True)
class QuickLook:
    """What the quick look found: its candidates, best voted first, and their verdicts."""

    ranked: list[int]
    verdicts: dict[int, Verification]


@dataclass(frozen=True, slots=True)
class FirstLook:
    """A query's first candidates from both sources."""

    rankings: list[Ranking]  # nearest global vectors, one ranking per orientation
    votes: Ranking  # inverted-file votes, both orientations merged

    def order(self, similarity: dict[int, float]) -> list[int]:
        """The order to verify candidates in: the votes fused with the global
        vectors' ranking (``similarity``, their best similarity by image).

        Votes find a part of a photo, or a photo among a million others; the
        global vector finds whole pictures whose local features changed too
        much to vote (blur, low texture). Fusing ranks rewards either.
        """
        if not self.votes:
            return _by_score(similarity)
        by_vector = [(i, similarity[i]) for i in _by_score(similarity)]
        return _fused_ranking([self.votes, by_vector])


def _keep_stronger(into: dict[int, Verification], verdicts: dict[int, Verification]) -> None:
    """Add ``verdicts`` to ``into``, each image keeping its stronger verdict."""
    for image_id, verdict in verdicts.items():
        kept = into.get(image_id)
        if kept is None or (verdict.verified, verdict.inliers) > (kept.verified, kept.inliers):
            into[image_id] = verdict


def _keep_better(best: dict[int, Match], match: Match) -> None:
    """Add ``match`` to ``best`` (by image id) unless that image has a better one."""
    kept = best.get(match.image.id)
    if kept is None or (match.score, match.inliers) > (kept.score, kept.inliers):
        best[match.image.id] = match


def _first_pictures(ranked: Sequence[int], records: dict[int, ImageRecord], top: int) -> set[int]:
    """The ids among ``ranked`` that show the first ``top`` distinct pictures, a video's
    frames counting as one picture (all of its frames ranked there are kept)."""
    pictures: list[int] = []
    for image_id in ranked:
        record = records.get(image_id)
        if record is None:
            continue
        picture = record.video_id if record.video_id is not None else record.id
        if picture not in pictures:
            if len(pictures) == top:
                continue
            pictures.append(picture)
    return {
        image_id
        for image_id in ranked
        if image_id in records
        and (records[image_id].video_id or records[image_id].id) in pictures
    }


def _best_first(matches: dict[int, Match]) -> list[Match]:
    return sorted(matches.values(), key=lambda m: (m.score, m.inliers), reverse=True)


def match_score(verification: Verification, similarity: float) -> float:
    """A score in [0, 1]: verified matches above 0.5 and growing with inliers,
    unverified ones below 0.5 by global similarity."""
    if verification.verified:
        return 0.5 + 0.5 * verification.inliers / (verification.inliers + 20.0)
    return 0.5 * min(max(similarity, 0.0), 0.999)


class QueryPipeline:
    """Runs queries against the view ``serving()`` returns when each query starts.

    ``locate`` gives the file of a catalog record, for :attr:`Match.path`.
    """

    def __init__(
        self,
        catalog: Catalog,
        settings: EngineSettings,
        pool: CpuPool,
        *,
        serving: Callable[[], ServingView],
        segments: Callable[[], SegmentSet | None],
        locate: Callable[[ImageRecord], Path],
    ) -> None:
        self.catalog = catalog
        self.settings = settings
        self.pool = pool
        self._serving = serving
        self._segments = segments
        self._locate = locate

    async def query(
        self,
        source: bytes | Path,
        *,
        scope: int = GLOBAL_SCOPE,
        top: int = 5,
        timings: StageTimings | None = None,
    ) -> list[Match]:
        """Decode and describe ``source``, then :meth:`search` (see :meth:`SearchService.query`)."""
        timings = timings if timings is not None else StageTimings()
        started = time.perf_counter()
        analysis = await self.pool.run(_analyze, source, self.settings)
        timings.add("analyze", time.perf_counter() - started)
        return await self.search_analysis(source, analysis, scope=scope, top=top, timings=timings)

    async def search_analysis(
        self,
        source: bytes | Path,
        analysis: Analysis,
        *,
        scope: int = GLOBAL_SCOPE,
        top: int = 5,
        timings: StageTimings | None = None,
        first_look_only: bool = False,
    ) -> list[Match]:
        """Search for the image ``analysis`` describes (an analysis made for a query, of
        ``source``) with every look a query takes: the whole image first, then, while
        nothing verifies, the photos shown inside it and its regions; a moving picture
        frame by frame (see :meth:`_search_moving`). With ``first_look_only``, the
        first batch of candidates of the whole image (a moving picture's first frame)
        alone."""
        timings = timings if timings is not None else StageTimings()
        if analysis.moving:
            return await self._search_moving(source, analysis, scope=scope, top=top,
                                             timings=timings, first_frame_only=first_look_only)
        inner = [] if first_look_only else [
            _inner_loader(self.pool, source, frame, self.settings) for frame in analysis.frames
        ]
        return await self.search(
            analysis.features,
            scope=scope,
            top=top,
            timings=timings,
            inner=inner,
            frame_marks=analysis.frame_marks,
            first_look_only=first_look_only,
            query_source=analysis.source,
        )

    async def search(
        self,
        features: LocalFeatures,
        *,
        scope: int = GLOBAL_SCOPE,
        top: int = 5,
        timings: StageTimings | None = None,
        inner: Sequence[FramedLoader] = (),
        frame_marks: npt.NDArray[np.bool_] | None = None,
        first_look_only: bool = False,
        query_source: QuerySource | None = None,
    ) -> list[Match]:
        """Search with features already extracted (see :meth:`query`).

        ``frame_marks`` are the query's keypoints on a frame around the photo
        it shows (``Analysis.frame_marks``): no verdict may rest on them alone
        (see :func:`verify_candidates`).

        ``inner`` extract the features of the photos shown inside the query (a
        framed photo, pictures on a page), likeliest first; they are called, one
        after the other, only while nothing verifies. With
        ``first_look_only`` only the first batch of candidates is verified: the
        look for a copy of a photo being added in bulk, for which a new photo
        would otherwise take every stage (most copies are found in the first
        batch; the repost watch takes every stage); and the look of each frame
        of a moving query, whose other frames are the second chance.

        ``query_source`` says how the picture the features describe is stored: a
        closer look shows a candidate's part the same way (without it, at the
        candidate's own detail).
        """
        timings = timings if timings is not None else StageTimings()
        # One consistent view of each source for the whole query.
        serving, segments = self._serving(), self._segments()
        if serving.generation is None:
            return []
        visible = {GLOBAL_SCOPE, scope}
        oriented = (features, features.mirrored())

        # The first look's votes, encoding and Annoy are pure CPU work of tens of
        # milliseconds at a million images: on threads they never stall the event
        # loop (numba, numpy and annoy release the GIL). The quick vote, bounded by
        # its budget, runs on the loop (_quick_look).
        quick = await self._quick_look(
            segments, features, scope=scope, top=top, timings=timings, frame_marks=frame_marks
        )
        if any(v.verified for v in quick.verdicts.values()):
            clock = time.perf_counter()
            similarity = await asyncio.to_thread(
                self.similarities, serving, oriented, quick.ranked
            )
            timings.add("similarity", time.perf_counter() - clock)
            return await self._results(
                quick.ranked, quick.verdicts, similarity, visible=visible, top=top,
                timings=timings,
            )
        verdicts = dict(quick.verdicts)

        clock = time.perf_counter()
        # Deep enough to take part in the regional look's fusion below; only the
        # first batch of it is verified before that.
        depth = max(top, self.settings.verify_limit)
        look = await self.first_look(serving, segments, oriented, scope=scope, count=depth)
        timings.add("candidates", time.perf_counter() - clock)
        rankings = look.rankings
        similarity = _best_similarity(rankings)
        ranked = look.order(similarity)
        # The candidates the quick look turned down are not verified again.
        unjudged = [image_id for image_id in ranked if image_id not in verdicts]
        await self._verify_first_batch(features, unjudged, verdicts, timings, frame_marks)
        # An inner photo's verdicts are kept apart: a candidate it rejects may
        # still verify against the whole query, and each has a budget of its own.
        framed_verdicts: dict[int, Verification] = {}
        for framed in inner:
            if any(v.verified for v in (*verdicts.values(), *framed_verdicts.values())):
                break
            looked = await self._search_framed(
                framed,
                serving=serving,
                segments=segments,
                scope=scope,
                similarity=similarity,
                timings=timings,
            )
            _keep_stronger(framed_verdicts, looked)
        if not first_look_only and not any(
            v.verified for v in (*verdicts.values(), *framed_verdicts.values())
        ):
            clock = time.perf_counter()
            # Side by side, as in the first look: windows in Annoy, the mirror image's vote.
            regional, mirror_votes = await asyncio.gather(
                asyncio.to_thread(self.regional_candidates, serving, oriented, visible),
                asyncio.to_thread(self.votes, segments, oriented[1], scope=scope),
            )
            timings.add("candidates", time.perf_counter() - clock)
            timings.count("regional look")
            _best_similarity(regional, similarity)
            budget = max(self.settings.verify_limit - len(verdicts), 0)
            # The whole query's own rankings take part: an original half covered
            # ranks 20th there and 50th by windows, but well in both together.
            fused = _fused_ranking([*regional, *rankings])
            # The votes take turns with the windows: among 70 rankings of windows
            # their one ranking would be outvoted, yet a photo shown small on a
            # page is found by its votes (4th to 10th) and by no window.
            voted = _alternated([i for i, _ in look.votes], [i for i, _ in mirror_votes])
            extra = [i for i in _alternated(voted, fused) if i not in verdicts][:budget]
            verdicts.update(await self._verify(features, extra, timings, frame_marks))
            if not any(v.verified for v in (*verdicts.values(), *framed_verdicts.values())):
                closer = await self._closer_looks(
                    features, verdicts, query_source, timings, frame_marks
                )
                _keep_stronger(verdicts, closer)
        _keep_stronger(verdicts, framed_verdicts)

        return await self._results(
            ranked, verdicts, similarity, visible=visible, top=top, timings=timings
        )

    async def _quick_look(
        self,
        segments: SegmentSet | None,
        features: LocalFeatures,
        *,
        scope: int,
        top: int,
        timings: StageTimings,
        frame_marks: npt.NDArray[np.bool_] | None,
    ) -> QuickLook:
        """The quick look (``EngineSettings.quick_vote``): the query as sent votes
        on its rarest words within a budget of postings, and the first batch of
        what it finds is verified as the first look's is."""
        params = self.settings.quick_vote
        if params is None or segments is None:
            return QuickLook([], {})
        clock = time.perf_counter()
        # On the event loop, not a thread: its posting budget bounds the vote at 2-3 ms
        # at a million images, and handing it to a thread and back cost 0.35-0.45 ms
        # more (docs/BENCHMARKS.md, "The quick vote on the event loop").
        voted = segments.vote(
            (features,),
            scope=scope,
            # Enough to fill the results with ``top`` pictures, a video's frames counting once.
            count=max(self.settings.first_batch, top * max(1, self.settings.video_frames)),
            params=params,
        )
        timings.add("candidates", time.perf_counter() - clock)
        ranked = [image_id for image_id, _ in voted]
        verdicts: dict[int, Verification] = {}
        await self._verify_first_batch(features, ranked, verdicts, timings, frame_marks)
        if any(v.verified for v in verdicts.values()):
            timings.count("quick look found")
        return QuickLook(ranked, verdicts)

    async def _verify_first_batch(
        self,
        features: LocalFeatures,
        ranked: Sequence[int],
        verdicts: dict[int, Verification],
        timings: StageTimings,
        frame_marks: npt.NDArray[np.bool_] | None,
    ) -> None:
        """Verify the first batch of ``ranked`` into ``verdicts``: the original is
        nearly always first, so the top two alone, and the rest of the batch only
        when they leave doubt."""
        verdicts.update(await self._verify(features, ranked[:2], timings, frame_marks))
        if not any(v.verified and v.inliers >= _CONFIDENT_INLIERS for v in verdicts.values()):
            verdicts.update(
                await self._verify(
                    features, ranked[2 : self.settings.first_batch], timings, frame_marks
                )
            )

    def similarities(
        self, serving: ServingView, oriented: Sequence[LocalFeatures], image_ids: Sequence[int]
    ) -> dict[int, float]:
        """Each image's best global similarity to the query in either orientation, for
        results found without a search of the global vectors. Blocking: run it on a thread."""
        if serving.generation is None or not image_ids:
            return {}
        codebook = serving.generation.codebook
        ids, stored = serving.vectors(image_ids)
        queries = np.stack([codebook.encode(features.descriptors) for features in oriented])
        # Stored vectors are unit length when written; dividing keeps a stray one honest.
        norms = np.maximum(np.linalg.norm(stored, axis=1), 1e-12)
        best = (stored @ queries.T).max(axis=1, initial=-1.0) / norms
        return dict(zip(ids.tolist(), best.tolist(), strict=True))

    async def _results(
        self,
        ranked: Sequence[int],
        verdicts: dict[int, Verification],
        similarity: dict[int, float],
        *,
        visible: set[int],
        top: int,
        timings: StageTimings,
    ) -> list[Match]:
        """The ``top`` best pictures among the first ranked and the verified, best first."""
        clock = time.perf_counter()
        # Several frames of one video may rank among the first: the first ``top``
        # pictures are looked for among as many rows as ``top`` videos could fill.
        looked_at = ranked[: top * max(1, self.settings.video_frames)]
        verified = {i for i, v in verdicts.items() if v.verified}
        records = await self.catalog.get_many(sorted({*looked_at, *verified}))
        wholes = await self._wholes(records)
        timings.add("catalog", time.perf_counter() - clock)
        shown = _first_pictures(looked_at, records, top) | verified
        best: dict[int, Match] = {}
        for image_id, record in records.items():
            if image_id not in shown:
                continue
            # A frame found stands for its moving picture, shown once, by its best frame.
            whole = wholes.get(record.video_id) if record.video_id is not None else record
            if whole is None or whole.scope not in visible:  # defence in depth: never cross chats
                continue
            verdict = verdicts.get(image_id, Verification.rejected())
            _keep_better(
                best,
                Match(
                    image=whole,
                    path=self._locate(whole),
                    score=match_score(verdict, similarity.get(image_id, 0.0)),
                    verified=verdict.verified,
                    inliers=verdict.inliers,
                    mirrored=verdict.mirrored,
                    similarity=similarity.get(image_id, 0.0),
                    frame_seconds=record.frame_seconds,
                ),
            )
        return _best_first(best)[:top]

    async def _wholes(self, records: dict[int, ImageRecord]) -> dict[int, ImageRecord]:
        """The moving pictures that the frame rows among ``records`` belong to, by id."""
        wanted = {r.video_id for r in records.values() if r.video_id is not None}
        wholes = {i: records[i] for i in wanted if i in records}
        if wanted - wholes.keys():
            wholes.update(await self.catalog.get_many(sorted(wanted - wholes.keys())))
        return wholes

    async def _search_moving(
        self,
        source: bytes | Path,
        analysis: Analysis,
        *,
        scope: int,
        top: int,
        timings: StageTimings,
        first_frame_only: bool = False,
    ) -> list[Match]:
        """Search with each frame of a moving query in turn, until one verifies.

        A frame's first look only: a moving picture is rarely a screenshot, and its
        other frames are a better second chance than regions of this one. The next
        frame is described only when needed, so a found video costs one frame.
        """
        best: dict[int, Match] = {}
        described = list(analysis.video_frames)  # a query's first frame; an add's every one
        left = list(analysis.frames_left)
        frame: VideoFrame | None = described.pop(0)
        while frame is not None:
            timings.count("video frame")
            for match in await self.search(
                frame.features, scope=scope, top=top, timings=timings, first_look_only=True
            ):
                _keep_better(best, dataclasses.replace(match, query_seconds=frame.seconds))
            if first_frame_only or any(match.verified for match in best.values()):
                break
            frame = described.pop(0) if described else await self._next_frame(
                source, left, timings
            )
        return _best_first(best)[:top]

    async def _next_frame(
        self, source: bytes | Path, left: list[int], timings: StageTimings
    ) -> VideoFrame | None:
        """The next frame of ``left`` (taken from it) that can be described, if any."""
        while left:
            index = left.pop(0)
            clock = time.perf_counter()
            try:
                return await self.pool.run(analyze_video_frame, source, index, self.settings)
            except ImageError as error:
                log.info("frame %d of the query cannot be described: %s", index, error)
            finally:
                timings.add("analyze", time.perf_counter() - clock)
        return None

    async def first_look(
        self,
        serving: ServingView,
        segments: SegmentSet | None,
        oriented: Sequence[LocalFeatures],
        *,
        scope: int,
        count: int,
    ) -> FirstLook:
        """The first candidates of a query: the nearest global vectors of each
        orientation, and the images that the query's local features vote for in
        the inverted file.

        The two share nothing and release the GIL, so they run side by side on
        two threads: a query waits for the longer of them, the vote, not for both.

        Only the query as sent votes here (``oriented[0]``): a mirrored copy is
        found by its mirrored global vector, nearly always, and voting costs
        most of this stage, so the mirror image votes only in the second look
        (:meth:`votes`).
        """
        rankings, votes = await asyncio.gather(
            asyncio.to_thread(self.nearest_vectors, serving, oriented, scope=scope, count=count),
            asyncio.to_thread(self.votes, segments, oriented[0], scope=scope),
        )
        return FirstLook(rankings, votes)

    def nearest_vectors(
        self,
        serving: ServingView,
        oriented: Sequence[LocalFeatures],
        *,
        scope: int,
        count: int,
    ) -> list[Ranking]:
        """The nearest global vectors of each orientation. Blocking: run it on a thread."""
        assert serving.generation is not None  # noqa: S101 - checked by the caller
        vectors = [serving.generation.codebook.encode(f.descriptors) for f in oriented]
        visible = {GLOBAL_SCOPE, scope}
        return self._nearest(serving, vectors, visible, count, self.settings.search_k)

    def votes(
        self, segments: SegmentSet | None, features: LocalFeatures, *, scope: int
    ) -> Ranking:
        """The images ``features`` vote for, best first. Blocking: run it on a thread."""
        if segments is None:
            return []
        return segments.vote(
            (features,),
            scope=scope,
            count=self.settings.vote_candidates,
            params=self.settings.vote,
            threads=_SEGMENT_THREADS,
        )

    def regional_candidates(
        self, serving: ServingView, oriented: Sequence[LocalFeatures], visible: set[int]
    ) -> list[Ranking]:
        """One ranking per region of each orientation, for a photo that is only a
        part of the query. Blocking (CPU work): run it on a thread."""
        assert serving.generation is not None  # noqa: S101 - checked by the caller
        codebook = serving.generation.codebook
        vectors = [
            row
            for features in oriented
            for row in codebook.encode_regions(
                features, REGIONS, min_keypoints=MIN_REGION_KEYPOINTS
            )
        ]
        return self._nearest(
            serving,
            vectors,
            visible,
            self.settings.candidates_per_region,
            self.settings.search_k // 4,
        )

    def _nearest(
        self,
        serving: ServingView,
        vectors: Sequence[FloatArray],
        visible: set[int],
        count: int,
        search_k: int,
    ) -> list[Ranking]:
        """For each vector, the nearest visible images (Annoy and fresh buffer merged)."""
        # Other chats' images are filtered out after the search, so a chat's own
        # (rarer) images need a deeper look to stay among the results.
        depth = count if visible == {GLOBAL_SCOPE} else count * 4
        generation, fresh, removed = serving.generation, serving.fresh, serving.removed
        assert generation is not None  # noqa: S101 - callers return early without one
        rankings = []
        for vector in vectors:
            merged: dict[int, float] = {}
            for found in (
                generation.search(vector, depth, search_k),
                fresh.search(vector, depth),
            ):
                for image_id, scope, value in zip(
                    found.ids.tolist(),
                    found.scopes.tolist(),
                    found.similarities.tolist(),
                    strict=True,
                ):
                    if scope in visible and image_id not in removed:
                        merged[image_id] = max(value, merged.get(image_id, -2.0))
            ordered = sorted(merged.items(), key=lambda item: item[1], reverse=True)
            rankings.append(ordered[:count])
        return rankings

    async def _search_framed(
        self,
        framed: FramedLoader,
        *,
        serving: ServingView,
        segments: SegmentSet | None,
        scope: int,
        similarity: dict[int, float],
        timings: StageTimings,
    ) -> dict[int, Verification]:
        """Search the photo framed inside the query as a query of its own.

        Records its candidates' similarities in ``similarity``; returns the
        verdicts of the framed photo on its first batch of candidates.
        """
        clock = time.perf_counter()
        try:
            inner = await framed()
        except ImageError as error:
            log.info("the framed photo cannot be described: %s", error)
            return {}
        timings.add("analyze", time.perf_counter() - clock)
        clock = time.perf_counter()
        look = await self.first_look(
            serving,
            segments,
            (inner, inner.mirrored()),
            scope=scope,
            count=self.settings.first_batch,
        )
        timings.add("candidates", time.perf_counter() - clock)
        _best_similarity(look.rankings, similarity)
        ranked = look.order(_best_similarity(look.rankings))
        return await self._verify(inner, ranked[: self.settings.first_batch], timings)

    async def _closer_looks(
        self,
        features: LocalFeatures,
        verdicts: dict[int, Verification],
        query_source: QuerySource | None,
        timings: StageTimings,
        frame_marks: npt.NDArray[np.bool_] | None,
    ) -> dict[int, Verification]:
        """Verdicts of the closest unverified candidates against the part of each
        that the query shows, described again as the query was made.

        A deep crop shows a fifth of a photo, where the photo's stored keypoints,
        the strongest 500 of the whole, are thin: a crop's original got 10
        inliers and, described again, 286. A thumbnail is blurred where the
        stored original is sharp, and its keypoints sit on its JPEG blocks: so
        the part is reduced to the thumbnail's detail and saved with its JPEG
        table first (a 42 px copy: 6 inliers; 63 once made alike). Unrelated
        photos made alike still reach only 4 to 7. The verdict keeps every rule.
        """
        settings = self.settings
        closest = sorted(
            (
                image_id
                for image_id, verdict in verdicts.items()
                if not verdict.verified
                and verdict.homography is not None
                and verdict.inliers >= settings.closer_look_inliers
            ),
            key=lambda image_id: -verdicts[image_id].inliers,
        )[: settings.closer_looks]
        if not closest:
            return {}
        records = await self.catalog.get_many(closest)
        stored = await self.catalog.features(closest)
        parts: dict[int, tuple[Path, Region, CopyMaking]] = {}
        for image_id in closest:
            record, candidate = records.get(image_id), stored.get(image_id)
            if record is None or candidate is None or record.moving:
                continue  # removed meanwhile, or a frame of a video: no picture to look at
            made_as = closer_look_part(
                verdicts[image_id],
                features,
                candidate,
                record,
                query_source,
                working_side=settings.working_side,
            )
            if made_as is not None:
                parts[image_id] = (self._locate(record), *made_as)
        if not parts:
            return {}
        clock = time.perf_counter()
        # Described side by side on the pool, then verified in one batch.
        described = await asyncio.gather(
            *(self._describe_part(image_id, *part) for image_id, part in parts.items())
        )
        timings.add("closer look", time.perf_counter() - clock)
        looked_at = {
            image_id: part
            for image_id, part in zip(parts, described, strict=True)
            if part is not None
        }
        for _ in looked_at:
            timings.count("closer look")
        if not looked_at:
            return {}
        verdicts_of_parts = await self.pool.run(
            verify_candidates,
            features,
            list(looked_at.values()),
            params=settings.verify,
            frame_marks=frame_marks,
        )
        return dict(zip(looked_at, verdicts_of_parts, strict=True))

    async def _describe_part(
        self, image_id: int, path: Path, region: Region, making: CopyMaking
    ) -> LocalFeatures | None:
        """The features of a candidate's part for a closer look, or ``None`` (logged)
        when its file moved or changed since it was indexed: the candidate then
        keeps the verdict it had."""
        try:
            return await self.pool.run(
                analyze_framed, path, region, self.settings, made_as=making
            )
        except (SourceError, ImageError) as error:
            log.info("no closer look at image %d: %s", image_id, error)
            return None

    async def verdicts(self, analysis: Analysis, ids: Sequence[int]) -> dict[int, Verification]:
        """The verdicts of these images alone against an analysed query (absent ones left out)."""
        return await self._verify(analysis.features, ids, StageTimings(), analysis.frame_marks)

    async def _verify(
        self,
        features: LocalFeatures,
        ids: Sequence[int],
        timings: StageTimings,
        frame_marks: npt.NDArray[np.bool_] | None = None,
    ) -> dict[int, Verification]:
        if not ids:
            return {}
        clock = time.perf_counter()
        stored = await self.catalog.features(ids)
        timings.add("catalog", time.perf_counter() - clock)
        present = [i for i in ids if i in stored]
        clock = time.perf_counter()
        verdicts = await self.pool.run(
            verify_candidates,
            features,
            [stored[i] for i in present],
            params=self.settings.verify,
            frame_marks=frame_marks,
        )
        timings.add("verify", time.perf_counter() - clock)
        return dict(zip(present, verdicts, strict=True))


def closer_look_part(
    verdict: Verification,
    query: LocalFeatures,
    candidate: LocalFeatures,
    record: ImageRecord,
    query_source: QuerySource | None,
    *,
    working_side: int,
) -> tuple[Region, CopyMaking] | None:
    """The part of ``candidate`` a closer look describes, and how to make it as the
    query was made; None when there is nothing to look at closer."""
    if verdict.homography is None:
        return None
    footprint = query_footprint(verdict, query, candidate)
    if query_source is None:
        return None if footprint is None else (footprint.region, CopyMaking())
    # Source pixels per working pixel, for the candidate and for the query.
    candidate_pixels = max(record.width, record.height) / max(candidate.width, candidate.height)
    query_pixels = max(query_source.width, query_source.height) / max(query.width, query.height)
    magnification = 1 / query_pixels
    whole_detail = max(query_source.width, query_source.height) / max(record.width, record.height)
    if footprint is None:
        return _loose_fit_part(
            query_source, record, whole_detail, magnification, working_side=working_side
        )
    if footprint.region.area > _WHOLE:
        # A copy of the whole: reduced to the copy's very size, so that the JPEG
        # blocks fall where the copy's fell (a fit of 6 or 7 inliers misjudges
        # the scale by a fifth).
        detail = whole_detail
    else:
        detail = query_pixels / (footprint.scale * candidate_pixels)
    return footprint.region, CopyMaking(
        detail=min(1.0, detail),
        luma_table=query_source.luma_table,
        magnification=magnification,
    )


def _loose_fit_part(
    query_source: QuerySource,
    record: ImageRecord,
    whole_detail: float,
    magnification: float,
    *,
    working_side: int,
) -> tuple[Region, CopyMaking] | None:
    """The part a closer look describes for a fit too loose to place the query."""
    # Only for a small query, enlarged 2x or more to be described: unrelated
    # queries took this look for half of their closer looks when any enlarged
    # query did.
    if magnification < _LOOSE_FIT_MAGNIFICATION:
        return None
    if whole_detail < 1 and _same_shape(query_source, record):
        # Taken for a smaller copy of the whole, as its shape says: a 42 px copy
        # of a 168 px photo had 6 inliers under a degenerate fit.
        return _WHOLE_REGION, CopyMaking(
            detail=whole_detail, luma_table=query_source.luma_table, magnification=magnification
        )
    # Taken for a crop at the candidate's own detail: the whole candidate is
    # enlarged as the query was, if it is small enough (a 44 px crop of a 95 px
    # photo: 8 inliers under a wild perspective, 17 so).
    if max(record.width, record.height) * magnification > MAX_MADE_AS_SIDES * working_side:
        return None
    return _WHOLE_REGION, CopyMaking(
        luma_table=query_source.luma_table, magnification=magnification
    )


def _same_shape(query_source: QuerySource, record: ImageRecord) -> bool:
    """Whether the query has the candidate's aspect ratio, as a resized copy does
    (within the rounding of a side of a few dozen pixels)."""
    query_aspect = query_source.width / query_source.height
    record_aspect = record.width / record.height
    return abs(query_aspect - record_aspect) <= _SAME_SHAPE * record_aspect


def _inner_loader(
    pool: CpuPool, source: bytes | Path, frame: Region, settings: EngineSettings
) -> FramedLoader:
    """Extracts the features of the photo inside ``frame`` of ``source`` on the pool."""

    async def load() -> LocalFeatures:
        return await pool.run(analyze_framed, source, frame, settings)

    return load


def _analyze(source: bytes | Path, settings: EngineSettings) -> Analysis:
    if isinstance(source, Path):
        return analyze_path(source, settings, for_query=True)
    return analyze_bytes(source, settings, for_query=True)
