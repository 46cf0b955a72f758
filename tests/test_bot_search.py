"""End to end: searching by photo in a private chat, over HTTP against the Bot API emulator."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from bot_fixtures import (
    REPLY_DEADLINE_S,
    bot_settings,
    build_test_index,
    edited_photo,
    make_bot,
    oversized_photo,
    photo_bytes,
    running,
)
from PIL import Image

from indexer.errors import CorruptImageError, UnsupportedFormatError
from testsupport.engine import copy_index
from testsupport.telegram_emulator import TelegramEmulator

COLLECTION = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")
HUGE_PHOTO = "retina_huge.jpg"  # 5400 x 5400: over Telegram's photo limit of w + h <= 10000


@pytest.fixture(scope="module")
def template_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("search")
    huge = folder / HUGE_PHOTO
    huge.write_bytes(oversized_photo("retina", 5400))
    photos = [photos_dir / f"{name}.jpg" for name in COLLECTION]
    return build_test_index([*photos, huge], folder / "index")


@pytest.fixture
def index_dir(template_index: Path, tmp_path: Path) -> Path:
    return copy_index(template_index, tmp_path / "index")


async def test_a_private_photo_gets_an_album_led_by_the_original_marked_same_picture(
    emu: TelegramEmulator, index_dir: Path, photos_dir: Path
) -> None:
    alice = emu.create_user("Alice", "alice_w")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir))):
        query = emu.user_sends_photo(chat, alice, edited_photo("astronaut"))
        album = await emu.wait_for_messages(chat, 5, timeout=REPLY_DEADLINE_S)

    [album_call] = emu.calls_of("sendMediaGroup")
    assert all(item.call is album_call for item in album)
    assert all(item.reply_to_message_id == query["message_id"] for item in album)
    first = album[0]
    assert first.text is not None
    assert first.text.startswith("1. ✅ same picture")
    assert first.text.endswith("📁 astronaut.jpg")
    bold = [entity for entity in first.message["caption_entities"] if entity["type"] == "bold"]
    assert len(bold) == 1  # the "same picture" mark is bold
    original = (photos_dir / "astronaut.jpg").read_bytes()
    assert emu.file_bytes(first.largest_photo_file_id) == original  # uploaded untouched
    assert [item.text.split(".")[0] for item in album if item.text] == ["1", "2", "3", "4", "5"]
    assert not any("same picture" in (item.text or "") for item in album[1:])
    [action, *_] = emu.chat_actions(chat)
    assert action.action == "upload_photo"
    assert action.call.received_at <= album_call.received_at


async def test_each_result_photo_is_uploaded_once_then_sent_by_file_id(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir))):
        emu.user_sends_photo(chat, alice, edited_photo("coffee"))
        first_album = await emu.wait_for_messages(chat, 5, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(chat, alice, edited_photo("coffee"))  # the same results again
        second_album = await emu.wait_for_messages(chat, 5, timeout=REPLY_DEADLINE_S)

    first_call, second_call = emu.calls_of("sendMediaGroup")
    assert len(first_call.files) == 5
    assert second_call.files == {}
    remembered = {item.largest_photo_file_id for item in first_album}
    assert {item["media"] for item in second_call.params["media"]} <= remembered
    assert [item.text for item in second_album] == [item.text for item in first_album]


async def test_an_image_sent_as_a_file_is_searched(emu: TelegramEmulator, index_dir: Path) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(edited_photo("chelsea", angle=-5))).save(buffer, "PNG")
    async with running(make_bot(bot_settings(emu, index_dir))):
        emu.user_sends_document(
            chat, alice, buffer.getvalue(), file_name="cat scan.png", mime_type="image/png"
        )
        album = await emu.wait_for_messages(chat, 5, timeout=REPLY_DEADLINE_S)

    assert album[0].text is not None
    assert album[0].text.startswith("1. ✅ same picture")
    assert album[0].text.endswith("chelsea.jpg")


async def test_one_qualifying_result_is_one_photo_and_none_is_a_sentence(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    only_verified = bot_settings(emu, index_dir, search={"min_score": 0.5})
    async with running(make_bot(only_verified)):
        emu.user_sends_photo(chat, alice, edited_photo("rocket"))
        [single] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_photo(chat, alice, photo_bytes("coins"))  # not in the collection
        [nothing] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert single.call.method == "sendPhoto"
    assert single.text is not None
    assert single.text.startswith("1. ✅ same picture")
    assert single.text.endswith("rocket.jpg")
    assert nothing.call.method == "sendMessage"
    assert nothing.text == "🔍 Nothing in the collection looks like this photo."
    assert emu.calls_of("sendMediaGroup") == []


async def test_a_result_over_telegrams_photo_limits_is_downscaled_before_upload(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir, search={"min_score": 0.5}))):
        emu.user_sends_photo(chat, alice, photo_bytes("retina"))
        [result] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert result.text is not None
    assert result.text.endswith(HUGE_PHOTO)
    [upload] = emu.calls_of("sendPhoto")[0].files.values()
    with Image.open(io.BytesIO(upload.data)) as sent:
        assert sum(sent.size) <= 10_000
    assert len(upload.data) <= 10 * 2**20


async def test_broken_and_oversized_files_get_friendly_replies(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    jpeg = photo_bytes("coffee")
    async with running(make_bot(bot_settings(emu, index_dir))):
        emu.user_sends_document(
            chat, alice, jpeg[: len(jpeg) // 2], file_name="cut.jpg", mime_type="image/jpeg"
        )
        [corrupt] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_document(
            chat, alice, b"Dear diary,\n" * 50, file_name="notes.jpg", mime_type="image/jpeg"
        )
        [not_an_image] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        heic_header = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(256)
        emu.user_sends_document(
            chat, alice, heic_header, file_name="IMG_0001.HEIC", mime_type="image/heic"
        )
        [heic] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_oversized_document(
            chat, alice, file_size=25 * 2**20, file_name="scan.tif", mime_type="image/tiff"
        )
        [too_big] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert corrupt.text == f"⚠️ {CorruptImageError.user_message}"
    assert not_an_image.text == f"⚠️ {UnsupportedFormatError.user_message}"
    # The engine's advice for this format reaches the user, not only the generic sentence.
    assert heic.text == (
        "⚠️ This is a HEIC/HEIF photo (the iPhone default), which I cannot read; "
        "please send it as JPEG (or as a photo rather than a file)."
    )
    assert too_big.text is not None
    assert "too big" in too_big.text
    assert "20 MB" in too_big.text
    # The size is checked before asking Telegram for the file.
    assert len(emu.calls_of("getFile")) == 3
    assert len(emu.messages_sent(chat)) == 4


async def test_a_429_on_the_album_is_waited_out_and_the_album_arrives_once(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    emu.flood_next_calls("sendMediaGroup", 1, retry_after=1)
    async with running(make_bot(bot_settings(emu, index_dir))):
        emu.user_sends_photo(chat, alice, edited_photo("camera"))
        album = await emu.wait_for_messages(chat, 5, timeout=REPLY_DEADLINE_S)

    # Stopping the bot let every update finish: nothing else is on its way.
    assert [call.http_status for call in emu.calls_of("sendMediaGroup")] == [429, 200]
    assert len(emu.messages_sent(chat)) == 5
    assert album[0].text is not None
    assert album[0].text.endswith("camera.jpg")


async def test_twenty_users_searching_at_once_are_all_answered(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    users = [emu.create_user(f"User {number}") for number in range(20)]
    chats = [emu.private_chat(user) for user in users]
    expected = {chat.id: COLLECTION[number % len(COLLECTION)] for number, chat in enumerate(chats)}
    settings = bot_settings(emu, index_dir, search={"top_n": 3}, runtime={"concurrent_updates": 20})
    async with running(make_bot(settings)):
        for user, chat in zip(users, chats, strict=True):
            emu.user_sends_photo(chat, user, edited_photo(expected[chat.id]))
        albums = {
            chat.id: await emu.wait_for_messages(chat, 3, timeout=3 * REPLY_DEADLINE_S)
            for chat in chats
        }

    for chat_id, album in albums.items():
        assert album[0].text is not None
        assert album[0].text.startswith("1. ✅ same picture")
        assert album[0].text.endswith(f"{expected[chat_id]}.jpg")


async def test_a_user_over_the_query_rate_is_asked_to_wait(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    settings = bot_settings(emu, index_dir, search={"top_n": 2}, access={"queries_per_minute": 2})
    async with running(make_bot(settings)):
        for name in ("brick", "camera", "coffee"):
            emu.user_sends_photo(chat, alice, edited_photo(name))
        replies = await emu.wait_for_messages(chat, 2 + 2 + 1, timeout=REPLY_DEADLINE_S)

    refusals = [reply.text for reply in replies if reply.call.method == "sendMessage"]
    assert len(refusals) == 1
    assert refusals[0] is not None
    assert refusals[0].startswith("⏳ That was a lot of photos. Please try again in")
    assert len(emu.calls_of("sendMediaGroup")) == 2
