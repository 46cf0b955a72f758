"""The look an add takes for a copy of its photo already in the collection.

Adds look side by side: the look runs outside the index's write lock, and
under it only what changed meanwhile is checked again (see :class:`CopyFinder`).
A look held under the lock made every add wait for the look of each add
before it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from indexer.analysis import Analysis
from indexer.catalog import GLOBAL_SCOPE, Catalog, ImageRecord
from indexer.errors import NotFoundError
from indexer.querying import QueryPipeline


@dataclass(frozen=True, slots=True)
class CopyQuestion:
    """Is this photo in the collection already, as seen from ``scope``?"""

    data: bytes
    analysis: Analysis
    scope: int
    distinct_from: Collection[int]  # images the caller knows the photo is not
    every_look: bool  # a query's every look, not only its first


@dataclass(frozen=True, slots=True)
class CopyLook:
    """What the look outside the lock found, and up to which image it looked."""

    question: CopyQuestion
    found: ImageRecord | None
    newest_seen: int  # image ids are never reused, so any later image was added after the look


class CopyFinder:
    def __init__(self, catalog: Catalog, pipeline: QueryPipeline) -> None:
        self.catalog = catalog
        self.pipeline = pipeline

    async def look(self, question: CopyQuestion) -> CopyLook:
        """The collection's copy of the photo, as a query finds it (its first look
        only, unless ``every_look``). Runs without the write lock."""
        newest_seen = await self.catalog.max_id()
        scopes = sorted({GLOBAL_SCOPE, question.scope})
        same_bytes = await self.catalog.find_by_hash(question.analysis.content_hash, scopes)
        if same_bytes is not None:  # identical bytes are the same picture, whatever was said
            return CopyLook(question, same_bytes, newest_seen)
        matches = await self.pipeline.search_analysis(
            question.data,
            question.analysis,
            scope=question.scope,
            top=1 + len(question.distinct_from),
            first_look_only=not question.every_look,
        )
        for match in matches:
            if match.verified and match.image.id not in question.distinct_from:
                return CopyLook(question, match.image, newest_seen)
        return CopyLook(question, None, newest_seen)

    async def confirm(self, look: CopyLook) -> ImageRecord | None:
        """The copy, as of now: call under the write lock, after :meth:`look`.

        A copy found is still there, or the look is taken again (it was removed
        meanwhile: rare). With none found, each image added since the look is
        verified against the photo, so two adds of one picture side by side keep
        one of them.
        """
        question = look.question
        if look.found is not None:
            try:
                return await self.catalog.get(look.found.id)
            except NotFoundError:
                return (await self.look(question)).found
        scopes = {GLOBAL_SCOPE, question.scope}
        added = [
            record
            for record in await self.catalog.images_after(look.newest_seen)
            if record.scope in scopes
        ]
        for record in added:
            if record.video_id is None and record.content_hash == question.analysis.content_hash:
                return record
        pictures = {record.id: record.video_id or record.id for record in added}
        verdicts = await self.pipeline.verdicts(question.analysis, list(pictures))
        verified = [
            (verdict.inliers, pictures[image_id])
            for image_id, verdict in verdicts.items()
            if verdict.verified and pictures[image_id] not in question.distinct_from
        ]
        if not verified:
            return None
        return await self.catalog.get(max(verified)[1])
