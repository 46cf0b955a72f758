"""End to end: growing the collection (/add, /remove), groups, chat scopes and restarts."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from bot_fixtures import (
    REPLY_DEADLINE_S,
    bot_settings,
    build_test_index,
    edited_photo,
    make_bot,
    photo_bytes,
    running,
)

from bot import replies
from indexer.errors import NotFoundError
from testsupport.engine import copy_index
from testsupport.telegram_emulator import SentMessage, TelegramEmulator

COLLECTION = ("astronaut", "coffee", "chelsea", "rocket")
ADDED_AS = re.compile(r"^✅ Added as #(\d+)\.")


@pytest.fixture(scope="module")
def template_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("collection")
    return build_test_index([photos_dir / f"{name}.jpg" for name in COLLECTION], folder / "index")


@pytest.fixture
def index_dir(template_index: Path, tmp_path: Path) -> Path:
    return copy_index(template_index, tmp_path / "index")


def added_id(reply: SentMessage) -> int:
    found = ADDED_AS.match(reply.text or "")
    assert found is not None, reply.text
    return int(found.group(1))


def ids_in(messages: list[SentMessage]) -> set[int]:
    found = (replies.image_id_in(message.text) for message in messages)
    return {image_id for image_id in found if image_id is not None}


async def test_an_added_photo_is_found_by_the_next_search(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    # A name with markup characters: the HTML caption must escape them.
    alice = emu.create_user("Ann & Bob <3", "alice_w", last_name="Liddell")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir, search={"min_score": 0.5}))):
        photo = emu.user_sends_photo(chat, alice, photo_bytes("horse"), caption="/add")
        [confirmation] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        image_id = added_id(confirmation)
        emu.user_sends_photo(chat, alice, edited_photo("horse"))
        [result] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert confirmation.reply_to_message_id == photo["message_id"]
    assert result.text is not None
    first_line, origin = result.text.split("\n")
    assert first_line.startswith("1. ✅ same picture")
    assert first_line.endswith(f"#{image_id}")
    assert origin.startswith("👤 added by Ann & Bob <3 Liddell on ")
    assert "message" not in origin  # private chats have no message links
    # The user's own photo is sent back by its file_id: nothing is uploaded.
    [sent] = emu.calls_of("sendPhoto")
    assert sent.files == {}
    assert sent.params["photo"] == photo["photo"][-1]["file_id"]


async def test_adding_the_same_picture_again_is_recognised(
    emu: TelegramEmulator, index_dir: Path, photos_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir))):
        photo = emu.user_sends_photo(chat, alice, photo_bytes("horse"), caption="/add")
        [first] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_text(chat, alice, "/add", reply_to=photo)
        [same_bytes] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(chat, alice, edited_photo("horse"), caption="/add")
        [same_picture] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(chat, alice, (photos_dir / "coffee.jpg").read_bytes(), caption="/add")
        [offline] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    image_id = added_id(first)
    assert same_bytes.text == f"☑️ Already in this chat's collection as #{image_id}."
    assert same_picture.text == f"☑️ Already in this chat's collection as #{image_id}."
    assert offline.text is not None
    assert offline.text.startswith("☑️ Already in the offline collection as #")


async def test_search_in_a_group_by_reply_caption_or_mention_answers_in_the_thread(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    group = emu.create_group("Photo club", [alice])
    forum = emu.create_group("Forum", [alice], chat_type="supergroup", is_forum=True)
    async with running(make_bot(bot_settings(emu, index_dir, search={"min_score": 0.5}))):
        photo = emu.user_sends_photo(group, alice, edited_photo("chelsea"))
        command = emu.user_sends_text(group, alice, "/search", reply_to=photo)
        [by_reply] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        captioned = emu.user_sends_photo(group, alice, edited_photo("rocket"), caption="/search")
        [by_caption] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        mention = emu.user_sends_photo(
            forum,
            alice,
            edited_photo("coffee"),
            caption="@imgsearch_test_bot like this?",
            message_thread_id=77,
        )
        [by_mention] = await emu.wait_for_messages(forum, 1, timeout=REPLY_DEADLINE_S)

    assert by_reply.reply_to_message_id == command["message_id"]
    assert (by_reply.text or "").endswith("chelsea.jpg")
    assert by_caption.reply_to_message_id == captioned["message_id"]
    assert (by_caption.text or "").endswith("rocket.jpg")
    assert by_mention.reply_to_message_id == mention["message_id"]
    assert by_mention.message["message_thread_id"] == 77
    assert (by_mention.text or "").endswith("coffee.jpg")


async def test_commands_addressed_to_other_bots_are_ignored(index_dir: Path) -> None:
    # Privacy off: these updates do reach the bot, so it is the bot that must ignore them.
    async with TelegramEmulator(group_privacy=False) as emu:
        alice = emu.create_user("Alice")
        group = emu.create_group("Photo club", [alice])
        async with running(make_bot(bot_settings(emu, index_dir, search={"min_score": 0.5}))):
            photo = emu.user_sends_photo(group, alice, edited_photo("astronaut"))
            emu.user_sends_text(group, alice, "/search@other_bot", reply_to=photo)
            emu.user_sends_text(group, alice, "/add@other_bot", reply_to=photo)
            emu.user_sends_photo(group, alice, edited_photo("coffee"), caption="/search@other_bot")
            await emu.wait_for(lambda _: emu.pending_update_count == 0)
            addressed = emu.user_sends_text(
                group, alice, "/search@imgsearch_test_bot", reply_to=photo
            )
            [answer] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)

        assert answer.reply_to_message_id == addressed["message_id"]
        assert (answer.text or "").endswith("astronaut.jpg")
        assert len(emu.messages_sent(group)) == 1
        assert len(emu.calls_of("getFile")) == 1


async def test_unauthorised_add_and_remove_are_refused(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    owner = emu.create_user("Owner")
    bob = emu.create_user("Bob")
    carol = emu.create_user("Carol")
    group = emu.create_group("Photo club", [bob, carol])
    emu.set_member_status(group, carol, "administrator")
    bob_chat = emu.private_chat(bob)
    settings = bot_settings(
        emu, index_dir, access={"add_policy": "chat_admins", "admins": [owner.id]}
    )
    async with running(make_bot(settings)):
        emu.user_sends_photo(group, bob, photo_bytes("horse"), caption="/add")
        [bob_add] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        photo = emu.user_sends_photo(group, carol, photo_bytes("horse"))
        emu.user_sends_text(group, carol, "/add", reply_to=photo)
        [carol_add] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        image_id = added_id(carol_add)
        emu.user_sends_text(group, bob, f"/remove {image_id}")
        [bob_remove] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_text(group, carol, "/remove 1")  # the offline collection's astronaut
        [carol_remove_global] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_text(bob_chat, bob, "/remove 1")
        [bob_remove_global] = await emu.wait_for_messages(bob_chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_text(group, carol, "/remove", reply_to=photo)
        [carol_remove] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)

    assert bob_add.text == "🔒 Only the admins can add photos here."
    assert bob_remove.text == "🔒 Only the admins can remove photos here."
    assert carol_remove_global.text == "🔒 Only the admins can remove photos here."
    assert bob_remove_global.text == "🔒 Only the admins can remove photos here."
    assert carol_remove.text == f"🗑 Removed #{image_id}."


async def test_photos_added_in_a_chat_are_found_only_in_that_chat(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    carol = emu.create_user("Carol")
    club = emu.create_group("Club", [alice], chat_type="supergroup")
    other = emu.create_group("Other", [alice, carol])
    emu.set_member_status(other, carol, "administrator")
    private = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir))):
        photo = emu.user_sends_photo(club, alice, photo_bytes("horse"), caption="/add")
        image_id = added_id((await emu.wait_for_messages(club, 1, timeout=REPLY_DEADLINE_S))[0])
        emu.user_sends_text(other, carol, f"/remove {image_id}")
        [foreign_remove] = await emu.wait_for_messages(other, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(other, alice, edited_photo("horse"), caption="/search")
        in_other = await emu.wait_for_messages(other, 4, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(private, alice, edited_photo("horse"))
        in_private = await emu.wait_for_messages(private, 4, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(club, alice, edited_photo("horse"), caption="/search")
        in_club = await emu.wait_for_messages(club, 5, timeout=REPLY_DEADLINE_S)

    assert foreign_remove.text == f"⚠️ {NotFoundError.user_message}"
    assert image_id not in ids_in(in_other)
    assert image_id not in ids_in(in_private)
    assert not any("same picture" in (message.text or "") for message in in_other + in_private)
    first = in_club[0].text or ""
    assert first.startswith("1. ✅ same picture")
    assert replies.image_id_in(first) == image_id
    # A supergroup message has a t.me/c/ link; the caption links to the photo that was added.
    links = [e["url"] for e in in_club[0].message["caption_entities"] if e["type"] == "text_link"]
    assert links == [f"https://t.me/c/{-club.id - 1_000_000_000_000}/{photo['message_id']}"]


async def test_replying_remove_to_a_result_removes_it_for_a_bot_admin(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    owner = emu.create_user("Owner")
    chat = emu.private_chat(owner)
    settings = bot_settings(emu, index_dir, access={"admins": [owner.id]})
    async with running(make_bot(settings)):
        emu.user_sends_photo(chat, owner, edited_photo("rocket"))
        album = await emu.wait_for_messages(chat, 4, timeout=REPLY_DEADLINE_S)
        rocket_id = replies.image_id_in(album[0].text)
        assert rocket_id is not None
        emu.user_sends_text(chat, owner, "/remove", reply_to=album[0].message_id)
        [removal] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(chat, owner, edited_photo("rocket"))
        after = await emu.wait_for_messages(chat, 3, timeout=REPLY_DEADLINE_S)

    assert (album[0].text or "").endswith("rocket.jpg")
    assert removal.text == f"🗑 Removed #{rocket_id}."
    assert rocket_id not in ids_in(after)


async def test_added_photos_survive_a_restart_and_an_add_in_flight_is_finished(
    emu: TelegramEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    index_dir = tmp_path / "new-index"  # no index yet: the bot starts with an empty collection
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    settings = bot_settings(emu, index_dir, search={"min_score": 0.5})
    async with running(make_bot(settings)):
        emu.user_sends_photo(chat, alice, photo_bytes("horse"), caption="/add")
        # Stop as soon as the bot has taken the update: stopping lets it finish the add.
        await emu.wait_for(lambda _: emu.pending_update_count == 0)
    [confirmation] = await emu.wait_for_messages(chat, 1, timeout=0.1)
    image_id = added_id(confirmation)

    async with running(make_bot(settings)):
        emu.user_sends_photo(chat, alice, edited_photo("horse"))
        [result] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert "starting with an empty collection" in caplog.text
    assert replies.image_id_in(result.text) == image_id
    assert (result.text or "").startswith("1. ✅ same picture")


async def test_start_help_stats_and_the_command_menu(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir))):
        emu.user_sends_text(chat, alice, "/start")
        emu.user_sends_text(chat, alice, "/help")
        emu.user_sends_text(chat, alice, "/stats")
        answers = await emu.wait_for_messages(chat, 3, timeout=REPLY_DEADLINE_S)

    texts = [answer.text or "" for answer in answers]  # answered concurrently: in any order
    [start] = [text for text in texts if text.startswith("👋")]
    [help_text] = [text for text in texts if text.startswith("Find similar photos")]
    [stats] = [text for text in texts if text.startswith("Collection")]
    assert "@imgsearch_test_bot" in start
    assert "/search@imgsearch_test_bot" in help_text
    assert "4 photos in the offline collection" in stats
    assert "0 photos added in this chat" in stats
    assert "Pending adds: 0 photos" in stats
    commands = [command["command"] for command in emu.bot_commands()]
    assert commands == [
        "search", "add", "remove", "stats", "watch", "settings", "forget", "help", "start"
    ]


async def test_chats_outside_the_allowed_list_are_turned_away(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    stranger = emu.create_user("Stranger")
    allowed = emu.create_group("Club", [alice])
    elsewhere = emu.create_group("Elsewhere", [alice])
    stranger_chat = emu.private_chat(stranger)
    settings = bot_settings(emu, index_dir, access={"allowed_chats": [allowed.id]})
    async with running(make_bot(settings)):
        emu.user_sends_text(stranger_chat, stranger, "/start")
        [refusal] = await emu.wait_for_messages(stranger_chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_text(elsewhere, alice, "/help")
        await emu.wait_for(lambda _: emu.pending_update_count == 0)
        emu.user_sends_text(allowed, alice, "/help")
        [welcome] = await emu.wait_for_messages(allowed, 1, timeout=REPLY_DEADLINE_S)

    assert refusal.text == replies.chat_not_allowed()
    assert (welcome.text or "").startswith("Find similar photos")
    assert emu.messages_sent(elsewhere) == []


async def test_an_unexpected_failure_is_apologised_for_logged_and_reported_to_admins(
    emu: TelegramEmulator, index_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file where the folder of added originals belongs: every add fails to store its photo.
    (index_dir / "originals").write_bytes(b"")
    owner = emu.create_user("Owner")
    alice = emu.create_user("Alice")
    owner_chat = emu.private_chat(owner)
    chat = emu.private_chat(alice)
    settings = bot_settings(
        emu, index_dir, access={"admins": [owner.id]}, runtime={"notify_admins_on_error": True}
    )
    async with running(make_bot(settings)):
        emu.user_sends_photo(chat, alice, photo_bytes("horse"), caption="/add")
        [apology] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        [alert] = await emu.wait_for_messages(owner_chat, 1, timeout=REPLY_DEADLINE_S)

    assert apology.text == "😵 Something went wrong on my side. Please try again later."
    assert (alert.text or "").startswith("🚨 Error while handling update")
    assert "Error" in (alert.text or "")
    failures = [record for record in caplog.records if record.name == "bot.handlers"]
    assert [record.levelno for record in failures] == [logging.ERROR]
    assert failures[0].exc_info is not None
