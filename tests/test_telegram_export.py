"""Backfilling a chat's history from a Telegram Desktop export: reading exports of every shape
(generated with the real ``result.json`` fields), importing them into a chat's scope, running
again, and refusing what is not an export."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from bot_fixtures import (
    REPLY_DEADLINE_S,
    bot_settings,
    edited_photo,
    make_bot,
    photo_bytes,
    running,
)
from conftest import photo_array
from engine_fixtures import TEST_SETTINGS
from PIL import Image

from indexer.backfill import ImportReport, import_export
from indexer.errors import ExportError
from indexer.telegram_export import DELETED_ACCOUNT, read_export
from indexer.telegram_ids import bot_api_chat_id, message_link
from testsupport.engine import opened_service
from testsupport.telegram_emulator import SentMessage, TelegramEmulator
from testsupport.telegram_exports import NOT_INCLUDED, account, chat, message, write_result

BARE_ID = 1_234_567_890
SUPERGROUP_ID = -1_001_234_567_890
DAY = 1_700_000_000  # Unix time of the first message


def png_bytes(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_array(name)).save(buffer, "PNG")
    return buffer.getvalue()


def alice(message_id: int, **fields: Any) -> dict[str, Any]:
    return message(message_id, DAY + message_id * 60, sender="Alice", sender_id="user101", **fields)


def bob(message_id: int, **fields: Any) -> dict[str, Any]:
    return message(message_id, DAY + message_id * 60, sender="Bob", sender_id="user102", **fields)


def history(folder: Path) -> list[dict[str, Any]]:
    """A group's history with every kind of message the import meets; files in ``folder``."""
    (folder / "photos").mkdir(parents=True)
    (folder / "files").mkdir()
    (folder / "photos" / "photo_1@14-11-2023_22-14-20.jpg").write_bytes(photo_bytes("astronaut"))
    (folder / "files" / "coffee.png").write_bytes(png_bytes("coffee"))
    (folder / "photos" / "photo_3@14-11-2023_22-20-00.jpg").write_bytes(
        photo_bytes("rocket")[:4000]  # cut short: not a usable image
    )
    (folder / "photos" / "photo_5@14-11-2023_22-30-00.jpg").write_bytes(
        edited_photo("astronaut")
    )
    (folder / "photos" / "photo_6@14-11-2023_22-40-00.jpg").write_bytes(photo_bytes("camera"))
    (folder / "files" / "rules.pdf").write_bytes(b"%PDF-1.4 not a picture")
    (folder / "files" / "sticker.webp").write_bytes(png_bytes("moon"))
    return [
        message(1, DAY, sender="Club", sender_id="channel" + str(BARE_ID), kind="service",
                action="create_channel", title="Club"),
        alice(2, photo="photos/photo_1@14-11-2023_22-14-20.jpg", width=512, height=512),
        # A new group photo: a service message with a photo, not a post.
        message(3, DAY + 3 * 60, sender="Alice", sender_id="user101", kind="service",
                action="edit_group_photo", photo="photos/photo_3@14-11-2023_22-20-00.jpg",
                width=512, height=512),
        bob(4, file="files/coffee.png", mime_type="image/png", width=400, height=300),
        bob(5, photo="photos/photo_5@14-11-2023_22-30-00.jpg", width=410, height=410,
            forwarded_from="Alice"),
        alice(6, photo=NOT_INCLUDED),
        alice(7, photo="photos/photo_7@14-11-2023_22-50-00.jpg", width=10, height=10),  # absent
        bob(8, photo="photos/photo_3@14-11-2023_22-20-00.jpg", width=512, height=512),  # cut
        message(9, DAY + 9 * 60, sender=None, sender_id="user103",
                photo="photos/photo_6@14-11-2023_22-40-00.jpg", width=512, height=512),
        bob(10, file="files/rules.pdf", mime_type="application/pdf"),
        bob(11, file="files/sticker.webp", media_type="sticker", sticker_emoji="🙂",
            width=512, height=512),
        alice(12, text="no picture here"),
        alice(13, photo="../outside.jpg", width=1, height=1),
    ]


@pytest.fixture
def group_export(tmp_path: Path) -> Path:
    folder = tmp_path / "ChatExport_2023-11-14"
    messages = history(folder)
    return write_result(folder, chat("Photo club", "private_supergroup", BARE_ID, messages))


# -- reading ----------------------------------------------------------------------------------


def test_a_group_export_yields_its_photos_and_image_files_with_messages_and_senders(
    group_export: Path,
) -> None:
    exported = read_export(group_export)

    assert (exported.name, exported.export_type) == ("Photo club", "private_supergroup")
    assert (exported.bare_id, exported.chat_id) == (BARE_ID, SUPERGROUP_ID)
    assert exported.messages == 13
    by_id = {image.message_id: image for image in exported.images}
    # Service messages, the PDF, the sticker and the text are not among them.
    assert sorted(by_id) == [2, 4, 5, 6, 7, 8, 9, 13]
    photo = by_id[2]
    assert (photo.sender_id, photo.sender_name, photo.is_photo) == (101, "Alice", True)
    assert photo.posted_at == DAY + 120
    assert photo.path == group_export.absolute() / "photos" / "photo_1@14-11-2023_22-14-20.jpg"
    assert by_id[4].is_photo is False
    assert by_id[4].path == group_export.absolute() / "files" / "coffee.png"
    assert by_id[5].forwarded_from == "Alice"
    assert by_id[6].path is None
    assert by_id[6].unavailable == NOT_INCLUDED.strip("()")
    assert by_id[9].sender_name == DELETED_ACCOUNT
    assert by_id[13].path is None
    assert by_id[13].unavailable is not None
    assert "leads out of the export folder" in by_id[13].unavailable


@pytest.mark.parametrize(
    ("export_type", "bare_id", "chat_id"),
    [
        ("private_supergroup", BARE_ID, SUPERGROUP_ID),
        ("public_supergroup", BARE_ID, SUPERGROUP_ID),
        ("private_channel", 1_500_000_001, -1_001_500_000_001),
        ("public_channel", 1_500_000_001, -1_001_500_000_001),
        ("private_group", 4_000_000_001, -4_000_000_001),
        ("personal_chat", 777, 777),
        ("bot_chat", 778, 778),
    ],
)
def test_export_ids_map_to_the_bot_api_chat_ids_of_the_watch(
    export_type: str, bare_id: int, chat_id: int
) -> None:
    assert bot_api_chat_id(export_type, bare_id) == chat_id


def test_message_links_are_built_as_the_watch_builds_them() -> None:
    assert message_link(SUPERGROUP_ID, None, 42) == f"https://t.me/c/{BARE_ID}/42"
    assert message_link(SUPERGROUP_ID, "club", 42) == "https://t.me/club/42"
    assert message_link(-4_000_000_001, None, 42) is None  # basic groups have no links
    assert message_link(777, None, 42) is None
    with pytest.raises(ValueError, match="cannot be imported"):
        bot_api_chat_id("replies", 1)


def test_a_whole_account_export_needs_chat_and_finds_it_by_either_id(tmp_path: Path) -> None:
    folder = tmp_path / "DataExport"
    (folder / "chats" / "chat_001" / "photos").mkdir(parents=True)
    document = account(
        [
            chat("Saved Messages", "saved_messages", 1, []),
            chat("Public club", "public_supergroup", BARE_ID, [
                alice(5, photo="chats/chat_001/photos/photo_5.jpg", width=9, height=9),
            ]),
            chat("News", "public_channel", 1_500_000_001, [
                message(7, DAY, sender="News", sender_id="channel1500000001",
                        photo="chats/chat_002/photos/photo_7.jpg", width=9, height=9),
            ]),
        ],
        left_chats=[chat("Old group", "private_group", 4_000_000_001, [])],
    )
    write_result(folder, document)

    with pytest.raises(ExportError, match="4 chats: choose one with --chat") as listing:
        read_export(folder)
    by_bare = read_export(folder, chat=BARE_ID)
    by_bot_api = read_export(folder, chat=SUPERGROUP_ID)
    channel = read_export(folder, chat=1_500_000_001)
    left = read_export(folder, chat=-4_000_000_001)
    with pytest.raises(ExportError, match="has no chat 99"):
        read_export(folder, chat=99)

    assert f"{BARE_ID} public_supergroup 'Public club'" in str(listing.value)
    assert by_bare == by_bot_api
    assert by_bare.chat_id == SUPERGROUP_ID
    assert [image.message_id for image in by_bare.images] == [5]
    assert by_bare.images[0].path == folder.absolute() / "chats/chat_001/photos/photo_5.jpg"
    assert channel.chat_id == -1_001_500_000_001
    # A channel posts as itself: no user id, the channel's name.
    assert (channel.images[0].sender_id, channel.images[0].sender_name) == (None, "News")
    assert (left.chat_id, left.images) == (-4_000_000_001, [])


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "has no result.json"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"name": "x", "type": "private_supergroup", "id": 5}', 'neither "messages" nor "chats"'),
        ('{"name": "x", "type": "private_supergroup", "id": "5", "messages": []}', 'numeric "id"'),
        ('{"name": "x", "type": "private_supergroup", "id": 5, "messages": {}}', '"messages" list'),
        ('{"name": "x", "type": "replies", "id": 5, "messages": []}', "no Bot API chat"),
        ('{"chats": {"list": 3}}', "has no list of chats"),
        ('{"chats": {"list": []}}', "holds no chat"),
        ('{"name": "x", "type": "private_supergroup", "id": 5, "messages": [7]}',
         "is not a JSON object"),
        ('{"name": "x", "type": "private_supergroup", "id": 5, "messages": '
         '[{"type": "message", "photo": "photos/a.jpg", "date_unixtime": "1"}]}',
         'no valid "id"'),
        ('{"name": "x", "type": "private_supergroup", "id": 5, "messages": '
         '[{"id": 1, "type": "message", "photo": "photos/a.jpg", "date": "yesterday"}]}',
         'neither "date_unixtime" nor a valid "date"'),
        ('{"name": "x", "type": "private_supergroup", "id": 5, "messages": '
         '[{"id": 1, "type": "message", "photo": 12, "date_unixtime": "1"}]}', "not a path"),
    ],
)
def test_what_is_not_an_export_is_refused_with_what_is_wrong(
    tmp_path: Path, content: str | None, complaint: str
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    if content is None:
        (folder / "messages.html").write_text("<html></html>")  # an HTML export
    else:
        (folder / "result.json").write_text(content)

    with pytest.raises(ExportError) as refused:
        read_export(folder)

    assert complaint in str(refused.value)


def test_the_result_file_may_be_named_instead_of_its_folder(group_export: Path) -> None:
    assert read_export(group_export / "result.json") == read_export(group_export)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="is not a folder"):
        read_export(tmp_path / "nowhere")


def test_an_old_export_without_unix_times_reads_the_local_date(tmp_path: Path) -> None:
    posted = message(3, DAY, sender="Alice", sender_id="user101", photo="photos/p.jpg")
    del posted["date_unixtime"]
    write_result(tmp_path, chat("Old", "private_supergroup", BARE_ID, [posted]))

    [image] = read_export(tmp_path).images

    assert image.posted_at == DAY


# -- importing --------------------------------------------------------------------------------


async def run_import(export: Path, index: Path, **options: Any) -> ImportReport:
    return await import_export(
        export, index, workers=1, progress=False, settings=TEST_SETTINGS, **options
    )


async def test_an_import_adds_each_picture_to_the_chat_with_its_message_and_runs_again_for_new_ones(
    group_export: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"

    first = await run_import(group_export, index)
    second = await run_import(group_export, index)
    # The chat goes on: a new photo is exported, and the cut file is exported whole.
    document = json.loads((group_export / "result.json").read_text())
    (group_export / "photos" / "photo_14.jpg").write_bytes(photo_bytes("horse"))
    document["messages"].append(bob(14, photo="photos/photo_14.jpg", width=512, height=512))
    write_result(group_export, document)
    (group_export / "photos" / "photo_3@14-11-2023_22-20-00.jpg").write_bytes(
        photo_bytes("rocket")
    )
    third = await run_import(group_export, index)

    async with opened_service(index) as service:
        records = service.chat_records
        sightings = {m: await records.sighting(SUPERGROUP_ID, m) for m in (2, 4, 5, 8, 9, 14)}
        original = await service.get(sightings[2]["image_id"]) if sightings[2] else None
        matches = await service.query(edited_photo("coffee"), scope=SUPERGROUP_ID, top=1)
        chat_images = await service.count(scope=SUPERGROUP_ID)

    assert (first.chat_id, first.messages, first.images) == (SUPERGROUP_ID, 13, 8)
    # 2, 4 and 9 are new (9's sender is gone); 5 is 2 again (an edited forward).
    assert (first.imported, first.seen_before, first.already_imported) == (3, 1, 0)
    assert [m for m, _ in first.missing] == [6, 7, 13]
    assert first.missing[1][1] == "its file is not in the export folder"
    [(failed_id, reason)] = first.failed
    assert failed_id == 8
    assert reason
    assert first.generation is not None

    assert (second.imported, second.seen_before, second.already_imported) == (0, 0, 4)
    assert (second.still_failing, len(second.failed)) == (1, 0)
    assert [m for m, _ in second.missing] == [6, 7, 13]

    assert (third.imported, third.already_imported, third.failed) == (2, 4, [])
    assert third.still_failing == 0

    assert all(sightings[m] is not None for m in (2, 4, 5, 8, 9, 14))
    assert sightings[2] is not None
    assert sightings[5] is not None
    assert sightings[5]["image_id"] == sightings[2]["image_id"]
    assert (sightings[2]["sender_id"], sightings[2]["sender_name"]) == (101, "Alice")
    assert sightings[2]["posted_at"] == DAY + 120
    assert original is not None
    assert (original.scope, original.origin_chat_id) == (SUPERGROUP_ID, SUPERGROUP_ID)
    assert (original.origin_message_id, original.added_by) == (2, "Alice")
    assert original.added_at == DAY + 120  # when it was posted, not when it was imported
    assert chat_images == 5  # astronaut, coffee, camera, horse, rocket
    [match] = matches
    assert match.verified
    assert (match.image.origin_message_id, match.image.added_by) == (4, "Bob")


async def test_a_message_whose_add_was_interrupted_is_completed_by_the_next_run(
    group_export: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    # Killed between the add and its sighting: the picture is in, its message is not.
    async with opened_service(index, settings=TEST_SETTINGS, create=True) as service:
        added = await service.add(
            photo_bytes("astronaut"), scope=SUPERGROUP_ID, origin_chat_id=SUPERGROUP_ID,
            origin_message_id=2, added_by="Alice",
        )

    report = await run_import(group_export, index)

    async with opened_service(index) as service:
        sighting = await service.chat_records.sighting(SUPERGROUP_ID, 2)
    assert (report.imported, report.seen_before) == (2, 2)
    assert sighting is not None
    assert sighting["image_id"] == added.image.id


async def test_an_import_keeps_out_what_the_chat_retention_forgot(
    group_export: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    async with opened_service(index, settings=TEST_SETTINGS, create=True) as service:
        await service.chat_records.save_chat_settings(
            SUPERGROUP_ID, watch=True, reply_style="reply", global_counts=False,
            retention_days=30, add_policy=None,
        )

    report = await run_import(group_export, index)

    # Every message of the export is years older than 30 days.
    assert (report.too_old, report.imported, report.missing, report.failed) == (8, 0, [], [])


# -- the watch links reposts to imported messages ---------------------------------------------


def link_of(answer: SentMessage) -> str:
    [url] = [e["url"] for e in answer.message.get("entities", []) if e["type"] == "text_link"]
    return str(url)


async def test_a_repost_in_a_watched_group_links_to_the_imported_message(tmp_path: Path) -> None:
    index = tmp_path / "index"
    async with TelegramEmulator(group_privacy=False) as emu:
        alice = emu.create_user("Alice")
        bob = emu.create_user("Bob")
        # The bot joins after 20 messages: the ones the export holds.
        private = emu.create_group(
            "Photo club", [alice, bob], chat_type="supergroup", earlier_messages=20
        )
        public = emu.create_group(
            "Open club", [alice, bob], chat_type="supergroup", username="openclub",
            earlier_messages=20,
        )
        for group in (private, public):
            emu.set_member_status(group, alice, "administrator")
        private_bare, public_bare = (-group.id - 1_000_000_000_000 for group in (private, public))
        export = tmp_path / "DataExport"
        (export / "chats" / "chat_001" / "photos").mkdir(parents=True)
        (export / "chats" / "chat_001" / "photos" / "photo_7.jpg").write_bytes(
            photo_bytes("horse")
        )
        (export / "chats" / "chat_002" / "photos").mkdir(parents=True)
        (export / "chats" / "chat_002" / "photos" / "photo_9.jpg").write_bytes(
            photo_bytes("moon")
        )
        write_result(export, account([
            chat("Photo club", "private_supergroup", private_bare, [
                message(7, DAY, sender="Old Member", sender_id="user42",
                        photo="chats/chat_001/photos/photo_7.jpg", width=512, height=512),
            ]),
            chat("Open club", "public_supergroup", public_bare, [
                message(9, DAY + 60, sender="Open Club", sender_id=f"channel{public_bare}",
                        photo="chats/chat_002/photos/photo_9.jpg", width=512, height=512),
            ]),
        ]))
        reports = [
            await run_import(export, index, chat=private_bare),
            await run_import(export, index, chat=public.id),
        ]
        async with running(make_bot(bot_settings(emu, index))):
            for group in (private, public):
                emu.user_sends_text(group, alice, "/watch on")
                await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            horse = emu.user_sends_photo(private, bob, edited_photo("horse"))
            moon = emu.user_sends_photo(public, bob, edited_photo("moon", angle=-3.0))
            [in_private] = await emu.wait_for_messages(private, 1, timeout=REPLY_DEADLINE_S)
            [in_public] = await emu.wait_for_messages(public, 1, timeout=REPLY_DEADLINE_S)

    assert [report.imported for report in reports] == [1, 1]
    assert in_private.reply_to_message_id == horse["message_id"]
    assert in_private.text == (
        "🔁 Seen before: first posted by Old Member on 14 Nov 2023 22:13 UTC. Seen twice."
    )
    assert link_of(in_private) == f"https://t.me/c/{private_bare}/7"
    # A public group's link uses its @name, as for any message the watch saw.
    assert in_public.reply_to_message_id == moon["message_id"]
    assert in_public.text is not None
    assert in_public.text.startswith("🔁 Seen before: first posted by Open Club on 14 Nov 2023")
    assert link_of(in_public) == "https://t.me/openclub/9"


async def test_a_channel_is_imported_into_its_own_scope_with_the_channel_as_poster(
    tmp_path: Path,
) -> None:
    export = tmp_path / "ChannelExport"
    (export / "photos").mkdir(parents=True)
    (export / "photos" / "photo_1.jpg").write_bytes(photo_bytes("chelsea"))
    write_result(export, chat("Cat news", "public_channel", 1_500_000_001, [
        message(1, DAY, sender="Cat news", sender_id="channel1500000001",
                photo="photos/photo_1.jpg", width=451, height=300, author="Editor"),
    ]))

    report = await run_import(export, tmp_path / "index")

    async with opened_service(tmp_path / "index") as service:
        sighting = await service.chat_records.sighting(-1_001_500_000_001, 1)
        in_channel = await service.count(scope=-1_001_500_000_001)
    assert (report.chat_id, report.imported) == (-1_001_500_000_001, 1)
    assert in_channel == 1
    assert sighting is not None
    assert (sighting["sender_id"], sighting["sender_name"]) == (None, "Cat news")
