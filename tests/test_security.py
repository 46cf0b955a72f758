"""Security: chats are isolated from each other, only configured roles change collections,
names and captions from users are inert (no path escape, no SQL, no markup), the bot token stays
out of logs and messages, and the resource limits hold.

Everything goes through the real bot (python-telegram-bot against the Bot API emulator, whose
HTML parser turns unescaped markup into entities or refusals, as Telegram does) and, for
isolation, through the library as well.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bad_inputs import png_header_only
from bot_fixtures import REPLY_DEADLINE_S, bot_settings, edited_photo, photo_bytes, running
from conftest import jpeg_bytes
from engine_fixtures import shapes_jpeg
from PIL import Image
from reliability_helpers import (
    FAST_ENGINE,
    BotProcess,
    build_template_index,
    catalog_health,
    files_under,
    leaks,
    original_files,
    replies_by_request,
    report_figures,
    service_of,
    write_bot_config,
)

from bot import replies
from bot.app import BotApplication, build_application
from bot.settings import BotSettings
from indexer.catalog import GLOBAL_SCOPE
from indexer.errors import ImageTooLargeError, NotFoundError
from indexer.settings import EngineSettings
from testsupport.telegram_emulator import EmulatedChat, SentMessage, TelegramEmulator

CHAT_A = -5001
CHAT_B = -5002
PRIVATE = 424242
# Offline files whose names hold markup: captions must show them literally.
MARKUP_NAMES = {"coffee": '<u>cat<u> & "dog" &amp;', "rocket": "*stars* _under_ [x](y) `t`"}
COLLECTION = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")
HOSTILE_NAME = "<b>Eve</b> & '; DROP TABLE images; --"
HOSTILE_LAST_NAME = "*bold* _it_ [l](http://e.example) </code>"
ADDED_AS = re.compile(r"^✅ Added as #(\d+)\.")
ORIGINAL_NAME = re.compile(r"^originals/([0-9a-f]{2})/\1[0-9a-f]{62}\.(jpg|png|webp|bmp|tif|gif)$")


def stem_of(name: str) -> str:
    return MARKUP_NAMES.get(name, name)


@pytest.fixture(scope="module")
def template_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("security")
    return build_template_index(photos_dir, root, COLLECTION, saved_as=stem_of)


@pytest.fixture
def index(template_index: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template_index, tmp_path / "index"))


def make_bot(settings: BotSettings, engine: EngineSettings = FAST_ENGINE) -> BotApplication:
    return build_application(settings, engine_settings=engine)


def drawing(seed: int) -> bytes:
    return shapes_jpeg(seed, (240, 180))


async def answer(emu: TelegramEmulator, chat: EmulatedChat, request: dict[str, Any]) -> list[str]:
    """The texts of the bot's reply to ``request`` (several for an album)."""
    key = (chat.id, int(request["message_id"]))
    await emu.wait_for(
        lambda _: key in replies_by_request(emu.messages_sent(chat)), timeout=REPLY_DEADLINE_S
    )
    return [m.text or "" for m in replies_by_request(emu.messages_sent(chat))[key]]


async def answers_to(
    emu: TelegramEmulator, requests: dict[str, tuple[EmulatedChat, dict[str, Any]]]
) -> dict[str, list[SentMessage]]:
    """The bot's replies to requests sent at once (they are served concurrently)."""
    keys = {
        label: (chat.id, int(request["message_id"])) for label, (chat, request) in requests.items()
    }

    def all_answered(_: object) -> bool:
        return set(keys.values()) <= set(replies_by_request(emu.messages_sent()))

    await emu.wait_for(all_answered, timeout=REPLY_DEADLINE_S)
    answered = replies_by_request(emu.messages_sent())
    return {label: answered[key] for label, key in keys.items()}


def texts_of(messages: list[SentMessage]) -> list[str]:
    return [message.text or "" for message in messages]


def ids_in(texts: list[str]) -> set[int]:
    found = (replies.image_id_in(text) for text in texts)
    return {image_id for image_id in found if image_id is not None}


def added_id(texts: list[str]) -> int:
    [text] = texts
    found = ADDED_AS.match(text)
    assert found is not None, text
    return int(found.group(1))


# --- chat isolation: the library -----------------------------------------------------------------


async def test_the_library_never_shows_or_removes_a_chats_photo_elsewhere(index: Path) -> None:
    photo = photo_bytes("horse")
    async with service_of(index) as service:
        added = await service.add(photo, scope=CHAT_A)
        query = edited_photo("horse")
        seen = {
            scope: [m.image.id for m in await service.query(query, scope=scope, top=10)]
            for scope in (CHAT_A, CHAT_B, PRIVATE, GLOBAL_SCOPE)
        }
        top_id = await service.catalog.max_id()
        refused = 0
        for guess in range(1, top_id + 5):  # every id there is, and a few that are not
            for scope in (CHAT_B, PRIVATE):
                with pytest.raises(NotFoundError):
                    await service.remove(guess, scope=scope)
                refused += 1
        still = await service.query(query, scope=CHAT_A, top=1)
        count = await service.catalog.count()

    assert seen[CHAT_A][0] == added.image.id
    for scope in (CHAT_B, PRIVATE, GLOBAL_SCOPE):
        assert added.image.id not in seen[scope]
    assert (still[0].image.id, still[0].verified) == (added.image.id, True)
    assert count == len(COLLECTION) + 1
    report_figures("security-library-isolation", removal_guesses_refused=refused)


async def test_a_chat_removing_its_copy_keeps_another_chats_copy_whole(index: Path) -> None:
    """The same bytes added in two chats share one file under originals/."""
    photo = photo_bytes("horse")
    async with service_of(index) as service:
        first = await service.add(photo, scope=CHAT_A)
        second = await service.add(photo, scope=CHAT_B)
        await service.remove(second.image.id, scope=CHAT_B)
        [found] = await service.query(edited_photo("horse"), scope=CHAT_A, top=1)
        kept = service.resolve_path(first.image)

    assert second.created
    assert first.image.path == second.image.path
    assert (found.image.id, found.verified) == (first.image.id, True)
    assert kept.exists()


# --- chat isolation, names and captions: the bot -------------------------------------------------


async def test_the_bot_keeps_chats_apart_and_user_text_inert(
    emu: TelegramEmulator, index: Path, tmp_path: Path
) -> None:
    alice = emu.create_user("Alice")
    eve = emu.create_user(HOSTILE_NAME, last_name=HOSTILE_LAST_NAME)
    bob = emu.create_user("Bob")
    carol = emu.create_user("Carol")
    group_a = emu.create_group("A", [alice, eve])
    group_b = emu.create_group("B", [alice, bob])
    emu.set_member_status(group_b, bob, "administrator")
    private = emu.private_chat(carol)
    before = outside_index(tmp_path)
    async with running(make_bot(bot_settings(emu, index))):
        # Group A grows its collection, with hostile file names, captions and sender names.
        added = await answers_to(emu, {
            "horse": (group_a, emu.user_sends_document(
                group_a, alice, photo_bytes("horse"), file_name="../../escape.jpg",
                mime_type="image/jpeg", caption="/add")),
            "drawing": (group_a, emu.user_sends_document(
                group_a, alice, drawing(1), file_name="'; DROP TABLE images; --.jpg",
                mime_type="image/jpeg",
                caption="/add '; DROP TABLE images; -- <script>x</script>")),
            "moon": (group_a, emu.user_sends_photo(
                group_a, eve, photo_bytes("moon"), caption="/add")),
        })  # fmt: skip
        horse, drawing_id, moon_id = (added_id(texts_of(added[k])) for k in added)
        ours = {horse, drawing_id, moon_id}

        # Elsewhere, none of them is ever shown, removable or distinguishable from nothing.
        photo_in_b = emu.user_sends_photo(group_b, alice, photo_bytes("horse"))
        requests = {
            "search in group B": (group_b, emu.user_sends_photo(
                group_b, alice, edited_photo("horse"), caption="/search")),
            "search in private": (private, emu.user_sends_photo(
                private, carol, edited_photo("horse"))),
            "nothing": (group_b, emu.user_sends_text(group_b, bob, "/remove 99999")),
            "by photo": (group_b, emu.user_sends_text(
                group_b, bob, "/remove", reply_to=photo_in_b)),
        }  # fmt: skip
        # Every id there is (and more) from a private chat; group A's ids from group B too. (A
        # group gets 20 messages a minute from a bot: PTB's rate limiter makes the rest wait.)
        for guess in range(1, max(ours) + 3):
            requests[f"guess {guess} in private"] = (
                private, emu.user_sends_text(private, carol, f"/remove {guess}")
            )  # fmt: skip
        for guess in sorted(ours):
            requests[f"guess {guess} in group"] = (
                group_b, emu.user_sends_text(group_b, bob, f"/remove {guess}")
            )  # fmt: skip
        for number, text in enumerate(
            ("/remove 1; DROP TABLE images", "/remove 1 OR 1=1", "/remove '1'")
        ):
            requests[f"injection {number}"] = (private, emu.user_sends_text(private, carol, text))
        elsewhere = {label: texts_of(m) for label, m in (await answers_to(emu, requests)).items()}

        # Back in group A, everything is still there, shown with literal names.
        back = await answers_to(emu, {
            "horse": (group_a, emu.user_sends_photo(
                group_a, alice, edited_photo("horse"), caption="/search")),
            "moon": (group_a, emu.user_sends_photo(
                group_a, alice, edited_photo("moon"), caption="/search")),
            **{
                name: (private, emu.user_sends_photo(private, carol, edited_photo(name)))
                for name in MARKUP_NAMES
            },
        })  # fmt: skip

    searches = {k: v for k, v in elsewhere.items() if k.startswith("search")}
    guesses = {k: v[0] for k, v in elsewhere.items() if k.startswith("guess")}
    injections = [v[0] for k, v in elsewhere.items() if k.startswith("injection")]
    nothing = elsewhere["nothing"][0]
    removal_by_photo = elsewhere["by photo"]
    in_a = {name: back[name] for name in ("horse", "moon")}
    offline = {name: back[name] for name in MARKUP_NAMES}

    for where, texts in searches.items():
        assert ids_in(texts).isdisjoint(ours), where
        assert not any("same picture" in text for text in texts), (where, texts)
    not_found = f"⚠️ {NotFoundError.user_message}"
    assert nothing == not_found
    for label, text in guesses.items():
        if int(label.split()[1]) in ours:
            assert text == nothing, (label, text)  # as if it did not exist
        else:
            assert text in {nothing, "🔒 Only the admins can remove photos here."}, text
    assert removal_by_photo == [not_found]
    assert all("/remove ID" in text for text in injections), injections

    # The photos of group A are all there and found; names are shown as typed.
    health = catalog_health(index)
    assert health.problems == []
    assert health.images == len(COLLECTION) + 3
    [horse_first, *_] = in_a["horse"]
    assert (horse_first.text or "").startswith("1. ✅ same picture")
    assert f"#{horse}\n" in (horse_first.text or "")
    [moon_first, *_] = in_a["moon"]
    assert f"#{moon_id}\n" in (moon_first.text or "")
    assert f"added by {HOSTILE_NAME} {HOSTILE_LAST_NAME} on " in (moon_first.text or "")
    assert formatting(moon_first) <= {"bold"}  # only the bot's own "same picture" mark
    for name, messages in offline.items():
        first = messages[0]
        assert (first.text or "").endswith(f"📁 {MARKUP_NAMES[name]}.jpg"), first.text
        assert formatting(first) <= {"bold"}

    # Files: named by content under originals/, nothing written anywhere else.
    assert all(ORIGINAL_NAME.match(path) for path in original_files(index)), original_files(index)
    assert outside_index(tmp_path) == before
    assert not any("escape" in name or "DROP" in name for name in files_under(tmp_path))
    every_text = [m.text or "" for m in emu.messages_sent()]
    leaked = [t for t in every_text if leaks(t, str(tmp_path))]
    report_figures(
        "security-bot-isolation",
        searches_elsewhere=len(searches),
        removal_guesses=len(guesses),
        removal_by_photo=len(removal_by_photo),
        injection_commands=len(injections),
        hostile_names=1 + len(MARKUP_NAMES) + 2,
        leaked=len(leaked),
    )
    assert leaked == []


def outside_index(root: Path) -> set[str]:
    return {name for name in files_under(root) if not name.startswith("index/")}


def formatting(message: SentMessage) -> set[str]:
    """The entity types Telegram would render in a message (links aside)."""
    entities = message.message.get("caption_entities", message.message.get("entities", []))
    return {entity["type"] for entity in entities if entity["type"] != "text_link"}


# --- roles ---------------------------------------------------------------------------------------

LOCKED = "🔒 Only the admins can {} photos here."


@pytest.mark.parametrize("policy", ["admins", "chat_admins"])
async def test_only_configured_roles_add_or_remove(
    emu: TelegramEmulator, index: Path, policy: str
) -> None:
    owner = emu.create_user("Owner")
    member = emu.create_user("Member")
    chat_admin = emu.create_user("Chat admin")
    group = emu.create_group("Club", [owner, member, chat_admin])
    emu.set_member_status(group, chat_admin, "administrator")
    member_private = emu.private_chat(member)
    settings = bot_settings(emu, index, access={"add_policy": policy, "admins": [owner.id]})
    outcome: dict[str, str] = {}
    async with running(make_bot(settings)):
        for label, user, seed in (
            ("member adds", member, 1), ("chat admin adds", chat_admin, 2), ("owner adds", owner, 3)
        ):  # fmt: skip
            sent = emu.user_sends_photo(group, user, drawing(seed), caption="/add")
            outcome[label] = (await answer(emu, group, sent))[0]
        downloads_after_adds = len(emu.calls_of("getFile"))
        sent = emu.user_sends_photo(member_private, member, drawing(4), caption="/add")
        outcome["member adds in private"] = (await answer(emu, member_private, sent))[0]
        group_photo = replies.image_id_in(outcome["owner adds"])
        for label, user, target in (
            ("member removes", member, group_photo),
            ("chat admin removes a collection photo", chat_admin, 1),
            ("chat admin removes", chat_admin, group_photo),
            ("owner removes a collection photo", owner, 2),
        ):
            sent = emu.user_sends_text(group, user, f"/remove {target}")
            outcome[label] = (await answer(emu, group, sent))[0]

    chat_admins_add = policy == "chat_admins"
    assert outcome["member adds"] == LOCKED.format("add")
    assert outcome["chat admin adds"].startswith("✅") is chat_admins_add
    assert outcome["owner adds"].startswith("✅ Added as #")
    assert outcome["member adds in private"].startswith("✅") is chat_admins_add
    if not chat_admins_add:
        assert outcome["chat admin adds"] == LOCKED.format("add")
        assert outcome["member adds in private"] == LOCKED.format("add")
    # A refused add is refused before the photo is downloaded.
    assert downloads_after_adds == 1 + chat_admins_add
    assert outcome["member removes"] == LOCKED.format("remove")
    assert outcome["chat admin removes a collection photo"] == LOCKED.format("remove")
    assert outcome["chat admin removes"] == f"🗑 Removed #{group_photo}."
    assert outcome["owner removes a collection photo"] == "🗑 Removed #2."
    assert catalog_health(index).images == len(COLLECTION) + 1 + 2 * chat_admins_add - 2
    report_figures(f"security-roles-{policy}", checks=len(outcome))


# --- the token -----------------------------------------------------------------------------------


async def test_the_token_never_appears_in_logs_or_messages_of_a_whole_session(
    emu: TelegramEmulator, index: Path, tmp_path: Path
) -> None:
    (index / "originals").write_bytes(b"")  # every add fails: a traceback gets logged
    owner = emu.create_user("Owner")
    alice = emu.create_user("Alice")
    owner_chat, chat = emu.private_chat(owner), emu.private_chat(alice)
    config = write_bot_config(
        tmp_path / "config.toml", emu, index, log_level="DEBUG", notify_admins=True,
        access=f"admins = [{owner.id}]\nqueries_per_minute = 0",
    )  # fmt: skip
    bot = await BotProcess.start(config, emu.token)
    try:
        search = await answer(emu, chat, emu.user_sends_photo(chat, alice, edited_photo("chelsea")))
        failure = await answer(
            emu, chat, emu.user_sends_photo(chat, alice, drawing(5), caption="/add")
        )
        [alert] = await emu.wait_for_messages(owner_chat, 1, timeout=REPLY_DEADLINE_S)
    finally:
        status, log = await bot.stop()
    secret = emu.token.split(":", 1)[1]

    texts = [m.text or "" for m in emu.messages_sent()]
    token_found = sum(secret in line for line in [*log.splitlines(), *texts])
    report_figures("security-token", log_lines=len(log.splitlines()), token_found=token_found)

    assert status == 0, log
    assert search[0].startswith("1. ✅ same picture")
    assert failure[0].startswith("😵")
    assert "Traceback" in log  # the failure was logged in full ...
    assert "DEBUG" in log  # ... at the most talkative level
    assert token_found == 0
    assert (alert.text or "").startswith("🚨")


async def test_a_refused_token_is_not_repeated_when_the_bot_cannot_start(
    emu: TelegramEmulator, index: Path, tmp_path: Path
) -> None:
    config = write_bot_config(tmp_path / "config.toml", emu, index)
    wrong = f"{emu.bot_user.id}:AAHwrongWrongWrongWrongWrongWrong_0123"
    bot = await BotProcess.start(config, wrong)
    status = await asyncio.wait_for(bot.process.wait(), REPLY_DEADLINE_S)
    _, log = await bot.stop()

    assert status == 2
    assert "cannot start: Telegram refused the bot token" in log
    assert wrong.split(":")[1] not in log


# --- resource limits -----------------------------------------------------------------------------


async def test_download_size_pixel_count_byte_count_and_query_rate_are_limited(
    emu: TelegramEmulator, index: Path
) -> None:
    limits = dataclasses.replace(FAST_ENGINE, max_pixels=300_000, max_file_bytes=150_000)
    owner = emu.create_user("Owner")
    alice = emu.create_user("Alice")
    bob = emu.create_user("Bob")
    owner_chat, alice_chat, bob_chat = (emu.private_chat(u) for u in (owner, alice, bob))
    settings = bot_settings(emu, index, access={"admins": [owner.id], "queries_per_minute": 2})
    rng = np.random.default_rng(8)
    many_pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).resize(
        (800, 600)))  # fmt: skip
    many_bytes = jpeg_bytes(rng.integers(0, 256, (400, 400, 3), np.uint8), 95)
    assert len(many_bytes) > limits.max_file_bytes
    async with running(make_bot(settings, limits)):
        size = emu.user_sends_oversized_document(
            owner_chat, owner, file_size=21 * 2**20, file_name="scan.tif", mime_type="image/tiff"
        )
        bomb = emu.user_sends_document(
            owner_chat, owner, png_header_only(30_000, 30_000), file_name="bomb.png",
            mime_type="image/png",
        )  # fmt: skip
        pixels = emu.user_sends_photo(owner_chat, owner, jpeg_bytes(many_pixels, 90))
        heavy = emu.user_sends_document(
            owner_chat, owner, many_bytes, file_name="heavy.jpg", mime_type="image/jpeg"
        )
        limited = {
            name: (await answer(emu, owner_chat, request))[0]
            for name, request in (
                ("size", size), ("bomb", bomb), ("pixels", pixels), ("bytes", heavy)
            )
        }  # fmt: skip
        downloads_by_owner = len(emu.calls_of("getFile"))
        alice_requests = [
            emu.user_sends_photo(alice_chat, alice, edited_photo(name)) for name in COLLECTION[:3]
        ] + [emu.user_sends_photo(alice_chat, alice, drawing(9), caption="/add")]
        alice_answers = [(await answer(emu, alice_chat, r))[0] for r in alice_requests]
        bob_answer = (await answer(emu, bob_chat, emu.user_sends_photo(
            bob_chat, bob, edited_photo("camera"))))[0]  # fmt: skip
        owner_answers = [
            (await answer(emu, owner_chat, emu.user_sends_photo(
                owner_chat, owner, edited_photo(name))))[0]
            for name in COLLECTION[:3]
        ]  # fmt: skip

    too_large = f"⚠️ {ImageTooLargeError.user_message}"
    refused = {
        "size": "too big" in limited["size"],
        **{name: limited[name] == too_large for name in ("bomb", "pixels", "bytes")},
    }
    waited = [text for text in alice_answers if text.startswith("⏳")]
    report_figures(
        "security-limits", limit_checks=len(refused), limits_held=sum(refused.values()),
        rate_limited=len(waited),
    )  # fmt: skip

    assert all(refused.values()), limited
    assert downloads_by_owner == 3  # the 21 MB document was refused before any download
    served = [text for text in alice_answers if not text.startswith("⏳")]
    assert (len(served), len(waited)) == (2, 2), alice_answers
    assert all(text.startswith(("1. ✅ same picture", "✅ Added as #")) for text in served)
    assert bob_answer.startswith("1. ✅ same picture")  # one user's limit is not another's
    assert all(text.startswith("1. ✅ same picture") for text in owner_answers)  # admins: none
    assert len(emu.calls_of("getFile")) == 3 + 2 + 1 + 3  # refused queries download nothing
    added = sum(text.startswith("✅ Added") for text in served)
    assert catalog_health(index).images == len(COLLECTION) + added
