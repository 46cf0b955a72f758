"""End to end: animations, videos, video notes and stickers in private search, /add and the
repost watch, and video results sent as videos (in the album) or animations (apart), over
HTTP against the Bot API emulator."""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import pytest
from bot_fixtures import REPLY_DEADLINE_S, bot_settings, build_test_index, make_bot, running
from conftest import photo_array
from PIL import Image

from testsupport.engine import copy_index
from testsupport.telegram_emulator import TelegramEmulator
from testsupport.videos import WEBM_CODEC, gif_bytes, pan_and_zoom, video_bytes

PHOTOS = ("astronaut", "coffee", "chelsea")
VIDEO_IN_COLLECTION = "horse"  # horse.mp4
GIF_IN_COLLECTION = "rocket"  # rocket.gif


def clip(name: str, *, size: tuple[int, int] = (320, 240), codec: str = "mp4v") -> bytes:
    return video_bytes(pan_and_zoom(photo_array(name), frames=16, size=size), fps=8.0,
                       codec=codec)


def sticker_webp(name: str) -> bytes:
    picture = Image.fromarray(photo_array(name)).resize((512, 512))
    buffer = io.BytesIO()
    picture.save(buffer, format="WEBP", quality=85)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def template_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("moving")
    sources = folder / "sources"
    sources.mkdir()
    for name in PHOTOS:
        shutil.copyfile(photos_dir / f"{name}.jpg", sources / f"{name}.jpg")
    (sources / f"{VIDEO_IN_COLLECTION}.mp4").write_bytes(clip(VIDEO_IN_COLLECTION))
    (sources / f"{GIF_IN_COLLECTION}.gif").write_bytes(
        gif_bytes(pan_and_zoom(photo_array(GIF_IN_COLLECTION), frames=8))
    )
    return build_test_index(sorted(sources.iterdir()), folder / "index")


@pytest.fixture
def index_dir(template_index: Path, tmp_path: Path) -> Path:
    return copy_index(template_index, tmp_path / "index")


async def test_a_video_query_gets_the_video_in_the_album_and_the_animation_apart(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir))):
        query = emu.user_sends_video(chat, alice, clip(VIDEO_IN_COLLECTION, size=(288, 224)))
        sent = await emu.wait_for_messages(chat, 5, timeout=REPLY_DEADLINE_S)

    [album_call] = emu.calls_of("sendMediaGroup")
    [animation_call] = emu.calls_of("sendAnimation")
    album = [item for item in sent if item.call is album_call]
    [animation] = [item for item in sent if item.call is animation_call]
    assert len(album) == 4  # three photos and the video
    first = album[0]
    assert "video" in first.message
    assert first.reply_to_message_id == query["message_id"]
    assert first.text is not None
    assert first.text.startswith("1. ✅ same picture")
    assert " · at 0:0" in first.text
    assert first.text.endswith(f"📁 {VIDEO_IN_COLLECTION}.mp4")
    assert sum("photo" in item.message for item in album) == 3
    # An animation cannot share an album with photos: it comes on its own, as an animation.
    assert "animation" in animation.message
    assert animation.text is not None
    assert animation.text.endswith(f"📁 {GIF_IN_COLLECTION}.gif")


@pytest.mark.parametrize("kind", ["animation", "video_note", "static_sticker", "video_sticker"])
async def test_each_kind_of_moving_picture_finds_its_photo_in_a_private_chat(
    emu: TelegramEmulator, index_dir: Path, kind: str
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    settings = bot_settings(emu, index_dir, search={"top_n": 1})
    async with running(make_bot(settings)):
        if kind == "animation":
            emu.user_sends_animation(chat, alice, clip("astronaut"))
        elif kind == "video_note":
            emu.user_sends_video_note(chat, alice, clip("astronaut", size=(240, 240)))
        elif kind == "static_sticker":
            emu.user_sends_sticker(chat, alice, sticker_webp("astronaut"), kind="static")
        else:
            webm = clip("astronaut", size=(256, 256), codec=WEBM_CODEC)
            emu.user_sends_sticker(chat, alice, webm, kind="video")
        [answer] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert "photo" in answer.message
    assert answer.text is not None
    assert answer.text.startswith("1. ✅ same picture")
    assert answer.text.endswith("📁 astronaut.jpg")


async def test_an_animated_sticker_is_refused_with_a_reason(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    lottie = gzip.compress(b'{"v":"5.5.2","fr":60,"w":512,"h":512,"layers":[]}')
    async with running(make_bot(bot_settings(emu, index_dir))):
        emu.user_sends_sticker(chat, alice, lottie, kind="animated")
        [answer] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert answer.text is not None
    assert "animated sticker" in answer.text


async def test_an_added_video_is_kept_and_found_by_its_animation(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    settings = bot_settings(emu, index_dir, search={"top_n": 1})
    async with running(make_bot(settings)):
        emu.user_sends_video(chat, alice, clip("camera"), caption="/add")
        [added] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_animation(chat, alice, clip("camera", size=(256, 192)))
        [found] = await emu.wait_for_messages(chat, 1, timeout=REPLY_DEADLINE_S)

    assert added.text is not None
    assert added.text.startswith("✅ Added as #")
    image_id = added.text.removeprefix("✅ Added as #").split(".")[0]
    assert "video" in found.message  # the result moves: sent as a video
    assert found.text is not None
    assert found.text.startswith("1. ✅ same picture")
    assert f"#{image_id} · at 0:0" in found.text


async def test_the_watch_answers_a_gif_reposting_a_video(tmp_path: Path) -> None:
    async with TelegramEmulator(group_privacy=False) as emu:
        alice = emu.create_user("Alice")
        bob = emu.create_user("Bob")
        group = emu.create_group("Clips", [alice, bob], chat_type="supergroup")
        emu.set_member_status(group, alice, "administrator")
        settings = bot_settings(emu, tmp_path / "index", watch={"album_wait_s": 0.3})
        async with running(make_bot(settings)):
            emu.user_sends_text(group, alice, "/watch on")
            await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            emu.user_sends_video(group, bob, clip("coffee"))
            repost = emu.user_sends_animation(group, alice, clip("coffee", size=(256, 192)))
            [answer] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)

    assert answer.reply_to_message_id == repost["message_id"]
    assert answer.text is not None
    assert "Bob" in answer.text

