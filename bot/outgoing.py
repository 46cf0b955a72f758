"""Sending search results back: one album (or one photo), each with its caption.

A result photo is uploaded once: the file_id Telegram gives it is remembered in the catalog
and sent instead of the bytes from then on. Files over Telegram's photo limits are downscaled
before upload.

A result that moves is sent as what it is: a video goes in the album with the photos, as
sendMediaGroup allows; an animation (a GIF) cannot be in an album with photos, so each is
sent on its own after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from telegram import InputMediaPhoto, InputMediaVideo, Message
from telegram.constants import ChatAction
from telegram.error import BadRequest, TelegramError

from bot import replies
from bot.uploads import fit_for_telegram
from indexer import (
    CatalogError,
    ImageTooLargeError,
    IndexerError,
    Match,
    SearchService,
    SourceError,
)

log = logging.getLogger(__name__)

# Telegram shows a chat action for 5 s; refreshing a little sooner keeps it steady.
_CHAT_ACTION_REFRESH_S: Final = 4.0
# Bots may upload videos and animations of up to 50 MB (https://core.telegram.org/bots/api#sendvideo).
TELEGRAM_MAX_UPLOAD_BYTES: Final = 50 * 2**20

MediaKind = Literal["photo", "video", "animation"]


@dataclass(frozen=True, slots=True)
class _Outgoing:
    match: Match
    media: str | bytes  # a remembered file_id, or the bytes to upload
    caption: str
    kind: MediaKind


def media_kind(match: Match) -> MediaKind:
    """How a result is sent: a GIF as an animation, other moving pictures as videos."""
    if not match.image.moving:
        return "photo"
    return "animation" if match.path.suffix.lower() == ".gif" else "video"


async def send_results(
    message: Message, matches: Sequence[Match], service: SearchService
) -> None:
    """Reply to ``message`` with ``matches`` (best first): an album, one photo, or a sentence
    saying nothing was found. The file ids of uploaded photos are remembered.

    Raises:
        TelegramError: the Bot API refused the reply.
    """
    outgoing = await _prepare(matches, use_file_ids=True)
    try:
        await _send(message, outgoing, service)
    except BadRequest as error:
        # File ids belong to one bot token; after a token change the cached ones are refused.
        if "file identifier" not in error.message.lower() or all(
            isinstance(item.media, bytes) for item in outgoing
        ):
            raise
        log.warning("a remembered file_id was refused (%s); uploading the results again", error)
        await _send(message, await _prepare(matches, use_file_ids=False), service)


@contextlib.asynccontextmanager
async def showing_action(
    message: Message, action: str = ChatAction.UPLOAD_PHOTO
) -> AsyncIterator[None]:
    """Show ``action`` ("sending a photo...") in the chat for as long as the block runs."""

    async def keep_showing() -> None:
        try:
            while True:
                await message.reply_chat_action(action)
                await asyncio.sleep(_CHAT_ACTION_REFRESH_S)
        except TelegramError as error:
            # Only cosmetic: the answer itself must not fail because of it.
            log.warning("could not show the %s chat action: %s", action, error)

    task = asyncio.create_task(keep_showing(), name=f"chat-action-{message.chat_id}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _prepare(matches: Sequence[Match], *, use_file_ids: bool) -> list[_Outgoing]:
    outgoing = []
    for rank, match in enumerate(matches, start=1):
        kind = media_kind(match)
        file_id = match.image.telegram_file_id if use_file_ids else None
        if file_id is not None:
            media: str | bytes = file_id
        else:
            try:
                # Decoding and re-encoding a large photo takes a while: keep it off the loop.
                media = await asyncio.to_thread(
                    fit_for_telegram if kind == "photo" else _moving_upload, match.path
                )
            except IndexerError as error:
                log.warning("result #%d cannot be sent: %s", match.image.id, error)
                continue
        outgoing.append(_Outgoing(match, media, replies.result_caption(rank, match), kind))
    return outgoing


def _moving_upload(path: Path) -> bytes:
    """The bytes of a moving result as they are (Telegram converts them itself).

    Raises:
        ImageTooLargeError: over the 50 MB a bot may upload.
        SourceError: the file cannot be read.
    """
    try:
        size = path.stat().st_size
        if size > TELEGRAM_MAX_UPLOAD_BYTES:
            raise ImageTooLargeError(f"{path.name} has {size} bytes; bots upload up to 50 MB")
        return path.read_bytes()
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror or error}") from error


async def _send(
    message: Message,
    outgoing: Sequence[_Outgoing],
    service: SearchService,
) -> None:
    if not outgoing:
        await message.reply_text(replies.no_results())
        return
    in_album = [item for item in outgoing if item.kind != "animation"]
    apart = [item for item in outgoing if item.kind == "animation"]
    sent: list[Message] = []
    if len(in_album) == 1:
        [only] = in_album
        reply = message.reply_photo if only.kind == "photo" else message.reply_video
        sent.append(await reply(only.media, caption=only.caption))
    elif in_album:
        sent.extend(
            await message.reply_media_group(
                [
                    (InputMediaPhoto if item.kind == "photo" else InputMediaVideo)(
                        item.media, caption=item.caption
                    )
                    for item in in_album
                ]
            )
        )
    for item in apart:
        sent.append(await message.reply_animation(item.media, caption=item.caption))
    uploaded = [
        (item.match.image.id, file_id)
        for item, posted in zip([*in_album, *apart], sent, strict=True)
        if isinstance(item.media, bytes) and (file_id := _posted_file_id(posted)) is not None
    ]
    if not uploaded:
        return
    try:
        for image_id, file_id in uploaded:
            await service.remember_file_id(image_id, file_id)
    except CatalogError as error:
        # The results were delivered; only the upload cache missed out (next time uploads again).
        log.warning("could not remember the file ids of %d results: %s", len(uploaded), error)


def _posted_file_id(posted: Message) -> str | None:
    """The file id Telegram gave a result it posted (the largest size of a photo)."""
    if posted.photo:
        return posted.photo[-1].file_id
    media = posted.animation or posted.video
    return media.file_id if media is not None else None
