"""The real entry point, ``python -m bot``, as a process: start-up, serving, SIGTERM."""

from __future__ import annotations

import asyncio
import socket
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


def unused_port() -> int:
    """A port of 127.0.0.1 nothing listens on (until a test starts something there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_bot_started_before_the_network_says_so_once_and_starts_when_it_is_up(
    tmp_path: Path,
) -> None:
    port = unused_port()
    config = tmp_path / "config.toml"
    config.write_text(
        "[telegram]\n"
        f'api_base_url = "http://127.0.0.1:{port}/bot"\n'
        f'api_file_url = "http://127.0.0.1:{port}/file/bot"\n'
        "[index]\n"
        'dir = "index"\n'
        "workers = 1\n"
    )
    emu = TelegramEmulator()
    bot = await BotProcess.start(config, emu.token)
    try:
        await asyncio.sleep(4.0)  # connections refused: PTB retries after 1, 1.5, 2.25 s ...
        alive_while_offline = bot.process.returncode is None
        await emu.start(port=port)  # the network is up
        alice = emu.create_user("Alice")
        chat = emu.private_chat(alice)
        emu.user_sends_text(chat, alice, "/start")
        [reply] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S + 30.0)
    finally:
        status, stderr = await bot.stop()
        await emu.stop()

    assert alive_while_offline, stderr
    assert status == 0, stderr
    assert (reply.text or "").startswith("👋")
    told = [line for line in stderr.splitlines() if "Telegram cannot be reached" in line]
    assert len(told) == 1, stderr
    assert "Traceback" not in stderr
    assert "Telegram reached: starting" in stderr
