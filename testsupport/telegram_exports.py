"""Telegram Desktop exports written as the app writes them (``result.json``), for the tests
and the import benchmark."""

from __future__ import annotations

import datetime as dtm
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

NOT_INCLUDED = "(File not included. Change data exporting settings to download.)"


# -- writing exports ------------------------------------------------------------------------


def message(
    message_id: int,
    posted_at: int,
    *,
    sender: str | None,
    sender_id: str,
    kind: str = "message",
    **fields: Any,
) -> dict[str, Any]:
    """A message as Telegram Desktop writes it: ``date`` in local time without a zone,
    ``date_unixtime`` a string, the sender's name (``None`` for a deleted account) and id
    ("user123", "channel123"); ``fields`` add the media ("photo", "file", "mime_type", ...).
    A service message (``kind="service"``) names its sender "actor"."""
    who = "actor" if kind == "service" else "from"
    return {
        "id": message_id,
        "type": kind,
        # Local time without a zone, as the export writes it.
        "date": dtm.datetime.fromtimestamp(posted_at).isoformat(timespec="seconds"),
        "date_unixtime": str(posted_at),
        who: sender,
        f"{who}_id": sender_id,
        **fields,
        "text": "",
        "text_entities": [],
    }


def chat(name: str, export_type: str, bare_id: int, messages: Sequence[Mapping[str, Any]]
         ) -> dict[str, Any]:
    """One chat, as a single chat's ``result.json`` holds it, or as an item of an account's."""
    return {"name": name, "type": export_type, "id": bare_id, "messages": list(messages)}


def account(chats: Iterable[Mapping[str, Any]], left_chats: Iterable[Mapping[str, Any]] = ()
            ) -> dict[str, Any]:
    """A whole account's ``result.json``: personal data, then the chat lists."""
    return {
        "about": "Here is the data you requested.",
        "personal_information": {"user_id": 1, "first_name": "Export", "last_name": "",
                                 "phone_number": "+1 000 000 0000", "bio": ""},
        "chats": {"about": "This page lists all chats from this export.", "list": list(chats)},
        "left_chats": {"about": "This page lists all chats you left.", "list": list(left_chats)},
    }


def write_result(folder: Path, document: Mapping[str, Any]) -> Path:
    """Write ``result.json`` (indented, as Telegram Desktop does) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(document, ensure_ascii=False, indent=1))
    return folder
