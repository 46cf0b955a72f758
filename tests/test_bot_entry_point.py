"""The real entry point, ``python -m bot``, as a process: start-up, serving, SIGTERM."""

from __future__ import annotations

from pathlib import Path

from bot_fixtures import REPLY_DEADLINE_S, photo_bytes
from reliability_helpers import BotProcess

from testsupport.telegram_emulator import TelegramEmulator


async def test_the_bot_process_serves_until_sigterm_then_stops_cleanly(
    emu: TelegramEmulator, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        "[telegram]\n"
        f'api_base_url = "{emu.api_base_url}"\n'
        f'api_file_url = "{emu.file_base_url}"\n'
        "[index]\n"
        'dir = "index"\n'
        "workers = 1\n"
    )
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    bot = await BotProcess.start(config, emu.token)
    try:
        emu.user_sends_text(chat, alice, "/start")
        emu.user_sends_photo(chat, alice, photo_bytes("coffee"), caption="/add")
        replies = await emu.wait_for_messages(chat, 2, timeout=REPLY_DEADLINE_S)
    finally:
        status, stderr = await bot.stop()

    assert status == 0, stderr
    texts = sorted(reply.text or "" for reply in replies)
    assert texts[0].startswith("✅ Added as #1.")
    assert texts[1].startswith("👋")
    assert "starting with an empty collection" in stderr
    assert "search service closed" in stderr
    assert "Traceback" not in stderr
    assert emu.token not in stderr
    assert (tmp_path / "index" / "catalog.sqlite").exists()
    polls = emu.calls_of("getUpdates")
    assert polls[0].params["allowed_updates"] == ["message", "edited_message", "callback_query"]
