"""Reading a Telegram Desktop export ("Export chat history", JSON): the images of one chat.

Only parsing lives here; :mod:`indexer.backfill` adds what is read to an index. Field names
are Telegram Desktop's own (its JSON writer, ``export_output_json.cpp``):

- one chat's export: ``result.json`` is the chat, ``{"name", "type", "id", "messages"}``;
- a whole account's: ``{"about", ..., "chats": {"about", "list": [chat, ...]},
  "left_chats": {...}}``.

A chat's ``id`` is its bare id (see :mod:`indexer.telegram_ids`). A message has ``id``,
``type`` ("message", "service" or "unsupported"), ``date_unixtime`` (a string of seconds;
older exports have only ``date``, in local time without a zone), ``from`` (a name, or null for a
deleted account), ``from_id`` ("user123", "channel123" or "chat123"), ``forwarded_from``, and
its media: a photo as ``photo`` (a path relative to the export, or a sentence in parentheses
when the file was not exported) with ``width`` and ``height``; a document as ``file`` with
``mime_type`` and, for stickers, voice messages, videos and the like, ``media_type``.

Everything read is checked and given its type here, so the rest of the engine never sees raw
JSON: a file that is not such an export raises :class:`ExportError` with what is wrong.
"""

from __future__ import annotations

import datetime as dtm
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from indexer.errors import ExportError
from indexer.telegram_ids import EXPORT_CHAT_TYPES, bot_api_chat_id

RESULT_FILE: Final = "result.json"
# What Telegram Desktop writes for the sender's name when the account was deleted (null).
DELETED_ACCOUNT: Final = "Deleted Account"
# Documents of these kinds are not pictures even when their mime type says image (stickers).
_NOT_PICTURES: Final = frozenset(
    {"sticker", "animation", "video_file", "video_message", "voice_message", "audio_file"}
)
_USER_PREFIX: Final = "user"


@dataclass(frozen=True, slots=True)
class ExportedImage:
    """One photo or image document of a chat's history."""

    message_id: int
    posted_at: float  # Unix time
    sender_id: int | None  # a user's id; None when posted as a chat (a channel, an anonymous admin)
    sender_name: str
    is_photo: bool  # a Telegram photo, not an image sent as a file
    # The file, resolved inside the export folder; None when it was not exported.
    path: Path | None
    # Why there is no file: Telegram Desktop's own sentence, or why the path was refused.
    unavailable: str | None = None
    forwarded_from: str | None = None


@dataclass(frozen=True, slots=True)
class ExportedChat:
    """A chat of an export, with the images of its messages in message order."""

    name: str
    export_type: str  # Telegram Desktop's: "private_supergroup", "public_channel", ...
    bare_id: int
    chat_id: int  # the Bot API's id: the scope its images go to
    folder: Path  # the export's folder, absolute: every file of the export is under it
    images: Sequence[ExportedImage]
    messages: int  # every message of the chat, service messages included


@dataclass(frozen=True, slots=True)
class ChatSummary:
    """A chat listed in a whole-account export (to tell the user which ones there are)."""

    name: str
    export_type: str
    bare_id: int


def read_export(folder: Path, *, chat: int | None = None) -> ExportedChat:
    """The chat exported in ``folder`` (or its ``result.json``): its only chat, or the one
    ``chat`` names in a whole-account export (by the export's bare id or by its Bot API id).

    Raises:
        ExportError: ``folder`` holds no ``result.json``, it is not a Telegram Desktop JSON
            export, or ``chat`` is needed (several chats) or names no chat of it.
    """
    if folder.name == RESULT_FILE and folder.is_file():
        folder = folder.parent  # the file was named instead of its folder
    document = _load(folder)
    if "chats" in document or "left_chats" in document:
        candidates = [*_chat_list(document, "chats"), *_chat_list(document, "left_chats")]
    elif "messages" in document:
        candidates = [document]
    else:
        raise ExportError(
            f"{folder / RESULT_FILE} is not a chat history export: it has neither "
            '"messages" nor "chats" (export with Telegram Desktop, format JSON)'
        )
    chosen = _choose(folder, candidates, chat)
    return _parse_chat(folder, chosen)


# -- the document ---------------------------------------------------------------------------


def _load(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    result = folder / RESULT_FILE
    if not result.is_file():
        raise ExportError(
            f"{folder} is not a Telegram Desktop export: it has no {RESULT_FILE} (export the "
            "chat history in Telegram Desktop with the format set to JSON, not HTML)"
        )
    try:
        with result.open("rb") as handle:
            document = json.load(handle)
    except OSError as error:
        raise ExportError(f"cannot read {result}: {error.strerror or error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{result} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise ExportError(f"{result} is nested too deeply to be an export") from error
    if not isinstance(document, dict):
        raise ExportError(f"{result} is not a Telegram Desktop export: it is not a JSON object")
    return document


def _chat_list(document: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    section = document.get(key)
    if section is None:
        return []
    chats = section.get("list") if isinstance(section, dict) else None
    if not isinstance(chats, list) or not all(isinstance(chat, dict) for chat in chats):
        raise ExportError(f'"{key}" of {RESULT_FILE} has no list of chats')
    return chats


def _choose(
    folder: Path, candidates: Sequence[dict[str, Any]], wanted: int | None
) -> dict[str, Any]:
    if not candidates:
        raise ExportError(f"{folder} holds no chat")
    if wanted is None:
        if len(candidates) == 1:
            return candidates[0]
        listing = "; ".join(
            f"{s.bare_id} {s.export_type} {s.name!r}" for s in map(_summary, candidates)
        )
        raise ExportError(
            f"{folder} holds {len(candidates)} chats: choose one with --chat ID ({listing})"
        )
    for candidate in candidates:
        summary = _summary(candidate)
        if wanted in {summary.bare_id, _bot_api_id(summary)}:
            return candidate
    raise ExportError(f"{folder} has no chat {wanted} (--chat takes the id the export lists)")


def _summary(chat: Mapping[str, Any]) -> ChatSummary:
    bare_id = chat.get("id")
    export_type = chat.get("type")
    if not isinstance(bare_id, int) or isinstance(bare_id, bool):
        raise ExportError(f'a chat of {RESULT_FILE} has no numeric "id"')
    if not isinstance(export_type, str):
        raise ExportError(f'chat {bare_id} of {RESULT_FILE} has no "type"')
    name = chat.get("name")
    return ChatSummary(name if isinstance(name, str) else export_type, export_type, bare_id)


def _bot_api_id(summary: ChatSummary) -> int | None:
    try:
        return bot_api_chat_id(summary.export_type, summary.bare_id)
    except ValueError:
        return None


def _parse_chat(folder: Path, chat: Mapping[str, Any]) -> ExportedChat:
    summary = _summary(chat)
    if summary.export_type not in EXPORT_CHAT_TYPES:
        raise ExportError(
            f"chat {summary.bare_id} is of type {summary.export_type!r}, which has no Bot API "
            "chat to import into"
        )
    try:
        chat_id = bot_api_chat_id(summary.export_type, summary.bare_id)
    except ValueError as error:
        raise ExportError(f"chat {summary.bare_id} of {RESULT_FILE}: {error}") from error
    messages = chat.get("messages")
    if not isinstance(messages, list):
        raise ExportError(f'chat {summary.bare_id} of {RESULT_FILE} has no "messages" list')
    root = Path(os.path.normpath(folder.absolute()))
    images = sorted(_images(root, messages), key=lambda image: image.message_id)
    return ExportedChat(
        name=summary.name,
        export_type=summary.export_type,
        bare_id=summary.bare_id,
        chat_id=chat_id,
        folder=root,
        images=images,
        messages=len(messages),
    )


# -- messages -------------------------------------------------------------------------------


def _images(root: Path, messages: Sequence[Any]) -> Iterator[ExportedImage]:
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ExportError(f"message #{position + 1} of {RESULT_FILE} is not a JSON object")
        # Service messages (a new group photo, members joining) and unsupported ones are not
        # posts: skipped, as the repost watch never sees them.
        if message.get("type") != "message":
            continue
        if "photo" in message:
            is_photo, reference = True, message["photo"]
        elif "file" in message and _is_picture_document(message):
            is_photo, reference = False, message["file"]
        else:
            continue
        yield _image(root, message, is_photo=is_photo, reference=reference)


def _is_picture_document(message: Mapping[str, Any]) -> bool:
    mime_type = message.get("mime_type")
    return (
        isinstance(mime_type, str)
        and mime_type.lower().startswith("image/")
        and message.get("media_type") not in _NOT_PICTURES
    )


def _image(
    root: Path, message: Mapping[str, Any], *, is_photo: bool, reference: Any
) -> ExportedImage:
    message_id = message.get("id")
    if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id <= 0:
        raise ExportError(f'a message of {RESULT_FILE} has no valid "id": {message_id!r}')
    if not isinstance(reference, str) or not reference:
        raise ExportError(f"message {message_id}: its file is {reference!r}, not a path")
    path, unavailable = _resolve(root, reference)
    sender_id, sender_name = _sender(message)
    forwarded = message.get("forwarded_from")
    return ExportedImage(
        message_id=message_id,
        posted_at=_posted_at(message, message_id),
        sender_id=sender_id,
        sender_name=sender_name,
        is_photo=is_photo,
        path=path,
        unavailable=unavailable,
        forwarded_from=forwarded if isinstance(forwarded, str) else None,
    )


def _resolve(root: Path, reference: str) -> tuple[Path | None, str | None]:
    """The file a message's "photo" or "file" names, and why there is none.

    Telegram Desktop writes a sentence in parentheses instead of a path when it did not export
    the file ("(File not included. Change data exporting settings to download.)"). A path that
    leads out of the export folder is refused: a crafted export must not make the import read
    other files.
    """
    if reference.startswith("("):
        return None, reference.strip("()")
    candidate = Path(os.path.normpath(root / reference))
    if candidate.is_absolute() and candidate.is_relative_to(root) and candidate != root:
        return candidate, None
    return None, f"the path {reference!r} leads out of the export folder"


def _sender(message: Mapping[str, Any]) -> tuple[int | None, str]:
    name = message.get("from")
    sender_name = name if isinstance(name, str) and name else DELETED_ACCOUNT
    from_id = message.get("from_id")
    # Only users have a user id; "channel..." and "chat..." senders posted as a chat.
    if isinstance(from_id, str) and from_id.startswith(_USER_PREFIX):
        digits = from_id.removeprefix(_USER_PREFIX)
        if digits.isdigit():
            return int(digits), sender_name
    return None, sender_name


def _posted_at(message: Mapping[str, Any], message_id: int) -> float:
    raw = message.get("date_unixtime")
    if isinstance(raw, str) and raw.isdigit():
        return float(raw)
    # Exports older than "date_unixtime" have "date" only: the exporting computer's local
    # time, without a zone. Read as this computer's local time, which keeps the order of the
    # posts whatever the zone was.
    date = message.get("date")
    if isinstance(date, str):
        try:
            return dtm.datetime.fromisoformat(date).timestamp()
        except ValueError:
            pass
    raise ExportError(f'message {message_id} has neither "date_unixtime" nor a valid "date"')
