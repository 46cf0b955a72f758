"""Telegram's chat ids as the Bot API writes them, and links to a chat's messages.

Telegram Desktop's exports name a chat by its bare id; the Bot API, and so the scopes of the
catalog, use a signed id whose form depends on the kind of chat. Both the bot (its repost
answers) and the command line (query results) build message links here, so a link to a
message looks the same wherever it is shown.
"""

from __future__ import annotations

from typing import Final

# A supergroup's or channel's Bot API id is -100 followed by its bare id, the id its t.me/c/
# links use: -(10^12 + bare id).
SUPERGROUP_ID_OFFSET: Final = 1_000_000_000_000

# Telegram Desktop's chat "type" in an export, and how its bare id becomes a Bot API id.
_USER_CHATS: Final = frozenset({"personal_chat", "bot_chat", "saved_messages"})
_BASIC_GROUPS: Final = frozenset({"private_group"})
_CHANNELS: Final = frozenset(
    {"private_supergroup", "public_supergroup", "private_channel", "public_channel"}
)
EXPORT_CHAT_TYPES: Final = _USER_CHATS | _BASIC_GROUPS | _CHANNELS


def bot_api_chat_id(export_type: str, bare_id: int) -> int:
    """The Bot API id of a chat that an export calls ``bare_id``, of type ``export_type``.

    Raises:
        ValueError: a type that has no Bot API id (or one this version does not know), or an
            id that is not a positive number.
    """
    if bare_id <= 0:
        raise ValueError(f"a chat id in an export is a positive number, not {bare_id}")
    if export_type in _CHANNELS:
        return -(SUPERGROUP_ID_OFFSET + bare_id)
    if export_type in _BASIC_GROUPS:
        return -bare_id
    if export_type in _USER_CHATS:
        return bare_id
    raise ValueError(f"chats of type {export_type!r} cannot be imported")


def message_link(chat_id: int, chat_username: str | None, message_id: int) -> str | None:
    """A t.me link to a message, for the chat's members: t.me/<name>/<id> in a public group,
    t.me/c/<bare id>/<id> in any other supergroup or channel (their chat id without the -100
    prefix). Basic groups and private chats have none."""
    if chat_username:
        return f"https://t.me/{chat_username}/{message_id}"
    if chat_id >= -SUPERGROUP_ID_OFFSET:
        return None
    return f"https://t.me/c/{-chat_id - SUPERGROUP_ID_OFFSET}/{message_id}"
