"""Wiring: validated settings in, a ready python-telegram-bot ``Application`` out.

The search engine (a process pool and the index) is opened in ``post_init`` and closed in
``post_shutdown``, so it lives exactly as long as the bot runs. PTB's ``Application.stop()``
lets the updates in flight finish first, so an add that started is completed (and committed
by the engine) before the index is closed.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Final, TypeAlias

from telegram import BotCommand, LinkPreviewOptions, Update
from telegram.constants import ParseMode
from telegram.error import NetworkError, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    BaseHandler,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    Defaults,
    ExtBot,
    JobQueue,
    MessageHandler,
    filters,
)
from telegram.request import HTTPXRequest

from bot import handlers, replies, watching
from bot.access import AccessPolicy
from bot.context import BotContext, BotData, required
from bot.incoming import PICTURES, WATCHED_PICTURES, CaptionCommand, MentionsThisBot
from bot.intake import AcknowledgingRequest, UpdateIntake
from bot.settings import BotSettings
from bot.watch import RepostWatch
from indexer import CpuPool, EngineSettings, IndexNotFoundError, SearchService

__all__ = ["BotApplication", "build_application"]

log = logging.getLogger(__name__)

# AIORateLimiter waits out a 429's retry_after and tries again this many times.
FLOOD_RETRIES: Final = 3
RETENTION_INTERVAL_S: Final = 86_400.0  # retention runs daily
RETENTION_FIRST_S: Final = 600.0  # and first a while after start-up, not during it

BotApplication: TypeAlias = Application[
    ExtBot[int], BotContext, dict[Any, Any], dict[Any, Any], BotData, JobQueue[BotContext]
]


class PatientApplication(BotApplication):
    """The bot's Application: says once, in one line, that Telegram cannot be reached yet, and
    settles each update it processes for :class:`bot.intake.UpdateIntake`.

    ``run_polling(bootstrap_retries=-1)`` makes PTB retry :meth:`initialize` (its first
    call to Telegram) with growing pauses, up to 30 s apart, but it logs the failures only
    at DEBUG: without this line a bot started before the network is up looks hung.
    """

    _told_unreachable = False
    intake: UpdateIntake | None = None  # set by build_application
    # Handlers whose work must be stored before Telegram may forget the update: the watch's.
    durable_handlers: tuple[BaseHandler[Any, Any, Any], ...] = ()

    async def process_update(self, update: object) -> None:
        """Process ``update``, settling it when it may be acknowledged: at once, or after its
        durable handler ran (see :mod:`bot.intake`)."""
        if self.intake is None or not isinstance(update, Update):
            await super().process_update(update)
            return
        if not any(handler.check_update(update) for handler in self.durable_handlers):
            self.intake.settled(update.update_id)
        try:
            await super().process_update(update)
        finally:
            self.intake.settled(update.update_id)

    async def initialize(self) -> None:
        try:
            await super().initialize()
        except NetworkError as error:  # TimedOut is one
            if not self._told_unreachable:
                log.warning(
                    "Telegram cannot be reached (%s): trying again with growing pauses "
                    "until it can (Ctrl-C stops)",
                    error,
                )
                self._told_unreachable = True
            raise
        if self._told_unreachable:
            log.info("Telegram reached: starting")


def build_application(
    settings: BotSettings, *, engine_settings: EngineSettings | None = None
) -> BotApplication:
    """The bot, ready for ``run_polling()``; nothing is opened or contacted yet.

    ``engine_settings`` apply to a new index (an existing one keeps the settings it was built
    with); the default suits real collections.
    """
    intake = UpdateIntake()
    builder = (
        ApplicationBuilder()
        .application_class(PatientApplication)
        .token(settings.telegram.token.reveal())
        # PTB's own getUpdates request (one connection), held until the updates are taken in.
        .get_updates_request(AcknowledgingRequest(HTTPXRequest(connection_pool_size=1), intake))
        .context_types(ContextTypes(context=BotContext, bot_data=BotData))
        .defaults(
            Defaults(
                parse_mode=ParseMode.HTML,
                do_quote=True,  # answer in the thread of the request, in groups and forums
                allow_sending_without_reply=True,  # even if the request was deleted meanwhile
                link_preview_options=LinkPreviewOptions(is_disabled=True),
            )
        )
        .rate_limiter(AIORateLimiter(max_retries=FLOOD_RETRIES))
        .concurrent_updates(settings.runtime.concurrent_updates)
        .job_queue(JobQueue["BotContext"]())  # the daily retention job of the repost watch
        .post_init(functools.partial(_open_engine, engine_settings=engine_settings))
        .post_shutdown(_close_engine)
    )
    if settings.telegram.api_base_url is not None and settings.telegram.api_file_url is not None:
        builder = builder.base_url(settings.telegram.api_base_url).base_file_url(
            settings.telegram.api_file_url
        )
    application = builder.build()
    assert isinstance(application, PatientApplication)  # noqa: S101 - the class set above
    application.bot_data.settings = settings
    application.bot_data.access = AccessPolicy(settings.access)
    application.intake = intake
    application.durable_handlers = _add_handlers(application, settings)
    return application


def _add_handlers(
    application: BotApplication, settings: BotSettings
) -> tuple[BaseHandler[Any, Any, Any], ...]:
    """Register every handler; returns those whose work must be stored before an update is
    acknowledged (see :mod:`bot.intake`)."""
    new_message = filters.UpdateType.MESSAGE  # edits of old requests are not new requests
    image = PICTURES
    commanded = CaptionCommand("search") | CaptionCommand("add") | CaptionCommand("remove")
    if settings.access.allowed_chats:
        allowed = filters.Chat(chat_id=settings.access.allowed_chats | settings.access.admins)
        application.add_handler(MessageHandler(~allowed, handlers.refuse_chat), group=-1)
    application.add_handlers(
        [
            CommandHandler("start", handlers.start, filters=new_message),
            CommandHandler("help", handlers.help_command, filters=new_message),
            CommandHandler("stats", handlers.stats, filters=new_message),
            CommandHandler("search", handlers.search, filters=new_message),
            CommandHandler("add", handlers.add, filters=new_message),
            CommandHandler("remove", handlers.remove, filters=new_message),
            CommandHandler("watch", watching.watch_command, filters=new_message),
            CommandHandler("settings", watching.settings_command, filters=new_message),
            CommandHandler("forget", watching.forget_command, filters=new_message),
            CallbackQueryHandler(watching.settings_button, pattern=r"^settings:"),
            CallbackQueryHandler(watching.repost_button, pattern=r"^watch:"),
            MessageHandler(new_message & image & CaptionCommand("search"), handlers.search),
            MessageHandler(new_message & image & CaptionCommand("add"), handlers.add),
            MessageHandler(new_message & image & CaptionCommand("remove"), handlers.remove),
            # Any other image: searched in private chats; in groups only when it names the bot,
            # so a bot that is a group admin (and sees every photo) does not answer them all.
            MessageHandler(
                new_message & image & (filters.ChatType.PRIVATE | MentionsThisBot()),
                handlers.search,
            ),
        ]
    )
    # The watch sees every image of a group (new or with its photo edited) in a group of its
    # own, so that a photo mentioning the bot is both searched and watched. Photos sent with a
    # command are the command's: /add keeps them, and a later copy links to them.
    watch_intake = MessageHandler(
        (filters.UpdateType.MESSAGE | filters.UpdateType.EDITED_MESSAGE)
        & filters.ChatType.GROUPS
        & WATCHED_PICTURES
        & ~commanded,
        watching.watched_photo,
    )
    application.add_handler(watch_intake, group=1)
    application.add_error_handler(handlers.on_error)
    return (watch_intake,)


async def _open_engine(
    application: BotApplication, *, engine_settings: EngineSettings | None
) -> None:
    settings = required(application.bot_data.settings, "settings")
    pool = CpuPool.processes(settings.index.workers)
    try:
        application.bot_data.service = await _open_service(
            settings.index.dir, engine_settings=engine_settings, pool=pool
        )
    except BaseException:
        pool.shutdown(cancel_pending=True)
        raise
    application.bot_data.pool = pool  # the bot's, not the service's: shut down after it
    await application.bot.set_my_commands(
        [BotCommand(command, description) for command, description in replies.COMMANDS]
    )
    watch = RepostWatch(
        application.bot_data.service,
        application.bot,
        queue_size=settings.watch.queue_size,
        # One more than the CPU workers, so that one photo downloads while others compute.
        workers=pool.workers + 1,
        album_wait_s=settings.watch.album_wait_s,
        alert_admins=functools.partial(_tell_admins, application),
    )
    await watch.start()
    application.bot_data.watch = watch
    if application.job_queue is None:
        raise RuntimeError("the job queue is missing: install python-telegram-bot[job-queue]")
    application.job_queue.run_repeating(
        _apply_retention, interval=RETENTION_INTERVAL_S, first=RETENTION_FIRST_S, name="retention"
    )


async def _apply_retention(context: BotContext) -> None:
    """The daily job: every chat forgets the photos older than its retention setting."""
    await context.watch.apply_retention()


async def _tell_admins(application: BotApplication, text: str) -> None:
    """A note to the bot admins (at most a few an hour, shared with error alerts)."""
    settings = required(application.bot_data.settings, "settings")
    if not settings.access.admins or application.bot_data.admin_alerts.acquire("watch") > 0:
        return
    for admin in sorted(settings.access.admins):
        try:
            await application.bot.send_message(admin, text)
        except TelegramError as failure:
            log.warning("could not tell admin %s: %s", admin, failure)


async def _close_engine(application: BotApplication) -> None:
    watch = application.bot_data.watch
    if watch is not None:
        application.bot_data.watch = None
        await watch.stop()
    service, application.bot_data.service = application.bot_data.service, None
    if service is not None:  # None: post_init failed before opening it
        await service.close()
        log.info("search service closed")
    pool, application.bot_data.pool = application.bot_data.pool, None
    if pool is not None:
        pool.shutdown(cancel_pending=True)


async def _open_service(
    index_dir: Path, *, engine_settings: EngineSettings | None, pool: CpuPool
) -> SearchService:
    """The index in ``index_dir``, or a new empty one if there is none yet (logged).

    Raises:
        IndexStateError: the index cannot be used (incompatible, damaged beyond repair).
        CatalogError: its catalog cannot be opened.
    """
    try:
        service = await SearchService.open(index_dir, settings=engine_settings, pool=pool)
    except IndexNotFoundError:
        log.warning(
            "no index in %s yet: starting with an empty collection. Add photos with /add in "
            "a chat, or index a folder: `python -m indexer build PHOTOS --index %s`",
            index_dir,
            index_dir,
        )
        service = await SearchService.open(
            index_dir, settings=engine_settings, pool=pool, create=True
        )
    report = await service.stats()
    log.info(
        "serving %d photos from %s (worker processes: %d)", report.images, index_dir, pool.workers
    )
    return service
