"""Entry point: ``python -m bot --config config.toml`` (also ``imgsearch-bot``).

Settings are read and checked, logging is set up (with the token masked), and the bot polls
until SIGINT/SIGTERM. Anything that keeps it from starting ends the process with one sentence
saying what to fix and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, TextIO

from telegram import Update
from telegram.error import InvalidToken

from bot.app import build_application
from bot.settings import SettingsError, load_settings
from indexer import CatalogError, IndexStateError

EXIT_OK: Final = 0
EXIT_CANNOT_START: Final = 2
_LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that print a line per HTTP request (with the token in the URL) at INFO.
_CHATTY_LOGGERS: Final = ("httpx", "httpcore")


class RedactingFormatter(logging.Formatter):
    """Masks secrets anywhere in a formatted record, tracebacks included."""

    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self._secrets = [secret for secret in secrets if secret]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "[secret]")
        return text


class StartUpAbortFilter(logging.Filter):
    """Drops PTB's traceback of an aborted start-up retry loop (a refused token): PTB logs it
    before raising, and :func:`main` then says what to fix in one sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and "Network Retry Loop (Bootstrap" in record.getMessage())


def configure_logging(
    level: str, *, secrets: Iterable[str], stream: TextIO | None = None
) -> logging.Handler:
    """Log to ``stream`` (default stderr) at ``level`` with ``secrets`` masked; return the
    handler added to the root logger."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(RedactingFormatter(_LOG_FORMAT, secrets))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # PTB's retry loops log through the "telegram.ext" logger itself.
    logging.getLogger("telegram.ext").addFilter(StartUpAbortFilter())
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        settings = load_settings(arguments.config)
    except SettingsError as error:
        return _cannot_start(str(error))
    configure_logging(settings.runtime.log_level, secrets=[settings.telegram.token.reveal()])
    application = build_application(settings)
    try:
        application.run_polling(
            allowed_updates=[Update.MESSAGE, Update.EDITED_MESSAGE, Update.CALLBACK_QUERY],
            # A bot started before the network is up waits for it: PTB retries reaching
            # Telegram with growing pauses (up to 30 s), and the Application says so once.
            bootstrap_retries=-1,
        )
    except InvalidToken:
        return _cannot_start(
            "Telegram refused the bot token: check [telegram] token or TELEGRAM_BOT_TOKEN "
            "(@BotFather shows it with /token)."
        )
    except (IndexStateError, CatalogError) as error:
        return _cannot_start(
            f"The index in {settings.index.dir} cannot be used: {error.user_message} ({error})"
        )
    except OSError as error:
        return _cannot_start(
            f"The index folder {settings.index.dir} cannot be used: {error}. Check that it "
            "exists and that this user may write to it."
        )
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot", description="Run the Telegram bot that finds similar photos."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("config.toml"),
        help="settings file (default: config.toml; see config.example.toml)",
    )
    return parser


def _cannot_start(sentence: str) -> int:
    print(f"imgsearch-bot cannot start: {sentence}", file=sys.stderr)
    return EXIT_CANNOT_START


if __name__ == "__main__":
    sys.exit(main())
