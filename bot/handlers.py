"""The bot's callbacks: find the image, check access, one service call, one reply.

Refusals (``bot.errors``) and engine errors caused by the input are raised, not answered here:
:func:`on_error` turns them into a friendly sentence, and anything else into an apology, a log
entry with the traceback and (if configured) a note to the bot admins.
"""

from __future__ import annotations

import datetime as dtm
import logging

from telegram import Message, Update, User
from telegram.constants import ChatType
from telegram.error import Forbidden, TelegramError
from telegram.ext import ApplicationHandlerStop

from bot import replies
from bot.context import BotContext
from bot.errors import RefusedError
from bot.incoming import display_name, download, image_for, image_id_named
from bot.outgoing import send_results, showing_action
from indexer import GLOBAL_SCOPE, ImageError, NotFoundError

log = logging.getLogger(__name__)

# Verified matches looked at when a /remove names its image by a photo.
_REMOVE_CANDIDATES = 5


async def start(update: Update, context: BotContext) -> None:
    await _message(update).reply_text(replies.start(context.bot.username))


async def help_command(update: Update, context: BotContext) -> None:
    await _message(update).reply_text(replies.help_text(context.bot.username))


async def stats(update: Update, context: BotContext) -> None:
    message = _message(update)
    service = context.service
    report = await service.stats()
    await message.reply_text(
        replies.stats(
            report,
            in_collection=await service.count(scope=GLOBAL_SCOPE),
            in_chat=await service.count(scope=message.chat_id),
            now=dtm.datetime.now(dtm.UTC),
        )
    )


async def search(update: Update, context: BotContext) -> None:
    """A photo to search: sent in a private chat, captioned /search or mentioning the bot, or
    the photo a /search replies to."""
    message = _message(update)
    _, attachment = image_for(message, "search")
    context.access.check_query(_sender(message))
    async with showing_action(message):
        data = await download(context.bot, attachment)
        # A chat sees its own photos (scope = chat id) and the offline collection, no others.
        matches = await context.service.query(
            data, scope=message.chat_id, top=context.settings.search.top_n
        )
        floor = context.settings.search.min_score
        shown = [match for match in matches if match.verified or match.score >= floor]
        await send_results(message, shown, context.service)


async def add(update: Update, context: BotContext) -> None:
    """/add as a photo's caption or as a reply to a photo: keep it in this chat's collection."""
    message = _message(update)
    image_message, attachment = image_for(message, "add")
    user = _sender(message)
    chat_settings = await context.watch.settings(message.chat_id)  # /settings may narrow it
    await context.access.check_may_add(message.chat, user, chat_policy=chat_settings.add_policy)
    context.access.check_query(user)
    data = await download(context.bot, attachment)
    result = await context.service.add(
        data,
        scope=message.chat_id,  # found only in this chat (and never in others)
        added_by=display_name(message),
        origin_chat_id=message.chat_id,
        origin_message_id=image_message.message_id,
        # A document's file_id cannot be sent back as a photo; its first result upload can.
        telegram_file_id=attachment.file_id if attachment.is_photo else None,
    )
    reply = replies.added if result.created else replies.already_added
    await message.reply_text(reply(result.image))


async def remove(update: Update, context: BotContext) -> None:
    """/remove ID, or /remove replying to a result or to a photo (admins only)."""
    message = _message(update)
    user = _sender(message)
    await context.access.check_may_remove(message.chat, user, image=None)
    image_id = image_id_named(message, context.args)
    if image_id is None:
        image_id = await _image_in_photo(message, context)
    record = await context.service.get(image_id)
    if record.scope != message.chat_id:  # the chat's own photos passed the check above
        await context.access.check_may_remove(message.chat, user, image=record)
    removed = await context.service.remove(record.id, scope=record.scope)
    await message.reply_text(replies.removed(removed))


async def refuse_chat(update: Update, context: BotContext) -> None:
    """Any message from a chat outside ``[access] allowed_chats``: stop here."""
    message = _message(update)
    log.info("ignored a message from chat %s: not in [access] allowed_chats", message.chat_id)
    if message.chat.type == ChatType.PRIVATE:
        await message.reply_text(replies.chat_not_allowed())
    raise ApplicationHandlerStop


async def on_error(update: object, context: BotContext) -> None:
    """The one error handler: a sentence for the user, the traceback for the log and admins."""
    error = context.error
    if error is None:
        return
    message = update.effective_message if isinstance(update, Update) else None
    where = f"update {update.update_id}" if isinstance(update, Update) else "a background task"
    if isinstance(error, RefusedError | ImageError | NotFoundError):
        log.info("%s refused: %s", where, error)
        if message is not None:
            await _answer(message, replies.refusal(error))
        return
    if isinstance(error, Forbidden):
        # The user blocked the bot, or it left the group: nobody is listening there.
        log.info("%s: cannot post in that chat any more: %s", where, error)
        return
    log.error("%s failed", where, exc_info=error)
    if message is not None:
        await _answer(message, replies.failure(error))
    await _alert_admins(context, error, where)


async def _image_in_photo(message: Message, context: BotContext) -> int:
    """The id of the image a /remove means by a photo: the same picture in this chat (first)
    or in the offline collection."""
    _, attachment = image_for(message, "remove")
    data = await download(context.bot, attachment)
    matches = await context.service.query(data, scope=message.chat_id, top=_REMOVE_CANDIDATES)
    same = sorted(
        (match for match in matches if match.verified),
        key=lambda match: match.image.scope != message.chat_id,
    )
    if not same:
        raise NotFoundError("no image in this chat's collection is the same picture")
    return same[0].image.id


async def _answer(message: Message, text: str) -> None:
    try:
        await message.reply_text(text)
    except TelegramError as error:
        log.warning("could not answer in chat %s: %s", message.chat_id, error)


async def _alert_admins(context: BotContext, error: BaseException, where: str) -> None:
    settings = context.settings
    if not settings.runtime.notify_admins_on_error or not settings.access.admins:
        return
    if context.admin_alerts.acquire("errors") > 0:
        log.info("not telling the admins about this error: enough alerts this hour")
        return
    for admin in sorted(settings.access.admins):
        try:
            await context.bot.send_message(admin, replies.admin_alert(error, where))
        except TelegramError as failure:
            # Typically the admin never opened a chat with the bot.
            log.warning("could not alert admin %s: %s", admin, failure)


def _message(update: Update) -> Message:
    if update.effective_message is None:
        raise RuntimeError(f"update {update.update_id} has no message for this handler")
    return update.effective_message


def _sender(message: Message) -> User:
    if message.from_user is None:
        raise RuntimeError(f"message {message.message_id} in {message.chat_id} has no sender")
    return message.from_user
