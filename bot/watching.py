"""The repost watch's callbacks: /watch, /settings and its buttons, the buttons under a repost
answer, /forget, and the intake of every photo posted in a watched group.

Like ``handlers``, they stay thin: find what the update is about, check who asks, one call to
:class:`bot.watch.RepostWatch`, one reply from ``replies``. Photos are checked by the watch's
workers, not here, so a burst of photos never holds up the bot's other updates.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Final

from telegram import CallbackQuery, Chat, Message, Update
from telegram.constants import ChatMemberStatus, ChatType
from telegram.error import BadRequest, TelegramError

from bot import replies
from bot.context import BotContext
from bot.errors import NotAllowedError
from bot.incoming import attached_image, display_name
from bot.watch import (
    DELETE_REPOST,
    NOT_A_REPOST,
    ChatSettings,
    WatchedPhoto,
    settings_keyboard,
    with_change,
)

log = logging.getLogger(__name__)

_GROUP_TYPES: Final = frozenset({ChatType.GROUP, ChatType.SUPERGROUP})
_SEES_EVERYTHING: Final = frozenset({ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER})


async def watch_command(update: Update, context: BotContext) -> None:
    """/watch on, /watch off (chat admins and bot admins); /watch alone shows the state."""
    message = _message(update)
    if message.chat.type not in _GROUP_TYPES:
        await message.reply_text(replies.watch_only_in_groups())
        return
    settings = await context.watch.settings(message.chat_id)
    argument = " ".join(context.args or []).strip().lower()
    if argument not in {"on", "off"}:
        await message.reply_text(replies.watch_usage(settings.watch))
        return
    await _check_may_manage(message, context)
    turned_on = argument == "on"
    await context.watch.save_settings(replace(settings, watch=turned_on))
    await message.reply_text(replies.watch_switched(turned_on))
    if turned_on and not await _sees_every_message(message.chat, context):
        await message.reply_text(replies.watch_cannot_see(context.bot.username))


async def settings_command(update: Update, context: BotContext) -> None:
    """/settings: the chat's watch settings as buttons (admins)."""
    message = _message(update)
    if message.chat.type not in _GROUP_TYPES:
        await message.reply_text(replies.settings_only_in_groups())
        return
    await _check_may_manage(message, context)
    settings = await context.watch.settings(message.chat_id)
    await message.reply_text(
        replies.settings_title(),
        reply_markup=settings_keyboard(settings, context.access.add_policy),
    )


async def settings_button(update: Update, context: BotContext) -> None:
    """A /settings button: change that setting to its next value and redraw the buttons."""
    query, message = _query(update)
    if not await context.access.may_manage(message.chat, query.from_user):
        await query.answer(replies.only_admins_here(), show_alert=True)
        return
    what = (query.data or "").removeprefix("settings:")
    settings = await context.watch.settings(message.chat_id)
    try:
        changed = with_change(settings, what, context.access.add_policy)
    except ValueError:
        await query.answer(replies.button_expired())
        return
    await context.watch.save_settings(changed)
    await query.edit_message_reply_markup(settings_keyboard(changed, context.access.add_policy))
    if changed.watch and not settings.watch and not await _sees_every_message(
        message.chat, context
    ):
        await query.answer()
        await message.reply_text(replies.watch_cannot_see(context.bot.username))
        return
    await query.answer(replies.setting_changed())


async def repost_button(update: Update, context: BotContext) -> None:
    """"Not a repost" (admins or the poster) and "Delete repost" (admins) under an answer."""
    query, answer = _query(update)
    action, _, first_id = (query.data or "").rpartition(":")
    sightings = (
        await context.watch.answered_by(answer.chat_id, answer.message_id, int(first_id))
        if first_id.isdigit()
        else []
    )
    if not sightings:
        await query.answer(replies.button_expired())
        return
    user = query.from_user
    is_manager = await context.access.may_manage(answer.chat, user)
    if action == NOT_A_REPOST:
        if not is_manager and all(s.sender_id != user.id for s in sightings):
            await query.answer(replies.only_admins_or_poster(), show_alert=True)
            return
        # The answer replies to the (first) repost: its file is at hand to keep it apart.
        replied = answer.reply_to_message
        attachment = attached_image(replied)
        files = {} if replied is None or attachment is None else {replied.message_id: attachment}
        await context.watch.dismiss(sightings, files)
        await _remove_answer(answer)
        await query.answer(replies.not_a_repost_noted())
        return
    if action != DELETE_REPOST:
        await query.answer(replies.button_expired())
        return
    if not is_manager:
        await query.answer(replies.only_admins_here(), show_alert=True)
        return
    if not await _may_delete(answer.chat, context):
        await query.answer(replies.cannot_delete(), show_alert=True)
        return
    message_ids = [s.message_id for s in sightings]
    await context.bot.delete_messages(answer.chat_id, [*message_ids, answer.message_id])
    await context.watch.forget_deleted(answer.chat_id, message_ids)
    await query.answer(replies.repost_deleted())


async def forget_command(update: Update, context: BotContext) -> None:
    """/forget as a reply to one's own photo: out of the chat's history."""
    message = _message(update)
    photo = message.reply_to_message
    if photo is None or attached_image(photo) is None:
        await message.reply_text(replies.forget_usage())
        return
    sighting = await context.watch.sighting(message.chat_id, photo.message_id)
    if sighting is None:
        await message.reply_text(replies.forget_not_known())
        return
    user = message.from_user
    if user is None or sighting.sender_id != user.id:
        await message.reply_text(replies.forget_not_yours())
        return
    await context.watch.forget(sighting)
    await message.reply_text(replies.forgotten())


async def watched_photo(update: Update, context: BotContext) -> None:
    """Any image, video, animation or sticker posted (or edited in) a group: queued for a
    check when the watch is on."""
    message = _message(update)
    settings: ChatSettings = await context.watch.settings(message.chat_id)
    attachment = attached_image(message)
    if not settings.watch or attachment is None:
        return
    unique_id = attachment.file_unique_id
    if update.edited_message is not None and not await context.watch.needs_check(
        message.chat_id, message.message_id, unique_id
    ):
        return  # a caption edit: the photo is the one already checked
    posted = message.edit_date if update.edited_message is not None else None
    await context.watch.receive(
        WatchedPhoto(
            chat_id=message.chat_id,
            chat_username=message.chat.username,
            message_id=message.message_id,
            file_id=attachment.file_id,
            file_unique_id=unique_id,
            file_size=attachment.file_size,
            is_photo=attachment.is_photo,
            sender_id=_sender_id(message),
            sender_name=display_name(message),
            posted_at=(posted or message.date).timestamp(),
            media_group_id=message.media_group_id,
        )
    )


# -- helpers ------------------------------------------------------------------------------------


def _sender_id(message: Message) -> int | None:
    """The posting user's id; None when posted as a chat (a channel, an anonymous admin)."""
    if message.sender_chat is not None or message.from_user is None:
        return None
    return message.from_user.id


async def _check_may_manage(message: Message, context: BotContext) -> None:
    user = message.from_user
    if user is None or not await context.access.may_manage(message.chat, user):
        raise NotAllowedError("watch", user.id if user else 0, message.chat_id)


async def _sees_every_message(chat: Chat, context: BotContext) -> bool:
    """Whether Telegram shows the bot every message of ``chat`` (privacy mode off, or admin)."""
    me = await context.bot.get_me()
    if me.can_read_all_group_messages:
        return True
    member = await chat.get_member(me.id)
    return member.status in _SEES_EVERYTHING


async def _may_delete(chat: Chat, context: BotContext) -> bool:
    member = await chat.get_member(context.bot.id)
    if member.status == ChatMemberStatus.OWNER:
        return True
    return bool(getattr(member, "can_delete_messages", False))


async def _remove_answer(answer: Message) -> None:
    """Delete the bot's answer; if Telegram refuses (too old), at least drop its buttons."""
    try:
        await answer.delete()
    except BadRequest as error:
        log.info("could not delete the repost answer %s: %s", answer.message_id, error)
        try:
            await answer.edit_reply_markup(None)
        except TelegramError as failure:
            log.warning("could not remove the buttons of %s either: %s", answer.message_id, failure)


def _message(update: Update) -> Message:
    if update.effective_message is None:
        raise RuntimeError(f"update {update.update_id} has no message for this handler")
    return update.effective_message


def _query(update: Update) -> tuple[CallbackQuery, Message]:
    query = update.callback_query
    if query is None or not isinstance(query.message, Message):
        raise RuntimeError(f"update {update.update_id} has no button press on a message")
    return query, query.message
