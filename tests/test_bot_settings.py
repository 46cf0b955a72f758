"""The bot's settings: the example file, validation messages, the secret token, start-up."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bot_fixtures import REPLY_DEADLINE_S, bot_settings, edited_photo, make_bot, running

from bot.__main__ import EXIT_CANNOT_START, RedactingFormatter, configure_logging, main
from bot.settings import Secret, SettingsError, load_settings, parse_settings
from testsupport.telegram_emulator import TelegramEmulator

REPOSITORY = Path(__file__).resolve().parent.parent
EXAMPLE = REPOSITORY / "config.example.toml"
TOKEN = "123456789:FAKE-token-made-up-for-tests_0123456789"  # noqa: S105 - not a real one


def settings_from(document: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    return parse_settings(document, environ=environ or {}, base_dir=Path("/srv/bot"))


def with_token(**sections: dict[str, Any]) -> dict[str, Any]:
    return {"telegram": {"token": TOKEN}, **sections}


def test_the_example_file_is_valid_and_documents_the_defaults() -> None:
    example = load_settings(EXAMPLE, environ={"TELEGRAM_BOT_TOKEN": TOKEN})
    defaults = parse_settings({"telegram": {"token": TOKEN}}, environ={}, base_dir=EXAMPLE.parent)

    assert example == defaults
    assert example.index.dir == REPOSITORY / "data" / "index"
    assert example.search.top_n == 5
    assert example.access.add_policy == "everyone"
    assert example.telegram.api_base_url is None


def test_the_environment_token_wins_over_the_file() -> None:
    other = "987654321:AAFxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
    settings = settings_from(with_token(), environ={"TELEGRAM_BOT_TOKEN": other})

    assert settings.telegram.token.reveal() == other


def test_the_token_is_hidden_from_reprs() -> None:
    settings = settings_from(with_token())

    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings.telegram.token)
    assert settings.telegram.token == Secret(TOKEN)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({}, "No bot token: set the TELEGRAM_BOT_TOKEN environment variable or [telegram] token"),
        (with_token(search={"top_n": 11}), "[search] top_n must be a whole number from 1 to 10"),
        (with_token(search={"top_n": "5"}), "[search] top_n must be a whole number"),
        (with_token(search={"min_score": 1.5}), "[search] min_score must be a number from 0 to 1"),
        (with_token(search={"top": 3}), "[search] has no key 'top'; did you mean 'top_n'?"),
        (with_token(serch={"top_n": 3}), "There is no section [serch]; did you mean 'search'?"),
        (with_token(access={"add_policy": "anyone"}), "[access] add_policy must be one of"),
        (with_token(access={"admins": ["@me"]}), "[access] admins must be a list of user ids"),
        (with_token(access={"admins": 5}), "[access] admins must be a list of user ids"),
        (with_token(runtime={"log_level": "LOUD"}), "[runtime] log_level must be one of"),
        (with_token(runtime={"concurrent_updates": 0}), "[runtime] concurrent_updates must be"),
        (with_token(index={"workers": -1}), "[index] workers must be a whole number from 0"),
        (with_token(index="data"), "[index] must be a table"),
        (
            {"telegram": {"token": TOKEN, "api_base_url": "http://localhost:8081/bot"}},
            "api_base_url and api_file_url go together",
        ),
        (
            {"telegram": {"token": TOKEN, "api_base_url": "localhost", "api_file_url": "x"}},
            "[telegram] api_base_url must start with http:// or https://",
        ),
    ],
)
def test_each_mistake_is_reported_with_what_to_fix(document: dict[str, Any], expected: str) -> None:
    with pytest.raises(SettingsError) as raised:
        settings_from(document)

    assert expected in str(raised.value)
    assert str(raised.value).endswith((".", "?"))


def test_a_malformed_token_is_refused_without_being_repeated() -> None:
    typo = "123456789-FAKE-token-made-up-for-tests_0123456789"
    with pytest.raises(SettingsError) as raised:
        settings_from({"telegram": {"token": typo}})

    assert "does not look like one from @BotFather" in str(raised.value)
    assert typo not in str(raised.value)
    assert "made-up" not in str(raised.value)


def test_unreadable_files_and_folders_are_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[search]\ntop_n = \n")
    blocked = tmp_path / "blocked.toml"
    (tmp_path / "index-file").write_text("not a folder")
    blocked.write_text(f'[telegram]\ntoken = "{TOKEN}"\n[index]\ndir = "index-file"\n')

    with pytest.raises(SettingsError, match=r"does not exist: copy config\.example\.toml"):
        load_settings(tmp_path / "missing.toml", environ={})
    with pytest.raises(SettingsError, match=r"is not valid TOML"):
        load_settings(broken, environ={})
    with pytest.raises(SettingsError, match=r"\[index\] dir is .*index-file, which is a file"):
        load_settings(blocked, environ={})


def test_main_cannot_start_without_a_token_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    config = tmp_path / "config.toml"
    config.write_text("[search]\ntop_n = 3\n")

    status = main(["--config", str(config)])

    assert status == EXIT_CANNOT_START
    error = capsys.readouterr().err
    assert error.startswith("imgsearch-bot cannot start: No bot token")
    assert error.count("\n") == 1  # one sentence, no traceback


def test_the_log_formatter_masks_secrets_even_in_tracebacks() -> None:
    formatter = RedactingFormatter("%(message)s", [TOKEN])
    error = ConnectionError(f"POST https://api.telegram.org/bot{TOKEN}/getMe failed")
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "calling %s", (TOKEN,), (type(error), error, None)
    )

    text = formatter.format(record)

    assert TOKEN not in text
    assert text.count("[secret]") == 2


@pytest.fixture
def bot_logging(emu: TelegramEmulator) -> Iterator[io.StringIO]:
    """The bot's own logging set-up (as main() does it) at DEBUG into a buffer; undone after."""
    names = ("", "httpx", "httpcore")
    levels = {name: logging.getLogger(name).level for name in names}
    stream = io.StringIO()
    handler = configure_logging("DEBUG", secrets=[emu.token], stream=stream)
    yield stream
    logging.getLogger().removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_the_token_never_reaches_the_logs(
    emu: TelegramEmulator,
    tmp_path: Path,
    bot_logging: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, tmp_path / "index"))):
        emu.user_sends_photo(chat, alice, edited_photo("astronaut"), caption="/add")
        await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(chat, alice, edited_photo("astronaut", angle=-4))
        await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    logged = bot_logging.getvalue()
    assert "starting with an empty collection" in logged
    # PTB's DEBUG lines name the API URL, token included: the bot's handler masks it.
    assert "/bot[secret]" in logged
    assert emu.token not in logged
    assert emu.token.split(":")[1] not in logged
    # At INFO and above (the default level) nothing carries the token in the first place:
    # httpx, which logs every request URL at INFO, is quietened.
    assert caplog.records
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            assert emu.token not in record.getMessage(), record.name
