"""A local Telegram Bot API emulator for end-to-end tests of the bot.

The real python-telegram-bot ``Application`` talks HTTP to this server exactly as it talks to
Telegram, so nothing inside PTB is mocked. Point a bot at it with
``Bot(emu.token, base_url=f"{emu.url}/bot", base_file_url=f"{emu.url}/file/bot")``.

What it emulates, in the shapes of the Bot API (``{"ok": true, "result": ...}`` on success,
``{"ok": false, "error_code": ..., "description": ...}`` on failure):

* methods getMe, deleteWebhook, getWebhookInfo, getUpdates (offset / limit / long-poll timeout /
  allowed_updates, and a 409 for a competing poll), sendMessage, sendPhoto, sendDocument,
  sendVideo, sendAnimation, sendMediaGroup (photos with videos, or documents), sendChatAction,
  setMyCommands, getMyCommands, deleteMyCommands, getChatMember,
  getFile, answerCallbackQuery, editMessageReplyMarkup, editMessageText, deleteMessage,
  deleteMessages, setMessageReaction, and file downloads under ``/file/bot<token>/<file_path>``;
* updates of kinds message, edited_message and callback_query: a user presses an inline button
  (``user_presses_button``), edits a photo (``user_edits_photo``), forwards one
  (``user_forwards_photo``), or a linked channel's post arrives in its discussion group
  (``channel_post_arrives``, ``is_automatic_forward``);
* method names are case-insensitive, as in the real API; a wrong token answers 401, an unknown
  method 404;
* the ``HTML``, ``MarkdownV2`` and legacy ``Markdown`` parse modes are parsed into plain text and
  entities, and malformed markup is refused with "can't parse entities" the way Telegram refuses
  it, so formatting bugs surface in tests rather than in production;
* flood control: a test can make a method answer 429 with ``retry_after`` for the next calls or
  for a seeded random share of calls; a refused call has no effect.

The test drives the users' side synchronously (``create_user``, ``private_chat``,
``create_group``, ``user_sends_text`` / ``_photo`` / ``_document`` / ``_album`` / ``_video`` /
``_animation`` / ``_video_note`` / ``_sticker``) and awaits what
the bot did (``wait_for``, ``wait_for_messages``), with every call to the API recorded in
``calls`` and every message or chat action the bot produced recorded in ``outbox``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dtm
import hashlib
import io
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, Self

import cv2
from aiohttp import BodyPartReader, web
from PIL import Image, UnidentifiedImageError
from telegram.ext import Application

JsonDict = dict[str, Any]
ChatType = Literal["private", "group", "supergroup", "channel"]
MemberStatus = Literal["creator", "administrator", "member", "restricted", "left", "kicked"]

GET_FILE_LIMIT_BYTES = 20 * 1024 * 1024
"""getFile refuses files above this size, as the real (non-local) Bot API does."""

MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
MIN_ALBUM_ITEMS = 2
MAX_ALBUM_ITEMS = 10

# Uploads above Telegram's 50 MB limit for bots are refused with 413, as Telegram does.
_MAX_UPLOAD_BYTES = 50 * 1024 * 1024
_MAX_REQUEST_BYTES = _MAX_UPLOAD_BYTES + 1024 * 1024
_PHOTO_THUMBNAIL_SIDES = (90, 320, 800)
_PHOTO_MAX_SIDES_SUM = 10_000
_PHOTO_MAX_ASPECT_RATIO = 20
_CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)
_TOKEN_SHAPE = re.compile(r"^\d+:[A-Za-z0-9_-]+$")
_USERNAME_SHAPE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{3,31}$")
_BOT_COMMAND_NAME = re.compile(r"^[a-z0-9_]{1,32}$")

# How form and multipart fields are decoded: PTB sends every non-string value JSON-encoded,
# and the real server knows each parameter's type, so the emulator does too.
_JSON_PARAMS = frozenset(
    {
        "allowed_updates",
        "caption_entities",
        "commands",
        "entities",
        "message_ids",
        "reaction",
        "link_preview_options",
        "media",
        "reply_markup",
        "reply_parameters",
        "scope",
    }
)
_INT_PARAMS = frozenset(
    {
        "cache_time",
        "limit",
        "message_id",
        "message_thread_id",
        "offset",
        "reply_to_message_id",
        "user_id",
    }
)
# The reactions a bot may set (the Bot API's ReactionTypeEmoji list, in part).
_BOT_REACTIONS = frozenset({"👍", "👎", "❤", "🔥", "👀", "🤔", "😁", "🎉", "🤯", "💯", "🙈"})
# Telegram's service account, the sender of a channel post forwarded into its discussion group.
_TELEGRAM_SERVICE_USER: JsonDict = {"id": 777000, "is_bot": False, "first_name": "Telegram"}
_FLOAT_PARAMS = frozenset({"timeout"})
_BOOL_PARAMS = frozenset(
    {
        "allow_paid_broadcast",
        "allow_sending_without_reply",
        "disable_content_type_detection",
        "disable_notification",
        "disable_web_page_preview",
        "drop_pending_updates",
        "has_spoiler",
        "is_big",
        "protect_content",
        "show_alert",
        "show_caption_above_media",
    }
)


# --------------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmulatedUser:
    """A Telegram account known to the emulator (a person, or the bot itself)."""

    id: int
    first_name: str
    username: str | None = None
    last_name: str | None = None
    language_code: str | None = "en"
    is_bot: bool = False

    def to_api(self) -> JsonDict:
        """The user as a Bot API ``User`` object."""
        user: JsonDict = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.last_name is not None:
            user["last_name"] = self.last_name
        if self.username is not None:
            user["username"] = self.username
        if self.language_code is not None and not self.is_bot:
            user["language_code"] = self.language_code
        return user


@dataclass(frozen=True)
class EmulatedChat:
    """A chat known to the emulator: a user's private chat with the bot, or a group."""

    id: int
    type: ChatType
    title: str | None = None
    username: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    is_forum: bool = False

    def to_api(self) -> JsonDict:
        """The chat as the Bot API ``Chat`` object embedded in messages."""
        chat: JsonDict = {"id": self.id, "type": self.type}
        for key in ("title", "username", "first_name", "last_name"):
            value = getattr(self, key)
            if value is not None:
                chat[key] = value
        if self.is_forum:
            chat["is_forum"] = True
        return chat


@dataclass(frozen=True)
class UploadedFile:
    """One file part of a multipart request, exactly as the bot uploaded it."""

    field_name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class BotCall:
    """One HTTP request the bot made to the API, whatever its outcome.

    ``params`` are decoded to their Bot API types (JSON fields parsed, integers and booleans
    converted); ``files`` are the multipart file parts by field name. ``received_at`` is
    ``time.monotonic()`` when the request arrived. Calls are recorded in the order they were
    answered, which for a long poll is after later, quicker calls.
    """

    method: str
    params: Mapping[str, Any]
    files: Mapping[str, UploadedFile]
    chat_id: int | str | None
    received_at: float
    http_status: int
    result: Any = None
    description: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the API answered this call with success."""
        return self.http_status == HTTPStatus.OK


@dataclass(frozen=True)
class SentMessage:
    """A message the bot posted (album items are one each), as returned to the bot."""

    chat_id: int
    message: JsonDict
    call: BotCall

    @property
    def message_id(self) -> int:
        """The message's id within its chat."""
        return int(self.message["message_id"])

    @property
    def text(self) -> str | None:
        """The visible text (markup already parsed away), or the caption of a media message."""
        text = self.message.get("text", self.message.get("caption"))
        return None if text is None else str(text)

    @property
    def largest_photo_file_id(self) -> str:
        """The file_id of the largest size of the photo in this message.

        Raises:
            ValueError: if the message carries no photo.
        """
        sizes = self.message.get("photo")
        if not sizes:
            raise ValueError(f"message {self.message_id} in chat {self.chat_id} has no photo")
        return str(sizes[-1]["file_id"])

    @property
    def reply_to_message_id(self) -> int | None:
        """The id of the message this one replies to, if it is a reply."""
        replied = self.message.get("reply_to_message")
        return None if replied is None else int(replied["message_id"])


@dataclass(frozen=True)
class SentChatAction:
    """A chat action (``typing``, ``upload_photo``, ...) the bot broadcast."""

    chat_id: int
    action: str
    call: BotCall


BotOutput = SentMessage | SentChatAction


class BotApiError(Exception):
    """The API refuses a call; turned into an ``{"ok": false, ...}`` answer by the emulator."""

    def __init__(
        self, http_status: int, description: str, parameters: JsonDict | None = None
    ) -> None:
        super().__init__(description)
        self.http_status = http_status
        self.description = description
        self.parameters = parameters

    def to_api(self) -> JsonDict:
        """The refusal as the Bot API's error object."""
        body: JsonDict = {
            "ok": False,
            "error_code": self.http_status,
            "description": self.description,
        }
        if self.parameters is not None:
            body["parameters"] = self.parameters
        return body


def _bad_request(detail: str) -> BotApiError:
    return BotApiError(HTTPStatus.BAD_REQUEST, f"Bad Request: {detail}")


def _forbidden(detail: str) -> BotApiError:
    return BotApiError(HTTPStatus.FORBIDDEN, f"Forbidden: {detail}")


# --------------------------------------------------------------------------------------------
# Text and entities. Offsets and lengths are in UTF-16 code units, as in the Bot API.
# --------------------------------------------------------------------------------------------


def utf16_length(text: str) -> int:
    """Length of ``text`` in UTF-16 code units, the unit of Bot API entity offsets."""
    return len(text.encode("utf-16-le")) // 2


def entity_text(text: str, entity: Mapping[str, Any]) -> str:
    """The part of ``text`` an entity covers, honouring its UTF-16 offset and length."""
    encoded = text.encode("utf-16-le")
    start = int(entity["offset"]) * 2
    return encoded[start : start + int(entity["length"]) * 2].decode("utf-16-le")


_USER_ENTITY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("bot_command", re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,64}(?:@[A-Za-z0-9_]{3,32})?(?![\w/@])")),
    ("mention", re.compile(r"(?<![\w@])@[A-Za-z][A-Za-z0-9_]{3,31}(?!\w)")),
    ("url", re.compile(r"https?://[^\s<>\"]+")),
)


def detect_entities(text: str) -> list[JsonDict]:
    """The entities a Telegram client attaches to text a user typed: commands, mentions, URLs."""
    found: list[JsonDict] = []
    for entity_type, pattern in _USER_ENTITY_PATTERNS:
        for match in pattern.finditer(text):
            found.append(
                {
                    "offset": utf16_length(text[: match.start()]),
                    "length": utf16_length(match.group()),
                    "type": entity_type,
                }
            )
    found.sort(key=lambda entity: (entity["offset"], -entity["length"]))
    return found


class _EntityBuilder:
    """Accumulates plain text and the entities opened and closed over it."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.position = 0
        self.entities: list[JsonDict] = []

    def append(self, text: str) -> None:
        self.parts.append(text)
        self.position += utf16_length(text)

    def close(self, entity_type: str, start: int, **extra: str) -> None:
        # Telegram drops entities that cover nothing.
        if self.position > start:
            entity: JsonDict = {"offset": start, "length": self.position - start}
            entity["type"] = entity_type
            entity.update(extra)
            self.entities.append(entity)

    def result(self) -> tuple[str, list[JsonDict]]:
        self.entities.sort(key=lambda entity: (entity["offset"], -entity["length"]))
        return "".join(self.parts), self.entities


def _cant_parse(detail: str) -> BotApiError:
    return _bad_request(f"can't parse entities: {detail}")


def _byte_offset(source: str, index: int) -> int:
    return len(source[:index].encode("utf-8"))


_HTML_SIMPLE_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
}
_HTML_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_HTML_CHAR_REFERENCE = re.compile(r"&(#[0-9]+|#[xX][0-9a-fA-F]+|[a-zA-Z]+);")
_HTML_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)?([^<>]*)>")


def _html_attributes(raw: str) -> dict[str, str]:
    # The stdlib parser handles quoting and bare attributes the way browsers do.
    collected: dict[str, str] = {}

    class _Collector(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            collected.update({name: value or "" for name, value in attrs})

    collector = _Collector(convert_charrefs=True)
    collector.feed(f"<x {raw}>")
    collector.close()
    return collected


def _parse_html(source: str) -> tuple[str, list[JsonDict]]:  # noqa: PLR0912 - one branch per token kind
    builder = _EntityBuilder()
    open_tags: list[tuple[str, int, dict[str, str]]] = []
    index = 0
    while index < len(source):
        char = source[index]
        if char == "&":
            reference = _HTML_CHAR_REFERENCE.match(source, index)
            if reference is None:
                builder.append("&")
                index += 1
                continue
            name = reference.group(1)
            if name.startswith("#"):
                code = int(name[2:], 16) if name[1] in "xX" else int(name[1:])
                builder.append(chr(code))
            elif name in _HTML_NAMED_ENTITIES:
                builder.append(_HTML_NAMED_ENTITIES[name])
            else:
                builder.append(reference.group())
            index = reference.end()
            continue
        if char != "<":
            builder.append(char)
            index += 1
            continue
        tag = _HTML_TAG.match(source, index)
        where = _byte_offset(source, index)
        if tag is None or tag.group(2) is None:
            raise _cant_parse(f"Unsupported start tag at byte offset {where}")
        closing, name, raw_attributes = tag.group(1) == "/", tag.group(2).lower(), tag.group(3)
        if closing:
            if not open_tags:
                raise _cant_parse(f'Unexpected end tag "{name}" at byte offset {where}')
            open_name, start, attributes = open_tags.pop()
            if open_name != name:
                raise _cant_parse(
                    f'Unmatched end tag at byte offset {where}, expected "</{open_name}>", '
                    f'found "</{name}>"'
                )
            _close_html_entity(builder, open_name, start, attributes, open_tags)
        else:
            attributes = _html_attributes(raw_attributes)
            supported = name in _HTML_SIMPLE_TAGS or (
                (name == "a" and "href" in attributes)
                or (name == "span" and attributes.get("class") == "tg-spoiler")
                or (name == "tg-emoji" and "emoji-id" in attributes)
            )
            if not supported:
                raise _cant_parse(f'Unsupported start tag "{name}" at byte offset {where}')
            open_tags.append((name, builder.position, attributes))
        index = tag.end()
    if open_tags:
        raise _cant_parse(f'Can\'t find end tag corresponding to start tag "{open_tags[-1][0]}"')
    return builder.result()


def _close_html_entity(
    builder: _EntityBuilder,
    name: str,
    start: int,
    attributes: Mapping[str, str],
    still_open: Sequence[tuple[str, int, dict[str, str]]],
) -> None:
    if name == "a":
        builder.close("text_link", start, url=attributes["href"])
    elif name == "span":
        builder.close("spoiler", start)
    elif name == "tg-emoji":
        builder.close("custom_emoji", start, custom_emoji_id=attributes["emoji-id"])
    elif name == "blockquote" and "expandable" in attributes:
        builder.close("expandable_blockquote", start)
    elif name == "code" and still_open and still_open[-1][0] == "pre":
        # <pre><code class="language-x"> is one pre entity, with a language if the class says.
        css_class = attributes.get("class", "")
        if css_class.startswith("language-"):
            still_open[-1][2]["language"] = css_class.removeprefix("language-")
    elif name == "pre" and "language" in attributes:
        builder.close("pre", start, language=attributes["language"])
    else:
        builder.close(_HTML_SIMPLE_TAGS[name], start)


_MARKDOWN_V2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")
_MARKDOWN_V2_MARKERS = {
    "*": "bold",
    "_": "italic",
    "__": "underline",
    "~": "strikethrough",
    "||": "spoiler",
}
_ESCAPABLE_ASCII = "".join(chr(code) for code in range(1, 127))


def _read_until(source: str, index: int, terminator: str, escapable: str) -> tuple[str, int]:
    """Text from ``index`` up to an unescaped ``terminator``; returns it and the index after."""
    collected: list[str] = []
    while index < len(source):
        if source[index] == "\\" and index + 1 < len(source) and source[index + 1] in escapable:
            collected.append(source[index + 1])
            index += 2
        elif source.startswith(terminator, index):
            return "".join(collected), index + len(terminator)
        else:
            collected.append(source[index])
            index += 1
    raise ValueError(terminator)


def _parse_markdown_v2(source: str) -> tuple[str, list[JsonDict]]:  # noqa: PLR0912 - one branch per token kind
    builder = _EntityBuilder()
    open_markers: list[tuple[str, int, int]] = []
    quote_start: int | None = None
    index = 0
    while index < len(source):
        char = source[index]
        at_line_start = index == 0 or source[index - 1] == "\n"
        if at_line_start and quote_start is not None and char != ">":
            # The quote ends before the newline that ended its last line.
            builder.parts.pop()
            builder.position -= 1
            builder.close("blockquote", quote_start)
            builder.append("\n")
            quote_start = None
        if at_line_start and char == ">":
            if quote_start is None:
                quote_start = builder.position
            index += 1
            continue
        if char == "\\":
            if index + 1 < len(source) and 1 <= ord(source[index + 1]) <= 126:
                builder.append(source[index + 1])
                index += 2
            else:
                builder.append(char)
                index += 1
            continue
        if char == "`":
            index = _markdown_v2_code(source, index, builder)
            continue
        if char == "[" or source.startswith("![", index):
            index = _markdown_v2_link(source, index, builder)
            continue
        marker = source[index : index + 2] if source.startswith(("__", "||"), index) else char
        if marker in _MARKDOWN_V2_MARKERS:
            if open_markers and open_markers[-1][0] == marker:
                _, start, _ = open_markers.pop()
                builder.close(_MARKDOWN_V2_MARKERS[marker], start)
            elif any(open_marker == marker for open_marker, _, _ in open_markers):
                where = _byte_offset(source, index)
                raise _cant_parse(f"Can't find end of the entity starting at byte offset {where}")
            else:
                open_markers.append((marker, builder.position, _byte_offset(source, index)))
            index += len(marker)
            continue
        if char in _MARKDOWN_V2_RESERVED:
            raise _cant_parse(
                f"Character '{char}' is reserved and must be escaped with the preceding '\\'"
            )
        builder.append(char)
        index += 1
    if quote_start is not None:
        builder.close("blockquote", quote_start)
    if open_markers:
        marker, _, where = open_markers[-1]
        entity_name = _MARKDOWN_V2_MARKERS[marker].capitalize()
        raise _cant_parse(f"Can't find end of {entity_name} entity at byte offset {where}")
    return builder.result()


def _markdown_v2_code(source: str, index: int, builder: _EntityBuilder) -> int:
    where = _byte_offset(source, index)
    fence = "```" if source.startswith("```", index) else "`"
    try:
        body, after = _read_until(source, index + len(fence), fence, "`\\")
    except ValueError:
        entity_name = "Pre" if fence == "```" else "Code"
        raise _cant_parse(
            f"Can't find end of {entity_name} entity at byte offset {where}"
        ) from None
    start = builder.position
    if fence == "`":
        builder.append(body)
        builder.close("code", start)
        return after
    first_line, newline, rest = body.partition("\n")
    if newline and first_line and not any(space in first_line for space in " \t"):
        builder.append(rest)
        builder.close("pre", start, language=first_line)
    else:
        builder.append(body)
        builder.close("pre", start)
    return after


def _markdown_v2_link(source: str, index: int, builder: _EntityBuilder) -> int:
    where = _byte_offset(source, index)
    is_emoji = source[index] == "!"
    label_start = index + (2 if is_emoji else 1)
    try:
        _, after_label = _read_until(source, label_start, "](", _ESCAPABLE_ASCII)
        url, after_url = _read_until(source, after_label, ")", ")\\")
    except ValueError:
        raise _cant_parse(f"Can't find end of the entity starting at byte offset {where}") from None
    # Markup inside a link label is parsed too; a nested parse keeps that simple.
    label_text, label_entities = _parse_markdown_v2(source[label_start : after_label - 2])
    start = builder.position
    builder.entities.extend(
        {**entity, "offset": entity["offset"] + start} for entity in label_entities
    )
    builder.append(label_text)
    if is_emoji:
        builder.close("custom_emoji", start, custom_emoji_id=url.removeprefix("tg://emoji?id="))
    else:
        builder.close("text_link", start, url=url)
    return after_url


def _parse_legacy_markdown(source: str) -> tuple[str, list[JsonDict]]:
    builder = _EntityBuilder()
    index = 0
    while index < len(source):
        char = source[index]
        if char == "\\" and index + 1 < len(source) and source[index + 1] in "_*`[":
            builder.append(source[index + 1])
            index += 2
            continue
        if char in "*_`" or char == "[":
            terminator = {"*": "*", "_": "_", "`": "`", "[": "]"}[char]
            if source.startswith("```", index):
                terminator = "```"
            body_start = index + len(terminator)
            end = source.find(terminator, body_start)
            if end == -1:
                where = _byte_offset(source, index)
                raise _cant_parse(f"Can't find end of the entity starting at byte offset {where}")
            body = source[body_start:end]
            after = end + len(terminator)
            start = builder.position
            if char == "[":
                url_match = re.match(r"\(([^)]*)\)", source[after:])
                if url_match is None:
                    builder.append(source[index:after])
                    index = after
                    continue
                builder.append(body)
                builder.close("text_link", start, url=url_match.group(1))
                index = after + url_match.end()
                continue
            builder.append(body)
            entity_type = {"*": "bold", "_": "italic", "`": "code", "```": "pre"}[terminator]
            builder.close(entity_type, start)
            index = after
            continue
        builder.append(char)
        index += 1
    return builder.result()


def trim_whitespace(text: str, entities: Sequence[JsonDict]) -> tuple[str, list[JsonDict]]:
    """Strip leading and trailing whitespace as Telegram does with texts and captions,
    moving and clipping the entities to match."""
    stripped = text.strip()
    shift = utf16_length(text[: len(text) - len(text.lstrip())])
    limit = utf16_length(stripped)
    kept: list[JsonDict] = []
    for entity in entities:
        start = max(int(entity["offset"]) - shift, 0)
        end = min(int(entity["offset"]) + int(entity["length"]) - shift, limit)
        if end > start:
            kept.append({**entity, "offset": start, "length": end - start})
    return stripped, kept


def parse_formatted_text(text: str, parse_mode: str | None) -> tuple[str, list[JsonDict]]:
    """Turn text in a Bot API parse mode into what the user sees and its entities.

    Raises:
        BotApiError: 400 "can't parse entities" for malformed markup, or for an unknown mode.
    """
    if parse_mode is None or parse_mode == "":
        return text, []
    parsers: dict[str, Callable[[str], tuple[str, list[JsonDict]]]] = {
        "html": _parse_html,
        "markdownv2": _parse_markdown_v2,
        "markdown": _parse_legacy_markdown,
    }
    parser = parsers.get(parse_mode.lower())
    if parser is None:
        raise _bad_request(f"unsupported parse_mode {parse_mode!r}")
    return parser(text)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoredFile:
    file_unique_id: str
    file_path: str
    file_size: int
    data: bytes | None  # None for a file registered only by its declared size
    width: int | None = None
    height: int | None = None
    file_name: str | None = None
    mime_type: str | None = None
    duration: int | None = None  # whole seconds, for videos and animations


@dataclass(frozen=True)
class _PhotoVariant:
    data: bytes
    width: int
    height: int


def _photo_variants(data: bytes) -> list[_PhotoVariant]:
    """Smaller JPEG renditions of an image, smallest first, then the image itself.

    Raises:
        ValueError: if the bytes are not an image Pillow can decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a decodable image: {exc}") from exc
    longest = max(width, height)
    sides = [side for side in _PHOTO_THUMBNAIL_SIDES if side < longest] or [longest]
    variants: list[_PhotoVariant] = []
    for side in sides:
        thumbnail = rgb.copy()
        thumbnail.thumbnail((side, side))
        buffer = io.BytesIO()
        thumbnail.save(buffer, format="JPEG", quality=80)
        variants.append(_PhotoVariant(buffer.getvalue(), *thumbnail.size))
    variants.append(_PhotoVariant(data, width, height))
    return variants


def _video_facts(data: bytes) -> tuple[int, int, int]:
    """Width, height and whole seconds of a video, as Telegram reports them (zeros for bytes
    no decoder reads: Telegram, too, keeps such an upload as a file of unknown size)."""
    stream = io.BytesIO(data)  # must outlive the capture, which reads it
    capture = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])
    try:
        if not capture.isOpened():
            return 0, 0, 0
        fps = capture.get(cv2.CAP_PROP_FPS)
        frames = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        seconds = round(frames / fps) if fps > 0 and frames > 0 else 0
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        return width, int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), seconds
    finally:
        capture.release()


def _short_hash(*parts: object, size: int = 9) -> str:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=size).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def _decode_param(name: str, value: Any) -> Any:
    """One request parameter as the Bot API type it stands for.

    Raises:
        BotApiError: 400 when a value cannot be read as its parameter's type.
    """
    if not isinstance(value, str):
        return value
    decoder: Callable[[str], Any] | None = None
    if name in _JSON_PARAMS:
        decoder = json.loads
    elif name in _INT_PARAMS or (name == "chat_id" and re.fullmatch(r"-?\d+", value)):
        decoder = int
    elif name in _FLOAT_PARAMS:
        decoder = float
    elif name in _BOOL_PARAMS:
        decoder = _decode_bool
    if decoder is None:
        return value
    try:
        return decoder(value)
    except ValueError:
        raise _bad_request(f"can't parse {name} parameter {value!r}") from None


def _decode_bool(value: str) -> bool:
    return value.lower() in {"true", "1"}


async def _read_request(request: web.Request) -> tuple[dict[str, Any], dict[str, UploadedFile]]:
    """Query, form-urlencoded, multipart or JSON parameters of one call, and its file parts.

    Raises:
        BotApiError: 400 for a body that cannot be parsed.
    """
    raw: dict[str, Any] = dict(request.query)
    files: dict[str, UploadedFile] = {}
    try:
        if request.content_type == "application/json":
            body = await request.json() if request.can_read_body else {}
            if not isinstance(body, dict):
                raise _bad_request("JSON body must be an object")
            raw.update(body)
        elif request.content_type == "multipart/form-data":
            reader = await request.multipart()
            uploaded_bytes = 0
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    continue
                if part.filename is None:
                    raw[part.name] = await part.text()
                else:
                    data = bytes(await part.read(decode=True))
                    uploaded_bytes += len(data)
                    if uploaded_bytes > _MAX_UPLOAD_BYTES:
                        raise BotApiError(
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "Request Entity Too Large"
                        )
                    files[part.name] = UploadedFile(
                        field_name=part.name,
                        filename=part.filename,
                        content_type=part.headers.get("Content-Type"),
                        data=data,
                    )
        elif request.content_type == "application/x-www-form-urlencoded":
            raw.update(dict((await request.post()).items()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_request(f"can't parse request body: {exc}") from None
    return {name: _decode_param(name, value) for name, value in raw.items()}, files


@dataclass
class _FloodRule:
    retry_after: int
    remaining: int | None  # None: applies to a random share of calls, forever
    share: float = 1.0
    chooser: random.Random = field(default_factory=random.Random)

    def fires(self) -> bool:
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True
        return self.chooser.random() < self.share


@dataclass(frozen=True)
class _Handled:
    """What a method implementation produced: its result and the messages it posted."""

    result: Any
    messages: tuple[tuple[int, JsonDict], ...] = ()
    chat_action: tuple[int, str] | None = None


_MethodImplementation = Callable[[Mapping[str, Any], Mapping[str, UploadedFile]], _Handled]


@dataclass(frozen=True)
class _Update:
    update_id: int
    kind: str
    payload: JsonDict

    def to_api(self) -> JsonDict:
        return {"update_id": self.update_id, self.kind: self.payload}


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


class TelegramEmulator:
    """An HTTP server on 127.0.0.1 that answers Bot API calls like Telegram does.

    Use as ``async with TelegramEmulator() as emu:`` or ``await emu.start()`` /
    ``await emu.stop()``. All methods must be called from the event loop that started it.
    """

    def __init__(
        self,
        *,
        bot_username: str = "imgsearch_test_bot",
        bot_first_name: str = "Image Search",
        bot_id: int = 7_000_000_001,
        latency_s: float = 0.0,
        first_update_id: int = 500_000_001,
        group_privacy: bool = True,
    ) -> None:
        """Configure the emulated bot account; nothing listens until :meth:`start`.

        ``group_privacy`` is BotFather's privacy mode, on by default as in Telegram: in groups
        where the bot is not an administrator it only receives commands (bare or addressed to
        it, not those addressed to other bots), mentions of it and replies to its messages.
        Telegram's extra condition on bare commands (the bot spoke last) is not emulated.
        ``latency_s`` delays every API answer, for benchmarks.

        Raises:
            ValueError: for a bot username Telegram would refuse (bots' end in "bot").
        """
        if not _USERNAME_SHAPE.match(bot_username) or not bot_username.lower().endswith("bot"):
            raise ValueError(f"{bot_username!r} is not a valid bot username")
        self.bot_user = EmulatedUser(
            id=bot_id, first_name=bot_first_name, username=bot_username, is_bot=True
        )
        self.token = f"{bot_id}:AAE{_short_hash('token', bot_id, size=24)}"
        self.latency_s = latency_s
        self.group_privacy = group_privacy
        self.calls: list[BotCall] = []
        self.outbox: list[BotOutput] = []
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._stopping = False
        self._users: dict[int, EmulatedUser] = {bot_id: self.bot_user}
        self._chats: dict[int, EmulatedChat] = {}
        self._members: dict[int, dict[int, MemberStatus]] = {}
        self._blocked_by: set[int] = set()
        self._messages: dict[tuple[int, int], JsonDict] = {}
        self._last_message_id: dict[int, int] = {}
        self._next_user_id = 100_000_001
        self._next_group_id = 4_000_000_001
        self._next_media_group_id = 13_000_000_000_000_001
        self._updates: list[_Update] = []
        self._next_update_id = first_update_id
        self._allowed_updates: list[str] = []
        self._updates_arrived = asyncio.Event()
        self._poll_generation = 0
        self._waiting_polls = 0
        self._long_poll_waiting = asyncio.Event()
        self._call_recorded = asyncio.Condition()
        self._read_cursor: dict[int, int] = {}
        self._files_by_id: dict[str, _StoredFile] = {}
        self._files_by_path: dict[str, _StoredFile] = {}
        self._files_by_unique_id: dict[str, _StoredFile] = {}
        self._photo_sets: dict[str, tuple[_StoredFile, ...]] = {}
        self._file_counter = 0
        self._commands: dict[tuple[str, str], list[JsonDict]] = {}
        self._flood_rules: dict[str, _FloodRule] = {}
        self._admin_rights: dict[tuple[int, int], JsonDict] = {}
        self._callback_queries: dict[str, JsonDict] = {}
        self._next_callback_id = 88_000_000_001
        self._next_channel_id = 2_000_000_001
        self.reactions: dict[tuple[int, int], list[JsonDict]] = {}
        self.deleted: set[tuple[int, int]] = set()
        self.callback_answers: dict[str, JsonDict] = {}
        # Added to the clock of messages users send: a test posts "days ago" with it.
        self.clock_offset_s = 0
        implementations: dict[str, _MethodImplementation] = {
            "getMe": self._get_me,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "sendMessage": self._send_message,
            "sendPhoto": self._send_photo,
            "sendDocument": self._send_document,
            "sendVideo": self._send_video,
            "sendAnimation": self._send_animation,
            "sendMediaGroup": self._send_media_group,
            "sendChatAction": self._send_chat_action,
            "setMyCommands": self._set_my_commands,
            "getMyCommands": self._get_my_commands,
            "deleteMyCommands": self._delete_my_commands,
            "getChatMember": self._get_chat_member,
            "getFile": self._get_file,
            "answerCallbackQuery": self._answer_callback_query,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "editMessageText": self._edit_message_text,
            "deleteMessage": self._delete_message,
            "deleteMessages": self._delete_messages,
            "setMessageReaction": self._set_message_reaction,
        }
        self._methods = implementations
        # getUpdates is answered apart because it awaits (long polling).
        self._canonical_names = {name.lower(): name for name in [*implementations, "getUpdates"]}

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, port: int = 0) -> None:
        """Listen on ``port`` of 127.0.0.1 (0: an ephemeral one).

        A given port lets a test start a bot first, against nothing, then bring "Telegram" up.

        Raises:
            RuntimeError: if already started.
        """
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        app = web.Application(client_max_size=_MAX_REQUEST_BYTES)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_api_request)
        app.router.add_route("GET", "/file/bot{token}/{file_path:.+}", self._handle_download)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        host, port = runner.addresses[0][:2]
        self._runner = runner
        self._url = f"http://{host}:{port}"
        self._stopping = False

    async def stop(self) -> None:
        """Answer pending long polls with no updates and close the server. Idempotent."""
        if self._runner is None:
            return
        self._stopping = True
        self._wake_pollers()
        await self._runner.cleanup()
        self._runner = None
        self._url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` of the running server.

        Raises:
            RuntimeError: if the emulator is not running.
        """
        if self._url is None:
            raise RuntimeError("the emulator is not running; await start() first")
        return self._url

    @property
    def api_base_url(self) -> str:
        """Value for PTB's ``base_url`` (the token is appended by PTB)."""
        return f"{self.url}/bot"

    @property
    def file_base_url(self) -> str:
        """Value for PTB's ``base_file_url`` (the token is appended by PTB)."""
        return f"{self.url}/file/bot"

    # ---- scenario set-up ---------------------------------------------------------------------

    def create_user(
        self,
        first_name: str,
        username: str | None = None,
        *,
        user_id: int | None = None,
        last_name: str | None = None,
        language_code: str | None = "en",
    ) -> EmulatedUser:
        """Register a person who can talk to the bot.

        Raises:
            ValueError: if the id is taken or the username is not a valid Telegram username.
        """
        if username is not None and not _USERNAME_SHAPE.match(username):
            raise ValueError(f"{username!r} is not a valid Telegram username")
        if user_id is None:
            user_id = self._next_user_id
            self._next_user_id += 1
        if user_id in self._users:
            raise ValueError(f"user id {user_id} is already taken")
        user = EmulatedUser(
            id=user_id,
            first_name=first_name,
            username=username,
            last_name=last_name,
            language_code=language_code,
        )
        self._users[user_id] = user
        return user

    def private_chat(self, user: EmulatedUser) -> EmulatedChat:
        """The user's private chat with the bot (its id is the user's id), created on first use.

        Raises:
            ValueError: for a user this emulator did not create.
        """
        self._require_user(user)
        existing = self._chats.get(user.id)
        if existing is not None:
            return existing
        chat = EmulatedChat(
            id=user.id,
            type="private",
            username=user.username,
            first_name=user.first_name,
            last_name=user.last_name,
        )
        self._chats[chat.id] = chat
        self._members[chat.id] = {user.id: "member", self.bot_user.id: "member"}
        return chat

    def create_group(
        self,
        title: str,
        members: Iterable[EmulatedUser] = (),
        *,
        chat_type: Literal["group", "supergroup"] = "group",
        username: str | None = None,
        is_forum: bool = False,
        earlier_messages: int = 0,
    ) -> EmulatedChat:
        """A group with the bot and ``members`` in it, all with status "member".

        Ids follow Telegram's conventions: negative for groups, -100... for supergroups.
        ``earlier_messages`` were posted before the bot joined (an exported history): the
        first message it sees has the id after theirs.

        Raises:
            ValueError: for an unknown member, or forum/username on a basic group.
        """
        if chat_type == "group" and (is_forum or username is not None):
            raise ValueError("only supergroups can be forums or have a public username")
        number = self._next_group_id
        self._next_group_id += 1
        chat_id = -(1_000_000_000_000 + number) if chat_type == "supergroup" else -number
        chat = EmulatedChat(
            id=chat_id, type=chat_type, title=title, username=username, is_forum=is_forum
        )
        statuses: dict[int, MemberStatus] = {self.bot_user.id: "member"}
        for member in members:
            self._require_user(member)
            statuses[member.id] = "member"
        self._chats[chat_id] = chat
        self._members[chat_id] = statuses
        if earlier_messages:
            self._last_message_id[chat_id] = earlier_messages
        return chat

    def set_member_status(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        status: MemberStatus,
        *,
        can_delete_messages: bool = True,
    ) -> None:
        """Set what getChatMember reports for ``user`` (or ``emu.bot_user``) in a group.

        A bot whose status is "left" or "kicked" cannot post there (403, as in Telegram).
        An administrator has every right, or all but "Delete messages".

        Raises:
            ValueError: for a private chat, or an unknown chat or user.
        """
        self._require_chat(chat)
        self._require_user(user)
        if chat.type == "private":
            raise ValueError("membership of a private chat cannot change")
        self._members[chat.id][user.id] = status
        self._admin_rights[(chat.id, user.id)] = {"can_delete_messages": can_delete_messages}

    def create_channel(self, title: str, *, username: str | None = None) -> EmulatedChat:
        """A channel (ids are -100..., like supergroups'); its posts reach the bot only through
        a linked discussion group (:meth:`channel_post_arrives`)."""
        number = self._next_channel_id
        self._next_channel_id += 1
        chat = EmulatedChat(
            id=-(1_000_000_000_000 + number), type="channel", title=title, username=username
        )
        self._chats[chat.id] = chat
        self._members[chat.id] = {}
        return chat

    def block_bot(self, user: EmulatedUser) -> None:
        """The user blocks the bot: sending to their private chat then answers 403."""
        self._require_user(user)
        self._blocked_by.add(user.id)

    # ---- what users do -----------------------------------------------------------------------

    def user_sends_text(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        text: str,
        *,
        reply_to: Mapping[str, Any] | int | None = None,
        message_thread_id: int | None = None,
    ) -> JsonDict:
        """The user posts text; commands, mentions and URLs get entities as a client adds them.

        Returns the Message and queues an Update for it.

        Raises:
            ValueError: for empty text, an unknown chat or user, a user who is not in the chat,
                or a ``reply_to`` message that does not exist in the chat.
        """
        if not text:
            raise ValueError("a text message needs text")
        content: JsonDict = {"text": text}
        entities = detect_entities(text)
        if entities:
            content["entities"] = entities
        return self._user_message(chat, user, content, reply_to, message_thread_id)

    def user_sends_photo(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        image: bytes,
        *,
        caption: str | None = None,
        reply_to: Mapping[str, Any] | int | None = None,
        message_thread_id: int | None = None,
    ) -> JsonDict:
        """The user posts a photo, offered to the bot in several sizes, the original last.

        The original bytes are what getFile of the largest size downloads.

        Raises:
            ValueError: if ``image`` is not a decodable image, and as :meth:`user_sends_text`.
        """
        content = {"photo": self._store_photo(image)}
        content.update(self._user_caption(caption))
        return self._user_message(chat, user, content, reply_to, message_thread_id)

    def user_forwards_photo(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        image: bytes,
        *,
        original_sender: EmulatedUser,
        original_date: int | None = None,
    ) -> JsonDict:
        """The user forwards a photo first sent by ``original_sender`` elsewhere
        (``forward_origin`` of type "user").

        Raises:
            ValueError: as :meth:`user_sends_photo`.
        """
        content: JsonDict = {
            "forward_origin": {
                "type": "user",
                "date": original_date if original_date is not None else self._now() - 3600,
                "sender_user": original_sender.to_api(),
            },
            "photo": self._store_photo(image),
        }
        return self._user_message(chat, user, content, None, None)

    def channel_post_arrives(
        self, group: EmulatedChat, channel: EmulatedChat, image: bytes, *, post_id: int = 1
    ) -> JsonDict:
        """A photo posted in ``channel`` arrives in its linked discussion group ``group``, as
        Telegram forwards it there: from the service account, ``sender_chat`` the channel,
        ``is_automatic_forward``. Privacy mode does not hide these from the bot.

        Raises:
            ValueError: for an unknown chat, or a ``channel`` that is not a channel.
        """
        self._require_chat(group)
        self._require_chat(channel)
        if channel.type != "channel":
            raise ValueError(f"chat {channel.id} is not a channel")
        message: JsonDict = {
            "message_id": self._next_message_id(group.id),
            "from": dict(_TELEGRAM_SERVICE_USER),
            "sender_chat": channel.to_api(),
            "chat": group.to_api(),
            "date": self._now(),
            "forward_origin": {
                "type": "channel",
                "date": self._now(),
                "chat": channel.to_api(),
                "message_id": post_id,
            },
            "is_automatic_forward": True,
            "photo": self._store_photo(image),
        }
        self._messages[(group.id, message["message_id"])] = message
        if self._bot_receives(group, message):
            self._queue_update("message", message)
        return message

    def user_edits_photo(
        self, chat: EmulatedChat, user: EmulatedUser, message: Mapping[str, Any], image: bytes
    ) -> JsonDict:
        """The user replaces the photo of their message (editMessageMedia in a client): an
        ``edited_message`` update with the new photo and an ``edit_date``.

        Raises:
            ValueError: for a message that is not the user's, or not in the chat.
        """
        stored = self._find_message(chat.id, int(message["message_id"]))
        if stored is None or stored.get("from", {}).get("id") != user.id:
            raise ValueError(f"message {message['message_id']} is not {user.id}'s in {chat.id}")
        edited = {**stored, "photo": self._store_photo(image), "edit_date": self._now()}
        self._messages[(chat.id, int(edited["message_id"]))] = edited
        if self._bot_receives(chat, edited):
            self._queue_update("edited_message", edited)
        return edited

    def user_presses_button(
        self, chat: EmulatedChat, user: EmulatedUser, message: SentMessage, callback_data: str
    ) -> str:
        """The user presses an inline button of one of the bot's messages; returns the
        callback query's id (see ``callback_answers``).

        Raises:
            ValueError: if the message has no button with that callback data, or was deleted.
        """
        self._require_user(user)
        current = self._find_message(chat.id, message.message_id)
        if current is None:
            raise ValueError(f"message {message.message_id} in {chat.id} was deleted")
        buttons = [
            button
            for row in current.get("reply_markup", {}).get("inline_keyboard", [])
            for button in row
        ]
        if not any(button.get("callback_data") == callback_data for button in buttons):
            raise ValueError(f"message {message.message_id} has no button {callback_data!r}")
        query_id = str(self._next_callback_id)
        self._next_callback_id += 1
        query: JsonDict = {
            "id": query_id,
            "from": user.to_api(),
            "message": current,
            "chat_instance": _short_hash("chat_instance", chat.id),
            "data": callback_data,
        }
        self._callback_queries[query_id] = query
        self._queue_update("callback_query", query)
        return query_id

    def current_message(self, chat: EmulatedChat, message_id: int) -> JsonDict | None:
        """A message as it is now (edits applied), or None once deleted."""
        return self._find_message(chat.id, message_id)

    def user_sends_album(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        images: Sequence[bytes],
        *,
        caption: str | None = None,
    ) -> list[JsonDict]:
        """The user posts 2-10 photos as one album: one message and one update per photo,
        sharing a ``media_group_id``, the caption on the first.

        Raises:
            ValueError: for a wrong number of images, and as :meth:`user_sends_photo`.
        """
        if not MIN_ALBUM_ITEMS <= len(images) <= MAX_ALBUM_ITEMS:
            raise ValueError(f"an album holds 2-10 photos, not {len(images)}")
        media_group_id = self._new_media_group_id()
        photos = [self._store_photo(image) for image in images]
        sent: list[JsonDict] = []
        for position, photo in enumerate(photos):
            content: JsonDict = {"media_group_id": media_group_id, "photo": photo}
            if position == 0:
                content.update(self._user_caption(caption))
            sent.append(self._user_message(chat, user, content, None, None))
        return sent

    def user_sends_document(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        data: bytes,
        *,
        file_name: str,
        mime_type: str,
        caption: str | None = None,
        reply_to: Mapping[str, Any] | int | None = None,
    ) -> JsonDict:
        """The user posts a file as a document (e.g. an uncompressed photo).

        Raises:
            ValueError: as :meth:`user_sends_text`.
        """
        stored = self._store_file(
            data,
            folder="documents",
            suffix=_suffix(file_name),
            file_name=file_name,
            mime_type=mime_type,
        )
        content: JsonDict = {"document": self._document_api(stored, self._mint_file_id("BQAC"))}
        content.update(self._user_caption(caption))
        return self._user_message(chat, user, content, reply_to, None)

    def user_sends_video(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        data: bytes,
        *,
        caption: str | None = None,
        reply_to: Mapping[str, Any] | int | None = None,
    ) -> JsonDict:
        """The user posts a video (an MP4, as Telegram clients send them)."""
        stored = self._store_moving(data, kind="video", file_name="video.mp4")
        content: JsonDict = {"video": self._media_api(stored, self._mint_file_id("BAAC"))}
        content.update(self._user_caption(caption))
        return self._user_message(chat, user, content, reply_to, None)

    def user_sends_animation(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        data: bytes,
        *,
        caption: str | None = None,
        reply_to: Mapping[str, Any] | int | None = None,
    ) -> JsonDict:
        """The user posts a GIF, which Telegram turns into a silent MP4 "animation". As in
        the Bot API, the message carries it twice: as ``animation`` and, for backward
        compatibility, as ``document``."""
        stored = self._store_moving(data, kind="animation", file_name="animation.gif.mp4")
        file_id = self._mint_file_id("CgAC")
        content: JsonDict = {
            "animation": self._media_api(stored, file_id),
            "document": self._document_api(stored, file_id),
        }
        content.update(self._user_caption(caption))
        return self._user_message(chat, user, content, reply_to, None)

    def user_sends_video_note(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        data: bytes,
        *,
        reply_to: Mapping[str, Any] | int | None = None,
    ) -> JsonDict:
        """The user posts a video note (a round video message: square, no caption)."""
        stored = self._store_moving(data, kind="video_note", file_name=None)
        file_id = self._mint_file_id("DQAC")
        self._files_by_id[file_id] = stored
        note: JsonDict = {
            "file_id": file_id,
            "file_unique_id": stored.file_unique_id,
            "length": stored.width or 0,
            "duration": stored.duration or 0,
            "file_size": stored.file_size,
        }
        return self._user_message(chat, user, {"video_note": note}, reply_to, None)

    def user_sends_sticker(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        data: bytes,
        *,
        kind: Literal["static", "video", "animated"],
        emoji: str = "🙂",
        reply_to: Mapping[str, Any] | int | None = None,
    ) -> JsonDict:
        """The user posts a sticker: a still WebP, a video WebM, or an animated (Lottie, .tgs)
        one; stickers carry no caption."""
        if kind == "static":
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            stored = self._store_file(
                data, folder="stickers", suffix=".webp", kind="sticker",
                width=width, height=height,
            )
        elif kind == "video":
            stored = self._store_moving(data, kind="sticker", file_name=None, suffix=".webm")
        else:
            stored = self._store_file(
                data, folder="stickers", suffix=".tgs", kind="sticker", width=512, height=512
            )
        file_id = self._mint_file_id("CAAC")
        self._files_by_id[file_id] = stored
        sticker: JsonDict = {
            "file_id": file_id,
            "file_unique_id": stored.file_unique_id,
            "type": "regular",
            "width": stored.width or 0,
            "height": stored.height or 0,
            "is_animated": kind == "animated",
            "is_video": kind == "video",
            "emoji": emoji,
            "file_size": stored.file_size,
        }
        return self._user_message(chat, user, {"sticker": sticker}, reply_to, None)

    def user_sends_oversized_document(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        *,
        file_size: int,
        file_name: str,
        mime_type: str,
    ) -> JsonDict:
        """The user posts a document of ``file_size`` bytes without the bytes existing:
        Telegram accepts such files from users, but getFile refuses them to bots above 20 MB.

        Raises:
            ValueError: if ``file_size`` is within the getFile limit (use
                :meth:`user_sends_document` then), and as :meth:`user_sends_text`.
        """
        if file_size <= GET_FILE_LIMIT_BYTES:
            raise ValueError("an oversized document must exceed the 20 MB getFile limit")
        self._file_counter += 1
        stored = _StoredFile(
            file_unique_id=f"AgAD{_short_hash('declared', self._file_counter)}",
            file_path=f"documents/file_{self._file_counter}{_suffix(file_name)}",
            file_size=file_size,
            data=None,
            file_name=file_name,
            mime_type=mime_type,
        )
        self._files_by_path[stored.file_path] = stored
        content = {"document": self._document_api(stored, self._mint_file_id("BQAC"))}
        return self._user_message(chat, user, content, None, None)

    # ---- flood control and latency -----------------------------------------------------------

    def flood_next_calls(self, method: str, count: int, *, retry_after: int = 1) -> None:
        """Answer the next ``count`` calls of ``method`` with 429 ``retry_after``.

        Raises:
            ValueError: for an unknown method, a negative count or retry_after below 1 (PTB
                reads ``retry_after`` 0 as no flood control at all).
        """
        if count < 0:
            raise ValueError("count must not be negative")
        self._flood_rules[self._canonical(method)] = _FloodRule(
            retry_after=_checked_retry_after(retry_after), remaining=count
        )

    def flood_random_share(
        self, method: str, share: float, *, retry_after: int = 1, seed: int = 0
    ) -> None:
        """Answer a seeded random ``share`` (0..1) of calls of ``method`` with 429.

        Raises:
            ValueError: for an unknown method, a share outside 0..1 or retry_after below 1.
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError("share must be between 0 and 1")
        self._flood_rules[self._canonical(method)] = _FloodRule(
            retry_after=_checked_retry_after(retry_after),
            remaining=None,
            share=share,
            chooser=random.Random(seed),
        )

    def stop_flooding(self, method: str) -> None:
        """Answer ``method`` normally again."""
        self._flood_rules.pop(self._canonical(method), None)

    # ---- what the bot did --------------------------------------------------------------------

    def calls_of(self, method: str) -> list[BotCall]:
        """Recorded calls of one method (case-insensitive name), in answer order."""
        wanted = method.lower()
        return [call for call in self.calls if call.method.lower() == wanted]

    def messages_sent(self, chat: EmulatedChat | int | None = None) -> list[SentMessage]:
        """Messages the bot posted, in order, optionally only those in one chat."""
        chat_id = chat.id if isinstance(chat, EmulatedChat) else chat
        return [
            output
            for output in self.outbox
            if isinstance(output, SentMessage) and chat_id in (None, output.chat_id)
        ]

    def chat_actions(self, chat: EmulatedChat | int | None = None) -> list[SentChatAction]:
        """Chat actions the bot broadcast, in order, optionally only those in one chat."""
        chat_id = chat.id if isinstance(chat, EmulatedChat) else chat
        return [
            output
            for output in self.outbox
            if isinstance(output, SentChatAction) and chat_id in (None, output.chat_id)
        ]

    def file_bytes(self, file_id: str) -> bytes:
        """The content behind a file_id, whoever uploaded it.

        Raises:
            KeyError: for an unknown file_id.
            ValueError: for a file registered only by its declared size.
        """
        stored = self._files_by_id[file_id]
        if stored.data is None:
            raise ValueError(f"file {file_id} was registered by size only and has no bytes")
        return stored.data

    def bot_commands(self, language_code: str = "", scope_type: str = "default") -> list[JsonDict]:
        """The commands the bot set for a language and a scope type ("default", ...)."""
        return list(self._commands.get((scope_type, language_code), []))

    @property
    def long_poll_pending(self) -> bool:
        """Whether a getUpdates call is waiting for updates right now."""
        return self._waiting_polls > 0

    async def wait_for_long_poll(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until a getUpdates call is parked waiting for updates.

        Raises:
            TimeoutError: if no long poll is waiting within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._long_poll_waiting.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no getUpdates long poll started within {timeout}s") from None

    @property
    def pending_update_count(self) -> int:
        """Updates not yet confirmed by the bot through getUpdates' offset."""
        return len(self._updates)

    async def wait_for(
        self,
        predicate: Callable[[Sequence[BotCall]], bool],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the TimeoutError it raises lists the calls
    ) -> list[BotCall]:
        """Wait until ``predicate(calls)`` holds, checking after every recorded call.

        Returns a snapshot of the calls at that moment.

        Raises:
            TimeoutError: if it does not hold within ``timeout`` seconds; the message lists
                the calls recorded so far.
        """
        async with self._call_recorded:
            try:
                await asyncio.wait_for(
                    self._call_recorded.wait_for(lambda: predicate(self.calls)), timeout
                )
            except TimeoutError:
                raise TimeoutError(
                    f"condition not met within {timeout}s; calls so far: {self._call_summary()}"
                ) from None
            return list(self.calls)

    async def wait_for_messages(
        self,
        chat: EmulatedChat | int,
        count: int = 1,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the TimeoutError it raises lists the texts
    ) -> list[SentMessage]:
        """The next ``count`` messages the bot posts to a chat, as the user would read them.

        Each chat has a read cursor: a message returned here is not returned again, so a
        scenario reads replies turn by turn. Messages already posted and not yet read count.

        Raises:
            TimeoutError: if fewer than ``count`` unread messages arrive within ``timeout``.
        """
        chat_id = chat.id if isinstance(chat, EmulatedChat) else chat
        cursor = self._read_cursor.get(chat_id, 0)

        def enough(_: Sequence[BotCall]) -> bool:
            return len(self.messages_sent(chat_id)) >= cursor + count

        try:
            await self.wait_for(enough, timeout=timeout)
        except TimeoutError as exc:
            unread = self.messages_sent(chat_id)[cursor:]
            raise TimeoutError(
                f"expected {count} new message(s) in chat {chat_id}, got {len(unread)}: "
                f"{[message.text for message in unread]}; {exc}"
            ) from None
        self._read_cursor[chat_id] = cursor + count
        return self.messages_sent(chat_id)[cursor : cursor + count]

    # ---- HTTP --------------------------------------------------------------------------------

    async def _handle_api_request(self, request: web.Request) -> web.Response:
        received_at = time.monotonic()
        method_name = request.match_info["method"]
        params: Mapping[str, Any] = {}
        files: Mapping[str, UploadedFile] = {}
        try:
            self._check_token(request.match_info["token"])
            params, files = await _read_request(request)
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
            method_name = self._canonical_names.get(method_name.lower(), method_name)
            handled = await self._answer(method_name, params, files)
        except BotApiError as refusal:
            await self._record(
                BotCall(
                    method=method_name,
                    params=params,
                    files=files,
                    chat_id=params.get("chat_id"),
                    received_at=received_at,
                    http_status=refusal.http_status,
                    description=refusal.description,
                )
            )
            return web.json_response(refusal.to_api(), status=refusal.http_status)
        call = BotCall(
            method=method_name,
            params=params,
            files=files,
            chat_id=params.get("chat_id"),
            received_at=received_at,
            http_status=HTTPStatus.OK,
            result=handled.result,
        )
        for chat_id, message in handled.messages:
            self.outbox.append(SentMessage(chat_id=chat_id, message=message, call=call))
        if handled.chat_action is not None:
            chat_id, action = handled.chat_action
            self.outbox.append(SentChatAction(chat_id=chat_id, action=action, call=call))
        await self._record(call)
        return web.json_response({"ok": True, "result": handled.result})

    async def _answer(
        self, method: str, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        """Run one method, after the flood-control check that may refuse it unperformed.

        Raises:
            BotApiError: 404 for an unknown method, 429 under flood control, or the method's own
                refusal.
        """
        if method not in self._canonical_names.values():
            raise BotApiError(HTTPStatus.NOT_FOUND, "Not Found")
        rule = self._flood_rules.get(method)
        if rule is not None and rule.fires():
            raise BotApiError(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"Too Many Requests: retry after {rule.retry_after}",
                {"retry_after": rule.retry_after},
            )
        if method == "getUpdates":
            return _Handled(await self._get_updates(params))
        return self._methods[method](params, files)

    async def _handle_download(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_token(request.match_info["token"])
        except BotApiError as refusal:
            return web.json_response(refusal.to_api(), status=refusal.http_status)
        stored = self._files_by_path.get(request.match_info["file_path"])
        if stored is None or stored.data is None:
            missing = BotApiError(HTTPStatus.NOT_FOUND, "Not Found")
            return web.json_response(missing.to_api(), status=missing.http_status)
        content_type = stored.mime_type or "image/jpeg"
        return web.Response(body=stored.data, content_type=content_type)

    def _check_token(self, token: str) -> None:
        if token == self.token:
            return
        # Telegram answers 404 to a malformed token and 401 to a well-formed but wrong one.
        if _TOKEN_SHAPE.match(token):
            raise BotApiError(HTTPStatus.UNAUTHORIZED, "Unauthorized")
        raise BotApiError(HTTPStatus.NOT_FOUND, "Not Found")

    async def _record(self, call: BotCall) -> None:
        self.calls.append(call)
        async with self._call_recorded:
            self._call_recorded.notify_all()

    def _call_summary(self) -> str:
        summary = ", ".join(
            f"{call.method}({call.http_status})"
            for call in self.calls
            if call.method != "getUpdates"
        )
        return summary or "none besides getUpdates"

    # ---- methods -----------------------------------------------------------------------------

    def _get_me(self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]) -> _Handled:
        me = self.bot_user.to_api()
        me.update(
            {
                "can_join_groups": True,
                "can_read_all_group_messages": not self.group_privacy,
                "supports_inline_queries": False,
                "can_connect_to_business": False,
                "has_main_web_app": False,
            }
        )
        return _Handled(me)

    def _delete_webhook(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return _Handled(True)

    def _get_webhook_info(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        info = {"url": "", "has_custom_certificate": False}
        info["pending_update_count"] = len(self._updates)
        return _Handled(info)

    async def _get_updates(self, params: Mapping[str, Any]) -> list[JsonDict]:
        offset = int(params.get("offset", 0))
        limit = min(max(int(params.get("limit", 100)), 1), 100)
        timeout = max(float(params.get("timeout", 0)), 0.0)
        if "allowed_updates" in params:
            self._allowed_updates = list(params["allowed_updates"] or [])
        if offset > 0:
            self._updates = [update for update in self._updates if update.update_id >= offset]
        elif offset < 0:
            self._updates = self._updates[offset:]
        # A newer getUpdates terminates this one, as on the real server.
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake_pollers()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if generation != self._poll_generation:
                raise BotApiError(
                    HTTPStatus.CONFLICT,
                    "Conflict: terminated by other getUpdates request; make sure that only "
                    "one bot instance is running",
                )
            self._updates = [u for u in self._updates if self._is_allowed(u.kind)]
            remaining = deadline - asyncio.get_running_loop().time()
            if self._updates or remaining <= 0 or self._stopping:
                return [update.to_api() for update in self._updates[:limit]]
            arrived = self._updates_arrived
            self._waiting_polls += 1
            self._long_poll_waiting.set()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), remaining)
            finally:
                self._waiting_polls -= 1
                if self._waiting_polls == 0:
                    self._long_poll_waiting.clear()

    def _send_message(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._target_chat(params)
        raw_text = params.get("text")
        if not raw_text:
            raise _bad_request("message text is empty")
        text, entities = self._formatted(str(raw_text), params, "entities")
        if not text:
            raise _bad_request("message text is empty")
        if utf16_length(text) > MAX_TEXT_LENGTH:
            raise _bad_request("message is too long")
        content: JsonDict = {"text": text}
        if entities:
            content["entities"] = entities
        return self._bot_posts(chat, params, [content])

    def _send_photo(self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]) -> _Handled:
        chat = self._target_chat(params)
        photo = self._resolve_photo(params.get("photo"), files, "photo")
        content: JsonDict = {"photo": photo}
        content.update(self._bot_caption(params))
        return self._bot_posts(chat, params, [content])

    def _send_document(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._target_chat(params)
        document = self._resolve_document(params.get("document"), files, "document")
        content: JsonDict = {"document": document}
        content.update(self._bot_caption(params))
        return self._bot_posts(chat, params, [content])

    def _send_video(self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]) -> _Handled:
        chat = self._target_chat(params)
        content: JsonDict = {"video": self._resolve_moving(params.get("video"), files, "video")}
        content.update(self._bot_caption(params))
        return self._bot_posts(chat, params, [content])

    def _send_animation(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._target_chat(params)
        animation = self._resolve_moving(params.get("animation"), files, "animation")
        # As for users' animations, the document field repeats it (backward compatibility).
        document = {
            key: animation[key]
            for key in ("file_name", "mime_type", "file_id", "file_unique_id", "file_size")
            if key in animation
        }
        content: JsonDict = {"animation": animation, "document": document}
        content.update(self._bot_caption(params))
        return self._bot_posts(chat, params, [content])

    def _send_media_group(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._target_chat(params)
        media = params.get("media")
        if media is None:
            raise _bad_request('parameter "media" is required')
        if not isinstance(media, list):
            raise _bad_request("can't parse media JSON object")
        if not media:
            raise _bad_request("there are no messages to send")
        if len(media) > MAX_ALBUM_ITEMS:
            raise _bad_request("too many messages to send as an album")
        if len(media) < MIN_ALBUM_ITEMS:
            # The documented contract is 2-10 items; the emulator holds bots to it.
            raise _bad_request(f"wrong number of messages to send as an album: {len(media)}")
        _check_album_kinds({item.get("type") if isinstance(item, dict) else None for item in media})
        contents: list[JsonDict] = []
        for item in media:
            if not item.get("media"):
                raise _bad_request("can't parse InputMedia: media not found")
            content: JsonDict = {}
            if item["type"] == "photo":
                content["photo"] = self._resolve_photo(item["media"], files, "media")
            elif item["type"] == "video":
                content["video"] = self._resolve_moving(item["media"], files, "media")
            else:
                content["document"] = self._resolve_document(item["media"], files, "media")
            content.update(self._bot_caption(item))
            contents.append(content)
        media_group_id = self._new_media_group_id()
        for content in contents:
            content["media_group_id"] = media_group_id
        return self._bot_posts(chat, params, contents, as_list=True)

    def _send_chat_action(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._target_chat(params)
        action = params.get("action")
        if action not in _CHAT_ACTIONS:
            raise _bad_request("wrong parameter action in request")
        return _Handled(True, chat_action=(chat.id, str(action)))

    def _set_my_commands(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _bad_request("can't parse commands JSON object")
        if len(commands) > 100:
            raise _bad_request("too many commands")
        for command in commands:
            if not isinstance(command, dict):
                raise _bad_request("can't parse BotCommand")
            name = str(command.get("command", ""))
            description = str(command.get("description", ""))
            if not _BOT_COMMAND_NAME.match(name):
                raise _bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(description) <= 256:
                raise _bad_request("BOT_COMMAND_DESCRIPTION_INVALID")
        stored = [
            {"command": str(command["command"]), "description": str(command["description"])}
            for command in commands
        ]
        self._commands[self._commands_key(params)] = stored
        return _Handled(True)

    def _get_my_commands(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        return _Handled(list(self._commands.get(self._commands_key(params), [])))

    def _delete_my_commands(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        self._commands.pop(self._commands_key(params), None)
        return _Handled(True)

    def _get_chat_member(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._known_chat(params.get("chat_id"))
        if "user_id" not in params:
            raise _bad_request("user_id is empty")
        user = self._users.get(int(params["user_id"]))
        if user is None:
            raise _bad_request("user not found")
        status = self._members[chat.id].get(user.id, "left")
        member = _chat_member_api(user, status)
        if status == "administrator":
            member.update(self._admin_rights.get((chat.id, user.id), {}))
        return _Handled(member)

    def _answer_callback_query(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        query_id = str(params.get("callback_query_id") or "")
        # Telegram accepts one answer per query.
        if query_id not in self._callback_queries or query_id in self.callback_answers:
            raise _bad_request(
                "query is too old and response timeout expired or query ID is invalid"
            )
        text = params.get("text")
        if text is not None and len(str(text)) > 200:
            raise _bad_request("MESSAGE_TOO_LONG")
        self.callback_answers[query_id] = {
            "text": text,
            "show_alert": bool(params.get("show_alert", False)),
        }
        return _Handled(True)

    def _editable_bot_message(self, params: Mapping[str, Any]) -> JsonDict:
        if params.get("inline_message_id"):
            raise _bad_request("inline messages are not emulated")
        chat = self._known_chat(params.get("chat_id"))
        message = self._find_message(chat.id, int(params.get("message_id") or 0))
        if message is None:
            raise _bad_request("message to edit not found")
        if message["from"]["id"] != self.bot_user.id:
            raise _bad_request("message can't be edited")
        return message

    def _edit_message_reply_markup(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        message = self._editable_bot_message(params)
        markup = params.get("reply_markup")
        new_markup = markup if isinstance(markup, dict) and markup.get("inline_keyboard") else None
        if new_markup == message.get("reply_markup"):
            raise _bad_request(
                "message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message"
            )
        if new_markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = new_markup
        message["edit_date"] = self._now()
        return _Handled(message)

    def _edit_message_text(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        message = self._editable_bot_message(params)
        if "text" not in message:
            raise _bad_request("there is no text in the message to edit")
        text, entities = self._formatted(str(params.get("text") or ""), params, "entities")
        if not text:
            raise _bad_request("message text is empty")
        markup = params.get("reply_markup")
        new_markup = markup if isinstance(markup, dict) and markup.get("inline_keyboard") else None
        if text == message["text"] and new_markup == message.get("reply_markup"):
            raise _bad_request("message is not modified")
        message["text"] = text
        message.pop("entities", None)
        if entities:
            message["entities"] = entities
        if new_markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = new_markup
        message["edit_date"] = self._now()
        return _Handled(message)

    def _delete_one(self, chat: EmulatedChat, message_id: int) -> None:
        message = self._find_message(chat.id, message_id)
        if message is None:
            raise _bad_request("message to delete not found")
        own = message.get("from", {}).get("id") == self.bot_user.id
        if not own and chat.type != "private" and not self._may_delete_others(chat):
            raise _bad_request("message can't be deleted")
        del self._messages[(chat.id, message_id)]
        self.deleted.add((chat.id, message_id))

    def _may_delete_others(self, chat: EmulatedChat) -> bool:
        status = self._members[chat.id].get(self.bot_user.id)
        if status == "creator":
            return True
        rights = self._admin_rights.get((chat.id, self.bot_user.id), {})
        return status == "administrator" and bool(rights.get("can_delete_messages", True))

    def _delete_message(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._known_chat(params.get("chat_id"))
        self._delete_one(chat, int(params.get("message_id") or 0))
        return _Handled(True)

    def _delete_messages(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._known_chat(params.get("chat_id"))
        message_ids = params.get("message_ids")
        if not isinstance(message_ids, list) or not 1 <= len(message_ids) <= 100:
            raise _bad_request("message_ids must be a list of 1-100 ids")
        # As in Telegram, messages that cannot be deleted are skipped, not refused.
        for message_id in message_ids:
            with contextlib.suppress(BotApiError):
                self._delete_one(chat, int(message_id))
        return _Handled(True)

    def _set_message_reaction(
        self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]
    ) -> _Handled:
        chat = self._known_chat(params.get("chat_id"))
        message_id = int(params.get("message_id") or 0)
        if self._find_message(chat.id, message_id) is None:
            raise _bad_request("message to react not found")
        reaction = params.get("reaction") or []
        if not isinstance(reaction, list) or len(reaction) > 1:
            raise _bad_request("REACTIONS_TOO_MANY")
        for item in reaction:
            if item.get("type") != "emoji" or item.get("emoji") not in _BOT_REACTIONS:
                raise _bad_request("REACTION_INVALID")
        self.reactions[(chat.id, message_id)] = list(reaction)
        return _Handled(True)

    def _get_file(self, params: Mapping[str, Any], files: Mapping[str, UploadedFile]) -> _Handled:
        file_id = params.get("file_id")
        if not file_id:
            raise _bad_request("file_id not specified")
        stored = self._files_by_id.get(str(file_id))
        if stored is None:
            raise _bad_request("invalid file_id")
        if stored.file_size > GET_FILE_LIMIT_BYTES:
            raise _bad_request("file is too big")
        return _Handled(
            {
                "file_id": file_id,
                "file_unique_id": stored.file_unique_id,
                "file_size": stored.file_size,
                "file_path": stored.file_path,
            }
        )

    # ---- helpers: chats, messages, updates -----------------------------------------------------

    def _require_user(self, user: EmulatedUser) -> None:
        if self._users.get(user.id) != user:
            raise ValueError(f"user {user.id} was not created by this emulator")

    def _require_chat(self, chat: EmulatedChat) -> None:
        if self._chats.get(chat.id) != chat:
            raise ValueError(f"chat {chat.id} was not created by this emulator")

    def _known_chat(self, chat_id: Any) -> EmulatedChat:
        if chat_id is None or chat_id == "":
            raise _bad_request("chat_id is empty")
        if isinstance(chat_id, str):
            for chat in self._chats.values():
                if chat.username is not None and f"@{chat.username}" == chat_id:
                    return chat
            raise _bad_request("chat not found")
        found = self._chats.get(int(chat_id))
        if found is None:
            raise _bad_request("chat not found")
        return found

    def _target_chat(self, params: Mapping[str, Any]) -> EmulatedChat:
        """The chat the bot wants to post to, refused as Telegram refuses it."""
        chat = self._known_chat(params.get("chat_id"))
        if chat.type == "private" and chat.id in self._blocked_by:
            raise _forbidden("bot was blocked by the user")
        bot_status = self._members[chat.id].get(self.bot_user.id, "left")
        if bot_status == "kicked":
            raise _forbidden(f"bot was kicked from the {chat.type} chat")
        if bot_status == "left":
            raise _forbidden(f"bot is not a member of the {chat.type} chat")
        return chat

    def _next_message_id(self, chat_id: int) -> int:
        # Message ids count per chat, as they do for bots in Telegram.
        message_id = self._last_message_id.get(chat_id, 0) + 1
        self._last_message_id[chat_id] = message_id
        return message_id

    def _find_message(self, chat_id: int, message_id: int) -> JsonDict | None:
        return self._messages.get((chat_id, message_id))

    def _compose_message(
        self,
        chat: EmulatedChat,
        sender: EmulatedUser,
        content: Mapping[str, Any],
        replied: Mapping[str, Any] | None,
        message_thread_id: int | None,
    ) -> JsonDict:
        message: JsonDict = {"message_id": self._next_message_id(chat.id)}
        if message_thread_id is not None and chat.is_forum:
            message["message_thread_id"] = message_thread_id
            message["is_topic_message"] = True
        message["from"] = sender.to_api()
        message["chat"] = chat.to_api()
        message["date"] = self._now()
        if replied is not None:
            # Telegram embeds the replied-to message one level deep only.
            message["reply_to_message"] = {
                key: value for key, value in replied.items() if key != "reply_to_message"
            }
        message.update(content)
        self._messages[(chat.id, message["message_id"])] = message
        return message

    def _user_message(
        self,
        chat: EmulatedChat,
        user: EmulatedUser,
        content: Mapping[str, Any],
        reply_to: Mapping[str, Any] | int | None,
        message_thread_id: int | None,
    ) -> JsonDict:
        self._require_chat(chat)
        self._require_user(user)
        if self._members[chat.id].get(user.id, "left") in {"left", "kicked"}:
            raise ValueError(f"user {user.id} is not a member of chat {chat.id}")
        replied: JsonDict | None = None
        if reply_to is not None:
            reply_id = reply_to if isinstance(reply_to, int) else int(reply_to["message_id"])
            replied = self._find_message(chat.id, reply_id)
            if replied is None:
                raise ValueError(f"no message {reply_id} in chat {chat.id} to reply to")
        message = self._compose_message(chat, user, content, replied, message_thread_id)
        if self._bot_receives(chat, message):
            self._queue_update("message", message)
        return message

    def _bot_receives(self, chat: EmulatedChat, message: Mapping[str, Any]) -> bool:
        """Whether privacy mode lets a user's message through to the bot."""
        if chat.type == "private" or not self.group_privacy:
            return True
        if self._members[chat.id].get(self.bot_user.id) in {"administrator", "creator"}:
            return True
        replied = message.get("reply_to_message")
        if replied is not None and replied["from"]["id"] == self.bot_user.id:
            return True
        text = message.get("text", message.get("caption", ""))
        entities = message.get("entities", message.get("caption_entities", []))
        own_mention = f"@{self.bot_user.username}".lower()
        for entity in entities:
            covered = entity_text(text, entity).lower()
            if entity["type"] == "mention" and covered == own_mention:
                return True
            if entity["type"] == "bot_command":
                _, at, addressee = covered.partition("@")
                if not at or f"@{addressee}" == own_mention:
                    return True
        return False

    def _now(self) -> int:
        return int(time.time()) + self.clock_offset_s

    def _queue_update(self, kind: str, payload: JsonDict) -> None:
        self._updates.append(_Update(self._next_update_id, kind, payload))
        self._next_update_id += 1
        self._wake_pollers()

    def _wake_pollers(self) -> None:
        self._updates_arrived.set()
        self._updates_arrived = asyncio.Event()

    def _is_allowed(self, kind: str) -> bool:
        return not self._allowed_updates or kind in self._allowed_updates

    def _new_media_group_id(self) -> str:
        media_group_id = str(self._next_media_group_id)
        self._next_media_group_id += 1
        return media_group_id

    def _bot_posts(
        self,
        chat: EmulatedChat,
        params: Mapping[str, Any],
        contents: Sequence[JsonDict],
        *,
        as_list: bool = False,
    ) -> _Handled:
        """Post the bot's message(s) after every check passed, so refusals have no effect."""
        replied = self._replied_message(chat, params)
        thread_id = params.get("message_thread_id")
        reply_markup = params.get("reply_markup")
        messages: list[JsonDict] = []
        for content in contents:
            message = self._compose_message(chat, self.bot_user, content, replied, thread_id)
            # Only inline keyboards are echoed back in the sent message.
            if isinstance(reply_markup, dict) and "inline_keyboard" in reply_markup and not as_list:
                message["reply_markup"] = reply_markup
            messages.append(message)
        result: Any = messages if as_list else messages[0]
        return _Handled(result, messages=tuple((chat.id, message) for message in messages))

    def _replied_message(self, chat: EmulatedChat, params: Mapping[str, Any]) -> JsonDict | None:
        reply = params.get("reply_parameters")
        if isinstance(reply, dict):
            target_chat = (
                self._known_chat(reply["chat_id"]) if reply.get("chat_id") is not None else chat
            )
            message_id = reply.get("message_id")
            tolerant = bool(reply.get("allow_sending_without_reply"))
        elif params.get("reply_to_message_id") is not None:
            target_chat = chat
            message_id = params["reply_to_message_id"]
            tolerant = bool(params.get("allow_sending_without_reply"))
        else:
            return None
        replied = self._find_message(target_chat.id, int(message_id or 0))
        if replied is None and not tolerant:
            raise _bad_request("message to be replied not found")
        return replied

    def _commands_key(self, params: Mapping[str, Any]) -> tuple[str, str]:
        scope = params.get("scope")
        scope_type = str(scope.get("type", "default")) if isinstance(scope, dict) else "default"
        return scope_type, str(params.get("language_code") or "")

    # ---- helpers: text -----------------------------------------------------------------------

    def _formatted(
        self, text: str, params: Mapping[str, Any], entities_key: str
    ) -> tuple[str, list[JsonDict]]:
        explicit = params.get(entities_key)
        if explicit is not None:
            if not isinstance(explicit, list) or not all(
                isinstance(entity, dict) and {"type", "offset", "length"} <= entity.keys()
                for entity in explicit
            ):
                raise _bad_request(f"can't parse {entities_key} JSON object")
            return trim_whitespace(text, explicit)
        parse_mode = params.get("parse_mode")
        parsed, entities = parse_formatted_text(
            text, None if parse_mode is None else str(parse_mode)
        )
        return trim_whitespace(parsed, entities)

    def _bot_caption(self, params: Mapping[str, Any]) -> JsonDict:
        caption = params.get("caption")
        if caption is None or caption == "":
            return {}
        text, entities = self._formatted(str(caption), params, "caption_entities")
        if not text:
            return {}
        if utf16_length(text) > MAX_CAPTION_LENGTH:
            raise _bad_request("message caption is too long")
        content: JsonDict = {"caption": text}
        if entities:
            content["caption_entities"] = entities
        if params.get("show_caption_above_media"):
            content["show_caption_above_media"] = True
        return content

    def _user_caption(self, caption: str | None) -> JsonDict:
        if caption is None:
            return {}
        content: JsonDict = {"caption": caption}
        entities = detect_entities(caption)
        if entities:
            content["caption_entities"] = entities
        return content

    # ---- helpers: files ----------------------------------------------------------------------

    def _mint_file_id(self, prefix: str) -> str:
        # Fresh ids every time, as Telegram issues: bots must compare file_unique_id instead.
        self._file_counter += 1
        return f"{prefix}AgADAQAD{_short_hash('file_id', self._file_counter, size=30)}"

    def _store_file(
        self,
        data: bytes,
        *,
        folder: str,
        suffix: str,
        kind: str = "document",
        width: int | None = None,
        height: int | None = None,
        file_name: str | None = None,
        mime_type: str | None = None,
    ) -> _StoredFile:
        # The same content gets the same file_unique_id, as in Telegram.
        content_key = (kind, file_name, mime_type, hashlib.sha256(data).hexdigest())
        unique_id = f"AQAD{_short_hash(*content_key)}"
        existing = self._files_by_unique_id.get(unique_id)
        if existing is not None:
            return existing
        self._file_counter += 1
        stored = _StoredFile(
            file_unique_id=unique_id,
            file_path=f"{folder}/file_{self._file_counter}{suffix}",
            file_size=len(data),
            data=data,
            width=width,
            height=height,
            file_name=file_name,
            mime_type=mime_type,
        )
        self._files_by_path[stored.file_path] = stored
        self._files_by_unique_id[unique_id] = stored
        return stored

    def _store_photo(self, image: bytes) -> list[JsonDict]:
        """Store an image and its renditions; the PhotoSize list for a message.

        Raises:
            ValueError: if the bytes are not a decodable image.
        """
        sizes = tuple(
            self._store_file(
                variant.data,
                folder="photos",
                suffix=".jpg",
                kind="photo",
                width=variant.width,
                height=variant.height,
                mime_type="image/jpeg",
            )
            for variant in _photo_variants(image)
        )
        for size in sizes:
            self._photo_sets[size.file_unique_id] = sizes
        return self._photo_sizes_api(sizes)

    def _photo_sizes_api(self, sizes: Sequence[_StoredFile]) -> list[JsonDict]:
        photo: list[JsonDict] = []
        for size in sizes:
            file_id = self._mint_file_id("AgAC")
            self._files_by_id[file_id] = size
            photo.append(
                {
                    "file_id": file_id,
                    "file_unique_id": size.file_unique_id,
                    "file_size": size.file_size,
                    "width": size.width,
                    "height": size.height,
                }
            )
        return photo

    def _store_moving(
        self, data: bytes, *, kind: str, file_name: str | None, suffix: str = ".mp4"
    ) -> _StoredFile:
        width, height, seconds = _video_facts(data)
        stored = self._store_file(
            data,
            folder="videos" if kind != "sticker" else "stickers",
            suffix=suffix,
            kind=kind,
            width=width,
            height=height,
            file_name=file_name,
            mime_type="video/webm" if suffix == ".webm" else "video/mp4",
        )
        if stored.duration is None:
            stored = dataclasses.replace(stored, duration=seconds)
            self._files_by_path[stored.file_path] = stored
            self._files_by_unique_id[stored.file_unique_id] = stored
        return stored

    def _media_api(self, stored: _StoredFile, file_id: str) -> JsonDict:
        """A Video or Animation object (the two have the same fields)."""
        self._files_by_id[file_id] = stored
        media: JsonDict = {
            "file_id": file_id,
            "file_unique_id": stored.file_unique_id,
            "width": stored.width or 0,
            "height": stored.height or 0,
            "duration": stored.duration or 0,
        }
        if stored.file_name is not None:
            media["file_name"] = stored.file_name
        if stored.mime_type is not None:
            media["mime_type"] = stored.mime_type
        media["file_size"] = stored.file_size
        return media

    def _resolve_moving(
        self, value: Any, files: Mapping[str, UploadedFile], field_name: str
    ) -> JsonDict:
        """The Video or Animation object of a video a bot sends (an upload or a file_id)."""
        source = self._uploaded_or_reference(value, files, field_name, field_name)
        if isinstance(source, _StoredFile):
            if source.file_unique_id in self._photo_sets:
                raise _bad_request("type of file mismatch")
            return self._media_api(source, self._mint_file_id("BAAC"))
        if not source.data:
            raise _bad_request("file must be non-empty")
        suffix = _suffix(source.filename or "") or ".mp4"
        stored = self._store_moving(
            source.data, kind="video", file_name=source.filename, suffix=suffix
        )
        return self._media_api(stored, self._mint_file_id("BAAC"))

    def _document_api(self, stored: _StoredFile, file_id: str) -> JsonDict:
        self._files_by_id[file_id] = stored
        document: JsonDict = {}
        if stored.file_name is not None:
            document["file_name"] = stored.file_name
        if stored.mime_type is not None:
            document["mime_type"] = stored.mime_type
        document["file_id"] = file_id
        document["file_unique_id"] = stored.file_unique_id
        document["file_size"] = stored.file_size
        return document

    def _uploaded_or_reference(
        self, value: Any, files: Mapping[str, UploadedFile], field_name: str, what: str
    ) -> UploadedFile | _StoredFile:
        """The file a media parameter names: an upload, an attach:// part or a file_id."""
        if value is None:
            upload = files.get(field_name)
            if upload is None:
                raise _bad_request(f"there is no {what} in the request")
            return upload
        reference = str(value)
        if reference.startswith("attach://"):
            upload = files.get(reference.removeprefix("attach://"))
            if upload is None:
                raise _bad_request("can't parse InputMedia: media not found")
            return upload
        if reference.startswith(("http://", "https://")):
            raise _bad_request("failed to get HTTP URL content")
        stored = self._files_by_id.get(reference)
        if stored is None:
            raise _bad_request("wrong file identifier/HTTP URL specified")
        return stored

    def _resolve_photo(
        self, value: Any, files: Mapping[str, UploadedFile], field_name: str
    ) -> list[JsonDict]:
        source = self._uploaded_or_reference(value, files, field_name, "photo")
        if isinstance(source, _StoredFile):
            sizes = self._photo_sets.get(source.file_unique_id)
            if sizes is None:
                raise _bad_request("type of file mismatch")
            return self._photo_sizes_api(sizes)
        try:
            with Image.open(io.BytesIO(source.data)) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError):
            raise _bad_request("IMAGE_PROCESS_FAILED") from None
        too_large = width + height > _PHOTO_MAX_SIDES_SUM
        too_thin = max(width, height) > _PHOTO_MAX_ASPECT_RATIO * min(width, height)
        if too_large or too_thin:
            raise _bad_request("PHOTO_INVALID_DIMENSIONS")
        return self._store_photo(source.data)

    def _resolve_document(
        self, value: Any, files: Mapping[str, UploadedFile], field_name: str
    ) -> JsonDict:
        source = self._uploaded_or_reference(value, files, field_name, "document")
        if isinstance(source, _StoredFile):
            if source.file_unique_id in self._photo_sets:
                raise _bad_request("type of file mismatch")
            return self._document_api(source, self._mint_file_id("BQAC"))
        if not source.data:
            raise _bad_request("file must be non-empty")
        file_name = source.filename or "file"
        stored = self._store_file(
            source.data,
            folder="documents",
            suffix=_suffix(file_name),
            file_name=file_name,
            mime_type=source.content_type or "application/octet-stream",
        )
        return self._document_api(stored, self._mint_file_id("BQAC"))

    def _canonical(self, method: str) -> str:
        canonical = self._canonical_names.get(method.lower())
        if canonical is None:
            raise ValueError(f"{method!r} is not a method this emulator answers")
        return canonical


def _check_album_kinds(kinds: set[Any]) -> None:
    """sendMediaGroup takes audio, document, photo and video items; documents only alone."""
    if "animation" in kinds:
        raise _bad_request("can't parse InputMedia: animations can't be sent in an album")
    if not kinds <= {"photo", "video", "document"}:
        raise _bad_request("can't parse InputMedia: only photo, video and document are emulated")
    if "document" in kinds and len(kinds) > 1:
        raise _bad_request("document can't be mixed with other media types")


def _suffix(file_name: str) -> str:
    _, dot, extension = file_name.rpartition(".")
    return f".{extension.lower()}" if dot and extension.isalnum() else ""


def _checked_retry_after(retry_after: int) -> int:
    if retry_after < 1:
        raise ValueError("retry_after must be at least 1 second")
    return retry_after


def _chat_member_api(user: EmulatedUser, status: MemberStatus) -> JsonDict:
    member: JsonDict = {"status": status, "user": user.to_api()}
    if status == "creator":
        member["is_anonymous"] = False
    elif status == "administrator":
        member.update(
            {
                "can_be_edited": False,
                "is_anonymous": False,
                "can_manage_chat": True,
                "can_delete_messages": True,
                "can_manage_video_chats": True,
                "can_restrict_members": True,
                "can_promote_members": False,
                "can_change_info": True,
                "can_invite_users": True,
                "can_post_stories": False,
                "can_edit_stories": False,
                "can_delete_stories": False,
                "can_pin_messages": True,
            }
        )
    elif status == "restricted":
        member.update(
            {
                "is_member": True,
                "can_send_messages": False,
                "can_send_audios": False,
                "can_send_documents": False,
                "can_send_photos": False,
                "can_send_videos": False,
                "can_send_video_notes": False,
                "can_send_voice_notes": False,
                "can_send_polls": False,
                "can_send_other_messages": False,
                "can_add_web_page_previews": False,
                "can_change_info": False,
                "can_invite_users": False,
                "can_pin_messages": False,
                "can_manage_topics": False,
                "until_date": 0,
            }
        )
    elif status == "kicked":
        member["until_date"] = 0
    return member


@contextlib.asynccontextmanager
async def polling(
    application: Application[Any, Any, Any, Any, Any, Any], *, poll_timeout_s: int = 1
) -> AsyncIterator[None]:
    """Run a PTB application's long-polling updater for the duration of the block.

    It stops the updater and the application before shutting down even when the block raises,
    so the block's own error is what the test reports (PTB refuses to shut down a running
    application, which would otherwise hide it). A short ``poll_timeout_s`` keeps the shutdown
    quick; stopping leaves one 409 getUpdates in ``calls``: PTB's last poll supersedes the
    long poll it cancelled.

    Raises:
        RuntimeError: if the application has no updater.
    """
    if application.updater is None:
        raise RuntimeError("the application was built without an updater")
    async with application:
        await application.start()
        try:
            await application.updater.start_polling(timeout=dtm.timedelta(seconds=poll_timeout_s))
            try:
                yield
            finally:
                if application.updater.running:
                    await application.updater.stop()
        finally:
            await application.stop()
