"""Reading what users send: which image a message is about, downloading it, and the filters
that recognise commands in photo captions and mentions of the bot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from telegram import Bot, Message, MessageEntity
from telegram.error import BadRequest
from telegram.ext import filters

from bot import replies
from bot.errors import Action, FileTooBigError, MissingImageError

TELEGRAM_DOWNLOAD_LIMIT: Final = 20 * 2**20  # getFile refuses bots anything larger
_DOWNLOAD_TIMEOUT_S: Final = 60.0  # a 20 MB file over a slow link needs more than the default 5 s


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file a message carries that may be an image (or a moving picture)."""

    file_id: str
    file_unique_id: str  # the same for the same file, whoever sends it
    file_size: int | None
    is_photo: bool  # a Telegram photo (its file_id can be sent back as a photo), not a document


# Messages carrying a picture the engine may read: photos, moving pictures (GIFs come as MP4
# animations), stickers (still WebP, video WebM; animated ones are drawings the engine names),
# and any document, for the engine to judge.
PICTURES: Final = (
    filters.PHOTO
    | filters.ANIMATION
    | filters.VIDEO
    | filters.VIDEO_NOTE
    | filters.Sticker.ALL
    | filters.Document.ALL
)
# What the repost watch looks at in a group: every picture, but only documents that say they
# are images or videos (members' other files are none of its business).
WATCHED_PICTURES: Final = (
    filters.PHOTO
    | filters.ANIMATION
    | filters.VIDEO
    | filters.VIDEO_NOTE
    | filters.Sticker.STATIC
    | filters.Sticker.VIDEO
    | filters.Document.IMAGE
    | filters.Document.VIDEO
)


def attached_image(message: Message | None) -> Attachment | None:
    """The image in ``message``: the largest size of its photo, its animation (a GIF, which
    Telegram sends as MP4), video, video note or sticker, or its document.

    Any document or sticker counts: whether it really is a picture is the engine's call, and
    its answer ("an animated sticker is a drawing") is more helpful than silence.
    """
    if message is None:
        return None
    if message.photo:
        largest = message.photo[-1]
        return Attachment(
            largest.file_id, largest.file_unique_id, largest.file_size, is_photo=True
        )
    # An animation comes with a document too (Bot API backward compatibility): it is the
    # animation that is the picture, so it is looked at first.
    for media in (
        message.animation,
        message.video,
        message.video_note,
        message.sticker,
        message.document,
    ):
        if media is not None:
            return Attachment(media.file_id, media.file_unique_id, media.file_size, is_photo=False)
    return None


def image_for(message: Message, command: Action) -> tuple[Message, Attachment]:
    """The message holding the image a command is about, and that image: the command's own
    message (a caption) first, else the message it replies to.

    Raises:
        MissingImageError: neither carries an image.
    """
    for candidate in (message, message.reply_to_message):
        attachment = attached_image(candidate)
        if candidate is not None and attachment is not None:
            return candidate, attachment
    raise MissingImageError(command)


def image_id_named(message: Message, arguments: list[str] | None) -> int | None:
    """The image id a /remove names: ``/remove 12``, or a reply to a bot message showing "#12".

    Raises:
        MissingImageError: the argument is not an id.
    """
    if arguments:
        if len(arguments) != 1 or not arguments[0].lstrip("#").isdigit():
            raise MissingImageError("remove")
        return int(arguments[0].lstrip("#"))
    replied = message.reply_to_message
    if replied is None or replied.from_user is None or replied.from_user.id != message.get_bot().id:
        return None
    return replies.image_id_in(replied.caption or replied.text)


async def download(bot: Bot, attachment: Attachment) -> bytes:
    """The bytes of an attachment.

    Raises:
        FileTooBigError: over the 20 MB bots may download (checked before asking, and when
            Telegram refuses).
        TelegramError: any other failure of the Bot API.
    """
    if attachment.file_size is not None and attachment.file_size > TELEGRAM_DOWNLOAD_LIMIT:
        raise FileTooBigError(attachment.file_size, TELEGRAM_DOWNLOAD_LIMIT)
    try:
        telegram_file = await bot.get_file(attachment.file_id)
    except BadRequest as error:
        if "file is too big" in error.message.lower():
            raise FileTooBigError(attachment.file_size, TELEGRAM_DOWNLOAD_LIMIT) from error
        raise
    return bytes(await telegram_file.download_as_bytearray(read_timeout=_DOWNLOAD_TIMEOUT_S))


def display_name(message: Message) -> str:
    """Who sent ``message``, as shown in "added by ..." (an anonymous admin shows as the chat)."""
    if message.sender_chat is not None:
        return message.sender_chat.effective_name or "an anonymous admin"
    if message.from_user is not None:
        return message.from_user.full_name
    return "someone"


class CaptionCommand(filters.MessageFilter):
    """A message whose caption starts with ``/command`` or ``/command@this_bot``.

    PTB's CommandHandler reads only message text, so a photo sent with the caption "/add"
    needs this filter. Commands addressed to other bots do not match.
    """

    def __init__(self, command: str) -> None:
        super().__init__(name=f"CaptionCommand({command!r})")
        self.command = command.lower()

    def filter(self, message: Message) -> bool:
        if not message.caption or not message.caption_entities:
            return False
        first = message.caption_entities[0]
        if first.type != MessageEntity.BOT_COMMAND or first.offset != 0:
            return False
        name, _, addressee = message.parse_caption_entity(first)[1:].partition("@")
        if name.lower() != self.command:
            return False
        return not addressee or addressee.lower() == (message.get_bot().username or "").lower()


class MentionsThisBot(filters.MessageFilter):
    """A message whose caption or text mentions this bot (@its_username)."""

    def __init__(self) -> None:
        super().__init__(name="MentionsThisBot")

    def filter(self, message: Message) -> bool:
        own = f"@{message.get_bot().username}".lower()
        mentions = {
            **message.parse_entities([MessageEntity.MENTION]),
            **message.parse_caption_entities([MessageEntity.MENTION]),
        }
        return any(text.lower() == own for text in mentions.values())
