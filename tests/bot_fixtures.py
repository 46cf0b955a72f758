"""Helpers for the bot's end-to-end tests: settings pointing at the emulator, the bot run as
``run_polling`` runs it, small real indexes, and edited CC0 photos to search with.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from conftest import jpeg_bytes, photo_array
from PIL import Image

from bot.app import BotApplication, build_application
from bot.settings import BotSettings, parse_settings
from indexer.settings import EngineSettings
from testsupport.engine import build_collection
from testsupport.telegram_emulator import SentMessage, TelegramEmulator, polling

# A tiny collection cannot train a 256-dimension codebook; 32 is plenty for a dozen photos.
TEST_ENGINE: Final = EngineSettings(dimensions=32)
# Searches take a second or two on a loaded 2-core machine; the deadline only ends a hung test.
REPLY_DEADLINE_S: Final = 60.0


def bot_settings(
    emu: TelegramEmulator, index_dir: Path, **sections: Mapping[str, Any]
) -> BotSettings:
    """Settings for a bot talking to ``emu`` with its index in ``index_dir``, validated the way
    a config file is; ``sections`` override keys, e.g. ``access={"admins": [1]}``."""
    document: dict[str, dict[str, Any]] = {
        "telegram": {
            "token": emu.token,
            "api_base_url": emu.api_base_url,
            "api_file_url": emu.file_base_url,
        },
        "index": {"dir": str(index_dir), "workers": 2},
        "search": {"top_n": 5, "min_score": 0.0},
        "access": {"queries_per_minute": 0},
        "runtime": {"concurrent_updates": 8, "notify_admins_on_error": False},
    }
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    return parse_settings(document, environ={}, base_dir=index_dir.parent)


def make_bot(settings: BotSettings) -> BotApplication:
    return build_application(settings, engine_settings=TEST_ENGINE)


@contextlib.asynccontextmanager
async def running(application: BotApplication) -> AsyncIterator[BotApplication]:
    """Run the bot as ``run_polling`` does: initialize, post_init, poll; then stop (letting
    updates in flight finish), shut down and post_shutdown, even when the block fails."""
    async with application:
        if application.post_init is not None:
            await application.post_init(application)
        try:
            async with polling(application):
                yield application
        finally:
            if application.post_shutdown is not None:
                await application.post_shutdown(application)


def build_test_index(photos: Iterable[Path], index_dir: Path) -> Path:
    """An offline collection of ``photos`` in ``index_dir`` (built outside any event loop)."""
    return build_collection(photos, index_dir, settings=TEST_ENGINE)


def edited_photo(name: str, *, angle: float = 4.0, keep: float = 0.8, quality: int = 85) -> bytes:
    """A CC0 photo cropped to its central ``keep`` share of each side, rotated by ``angle``
    degrees and recompressed: a different file showing the same picture."""
    picture = Image.fromarray(photo_array(name))
    width, height = picture.size
    left, top = round(width * (1 - keep) / 2), round(height * (1 - keep) / 2)
    cropped = picture.crop((left, top, width - left, height - top))
    rotated = cropped.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
    buffer = io.BytesIO()
    rotated.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def photo_bytes(name: str) -> bytes:
    """A CC0 photo as a JPEG file, as a phone would send it."""
    return jpeg_bytes(photo_array(name))


def oversized_photo(name: str, side: int) -> bytes:
    """A CC0 photo upscaled to ``side`` x ``side`` pixels (JPEG)."""
    picture = Image.fromarray(photo_array(name)).resize((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def captions(messages: Iterable[SentMessage]) -> list[str]:
    """The visible captions (or texts) of the bot's messages."""
    return [message.text or "" for message in messages]
