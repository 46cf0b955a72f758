"""End to end: the repost watch of groups (/watch, /settings, repost answers and their buttons,
albums, forwards, edits, channel posts, /forget, retention, restarts)."""

from __future__ import annotations

import asyncio
import io
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
from conftest import jpeg_bytes, photo_array
from PIL import Image

from bot import replies
from bot.app import BotApplication
from bot.settings import SettingsError, parse_settings
from bot.watch import (
    DELETE_REPOST,
    NOT_A_REPOST,
    ChatSettings,
    RepostWatch,
    next_value,
    with_change,
)
from testsupport.edits import compose_page
from testsupport.engine import copy_index
from testsupport.telegram_emulator import SentMessage, TelegramEmulator

COLLECTION = ("astronaut", "coffee")
SEEN = "🔁 Seen before"
DAY_S = 86_400


@pytest.fixture(scope="module")
def template_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("watch")
    return build_test_index([photos_dir / f"{name}.jpg" for name in COLLECTION], folder / "index")


@pytest.fixture
def index_dir(template_index: Path, tmp_path: Path) -> Path:
    return copy_index(template_index, tmp_path / "index")


def watch_of(application: BotApplication) -> RepostWatch:
    watch = application.bot_data.watch
    assert watch is not None
    return watch


def link_of(message: SentMessage) -> str:
    [url] = [e["url"] for e in message.message.get("entities", []) if e["type"] == "text_link"]
    return str(url)


def png_bytes(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo_array(name)).save(buffer, "PNG")
    return buffer.getvalue()


async def idle(application: BotApplication) -> None:
    """Wait until the watch has checked everything it received (and albums are answered)."""
    watch = watch_of(application)
    for _ in range(int(REPLY_DEADLINE_S / 0.05)):
        if watch.backlog == 0 and await watch.records.inbox_count() == 0:
            await asyncio.sleep(0.5)  # an album's answer waits album_wait_s
            if watch.backlog == 0:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError("the watch did not catch up")


async def test_a_supergroup_without_privacy_mode_gets_every_kind_of_repost_answered(
    index_dir: Path,
) -> None:
    async with TelegramEmulator(group_privacy=False) as emu:
        alice = emu.create_user("Alice")
        bob = emu.create_user("Bob")
        carol = emu.create_user("Carol")
        group = emu.create_group("Photo club", [alice, bob, carol], chat_type="supergroup")
        channel = emu.create_channel("Club news")
        emu.set_member_status(group, alice, "administrator")
        settings = bot_settings(emu, index_dir, watch={"album_wait_s": 0.3})
        async with running(make_bot(settings)) as application:
            emu.user_sends_text(group, bob, "/watch on")
            [refused] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            emu.user_sends_text(group, alice, "/watch maybe")
            [usage] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            emu.user_sends_text(group, alice, "/watch on")
            [switched] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)

            original = emu.user_sends_photo(group, bob, photo_bytes("horse"))
            emu.user_sends_photo(group, carol, photo_bytes("rocket"))  # new: no answer
            emu.user_sends_photo(group, carol, edited_photo("coffee"))  # offline only: none
            repost = emu.user_sends_photo(group, alice, edited_photo("horse"))
            [first] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            album = emu.user_sends_album(
                group, carol, [photo_bytes("moon"), edited_photo("horse", angle=-3.0)]
            )
            [album_answer] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            forward = emu.user_forwards_photo(
                group, carol, photo_bytes("horse"), original_sender=alice
            )
            [forwarded] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            clock = emu.user_sends_photo(group, bob, photo_bytes("clock"))
            await idle(application)
            emu.user_edits_photo(group, bob, clock, edited_photo("horse", keep=0.7))
            [edited] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            document = emu.user_sends_document(
                group, alice, png_bytes("horse"), file_name="horse.png", mime_type="image/png"
            )
            [as_file] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            post = emu.channel_post_arrives(group, channel, edited_photo("moon", angle=2.0))
            [from_channel] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
            await idle(application)

    assert refused.text == "🔒 Only this chat's admins can do that."
    assert usage.text is not None
    assert "/watch on" in usage.text
    assert switched.text is not None
    assert switched.text.startswith("👁 Repost watch is on")
    internal = str(group.id).removeprefix("-100")
    link = f"https://t.me/c/{internal}/{original['message_id']}"

    assert first.reply_to_message_id == repost["message_id"]
    assert first.text is not None
    assert first.text.startswith(f"{SEEN}: first posted by Bob on ")
    assert first.text.endswith("Seen twice.")
    assert link_of(first) == link
    buttons = first.message["reply_markup"]["inline_keyboard"][0]
    assert [b["callback_data"] for b in buttons] == [
        f"{NOT_A_REPOST}:{repost['message_id']}",
        f"{DELETE_REPOST}:{repost['message_id']}",
    ]

    assert album_answer.reply_to_message_id == album[1]["message_id"]  # the repost item
    assert album_answer.text is not None
    assert album_answer.text.endswith("Seen 3 times.")
    assert forwarded.reply_to_message_id == forward["message_id"]
    assert forwarded.text is not None
    assert forwarded.text.endswith("Seen 4 times.")
    assert edited.reply_to_message_id == clock["message_id"]
    assert edited.text is not None
    assert edited.text.endswith("Seen 5 times.")
    assert as_file.reply_to_message_id == document["message_id"]
    assert link_of(as_file) == link
    # The channel post repeats the album's first photo, posted by Carol.
    assert from_channel.reply_to_message_id == post["message_id"]
    assert from_channel.text is not None
    assert "by Carol" in from_channel.text
    assert link_of(from_channel).endswith(f"/{album[0]['message_id']}")
    # Rocket (new) and coffee (only in the offline collection, which does not count by
    # default) got no answer: every message is accounted for above.
    assert len(emu.messages_sent(group)) == 9


# A photo shown small on a page of text: the whole page's first look misses it, and only the
# look at the photo inside the page finds it (tests/test_search.py shows the same pages).
async def test_a_photo_shown_small_on_a_page_is_seen_before_and_other_pages_are_not(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    bob = emu.create_user("Bob")
    group = emu.create_group("Reading club", [alice, bob], chat_type="supergroup")
    emu.set_member_status(group, alice, "administrator")
    emu.set_member_status(group, emu.bot_user, "administrator")  # it sees every message
    async with running(make_bot(bot_settings(emu, index_dir))) as application:
        emu.user_sends_text(group, alice, "/watch on")
        await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        original = emu.user_sends_photo(group, bob, photo_bytes("chelsea"))
        # Another page of text, showing a photo never posted: new, so no answer, though its
        # text and layout are much like the next page's.
        emu.user_sends_photo(
            group, alice, jpeg_bytes(compose_page(photo_array("camera"), 6).image, 85)
        )
        page = emu.user_sends_photo(
            group, alice, jpeg_bytes(compose_page(photo_array("chelsea"), 3).image, 85)
        )
        emu.user_sends_photo(group, bob, photo_bytes("moon"))  # new: no answer
        await idle(application)
        checked = watch_of(application).figures.checked

    answers = emu.messages_sent(group)[1:]
    assert checked == 4
    assert [a.reply_to_message_id for a in answers] == [page["message_id"]]
    [answer] = answers
    assert answer.text is not None
    assert answer.text.startswith(f"{SEEN}: first posted by Bob on ")
    internal = str(group.id).removeprefix("-100")
    assert link_of(answer) == f"https://t.me/c/{internal}/{original['message_id']}"


async def test_buttons_settings_restart_retention_and_forget_in_a_public_group(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")  # a chat admin
    bob = emu.create_user("Bob")
    carol = emu.create_user("Carol")
    dave = emu.create_user("Dave")
    group = emu.create_group(
        "Public club", [alice, bob, carol, dave], chat_type="supergroup", username="photoclub"
    )
    emu.set_member_status(group, alice, "administrator")
    settings = bot_settings(emu, index_dir)
    async with running(make_bot(settings)):
        # Privacy mode on and not an admin: the bot says what to change.
        emu.user_sends_text(group, alice, "/watch on")
        [switched, blind] = await emu.wait_for_messages(group, 2, timeout=REPLY_DEADLINE_S)
        # Made an admin, without the right to delete messages: it now sees every photo.
        emu.set_member_status(group, emu.bot_user, "administrator", can_delete_messages=False)
        original = emu.user_sends_photo(group, bob, photo_bytes("horse"))
        repost = emu.user_sends_photo(group, carol, edited_photo("horse"))
        [answer] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)

        not_a_repost = f"{NOT_A_REPOST}:{repost['message_id']}"
        denied = emu.user_presses_button(group, dave, answer, not_a_repost)
        await emu.wait_for(lambda _: denied in emu.callback_answers, timeout=REPLY_DEADLINE_S)
        accepted = emu.user_presses_button(group, carol, answer, not_a_repost)
        await emu.wait_for(lambda _: accepted in emu.callback_answers, timeout=REPLY_DEADLINE_S)
        # Carol's photo is now a picture of its own, kept apart from Bob's: another copy of it
        # (another file) is a repost of hers, not of Bob's, and a copy of Bob's is his.
        copy_of_carols = emu.user_sends_photo(group, dave, edited_photo("horse", quality=70))
        [carols_again] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        again = emu.user_sends_photo(group, dave, png_bytes("horse"))
        [second] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)

        delete = f"{DELETE_REPOST}:{again['message_id']}"
        not_admin = emu.user_presses_button(group, dave, second, delete)
        no_right = emu.user_presses_button(group, alice, second, delete)
        await emu.wait_for(
            lambda _: {not_admin, no_right} <= emu.callback_answers.keys(),
            timeout=REPLY_DEADLINE_S,
        )
        emu.set_member_status(group, emu.bot_user, "administrator")
        deleted = emu.user_presses_button(group, alice, second, delete)
        await emu.wait_for(lambda _: deleted in emu.callback_answers, timeout=REPLY_DEADLINE_S)
        # Carol takes her picture out of the history (below, Bob's goes too).
        emu.user_sends_text(group, carol, "/forget", reply_to=repost)
        [carols_forgotten] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)

        emu.user_sends_text(group, alice, "/settings")
        [panel] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        for button in ("settings:style", "settings:keep", "settings:global", "settings:add"):
            pressed = emu.user_presses_button(group, alice, panel, button)
            await emu.wait_for(lambda _, p=pressed: p in emu.callback_answers, timeout=30)
        stranger = emu.user_presses_button(group, bob, panel, "settings:watch")
        await emu.wait_for(lambda _: stranger in emu.callback_answers, timeout=30)

    assert switched.text is not None
    assert switched.text.startswith("👁 Repost watch is on")
    assert blind.text is not None
    assert "/setprivacy" in blind.text
    assert "admin" in blind.text
    assert answer.reply_to_message_id == repost["message_id"]
    assert link_of(answer) == f"https://t.me/photoclub/{original['message_id']}"
    assert emu.callback_answers[denied]["show_alert"] is True
    assert emu.callback_answers[denied]["text"] == replies.only_admins_or_poster()
    assert emu.callback_answers[accepted]["text"] == replies.not_a_repost_noted()
    assert (group.id, answer.message_id) in emu.deleted
    assert carols_again.reply_to_message_id == copy_of_carols["message_id"]
    assert link_of(carols_again) == f"https://t.me/photoclub/{repost['message_id']}"
    assert second.reply_to_message_id == again["message_id"]
    assert link_of(second) == f"https://t.me/photoclub/{original['message_id']}"
    assert second.text is not None
    assert second.text.endswith("Seen twice.")
    assert emu.callback_answers[not_admin]["text"] == replies.only_admins_here()
    assert emu.callback_answers[no_right]["text"] == replies.cannot_delete()
    assert emu.callback_answers[deleted]["text"] == replies.repost_deleted()
    assert {(group.id, again["message_id"]), (group.id, second.message_id)} <= emu.deleted
    assert carols_forgotten.text is not None
    assert carols_forgotten.text.startswith("🧹 Forgotten")
    assert emu.callback_answers[stranger]["text"] == replies.only_admins_here()
    keyboard = emu.current_message(group, panel.message_id)
    assert keyboard is not None
    labels = [row[0]["text"] for row in keyboard["reply_markup"]["inline_keyboard"]]
    assert labels == [
        "👁 Watch: on",
        "↩️ Answer: a reaction only",
        "📁 Offline collection counts: yes",
        "🗓 Forget photos after 7 days",
        "✋ Who may /add: chat admins",
    ]

    # A restart keeps the settings: a repost now gets a reaction, not a message.
    sent_before = len(emu.messages_sent(group))
    async with running(make_bot(settings)) as application:
        emu.clock_offset_s = -10 * DAY_S
        old = emu.user_sends_photo(group, bob, photo_bytes("moon"))
        emu.clock_offset_s = 0
        reacted = emu.user_sends_photo(group, dave, photo_bytes("horse"))
        offline = emu.user_sends_photo(group, dave, edited_photo("coffee"))  # global counts now
        await idle(application)
        [job] = [job for job in application.job_queue.jobs() if job.name == "retention"]
        await job.run(application)
        fresh_moon = emu.user_sends_photo(group, carol, edited_photo("moon"))
        emu.user_sends_text(group, dave, "/forget", reply_to=original)
        [not_yours] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_text(group, bob, "/forget")
        [usage] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        emu.user_sends_text(group, bob, "/forget", reply_to=original)
        [forgotten] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        after_forget = emu.user_sends_photo(group, carol, edited_photo("horse", angle=6.0))
        emu.user_sends_photo(group, bob, photo_bytes("rocket"), caption="/add")
        [add_refused] = await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        await idle(application)
        watch = watch_of(application)
        moon_sighting = await watch.sighting(group.id, old["message_id"])
        fresh_sighting = await watch.sighting(group.id, fresh_moon["message_id"])

    # Only the three /forget replies and the refused /add: reposts got reactions.
    assert len(emu.messages_sent(group)) == sent_before + 4
    assert add_refused.text == "🔒 Only the admins can add photos here."
    assert emu.reactions[(group.id, reacted["message_id"])] == [{"type": "emoji", "emoji": "👀"}]
    assert (group.id, offline["message_id"]) in emu.reactions
    assert (group.id, old["message_id"]) not in emu.reactions
    # Ten days old with a 7-day retention: forgotten, so the next moon is a new original.
    assert moon_sighting is None
    assert fresh_sighting is not None
    assert (group.id, fresh_moon["message_id"]) not in emu.reactions
    assert not_yours.text == replies.forget_not_yours()
    assert usage.text == replies.forget_usage().replace("<code>", "").replace("</code>", "")
    assert forgotten.text is not None
    assert forgotten.text.startswith("🧹 Forgotten")
    # Bob's original is forgotten with its picture: the next horse starts a new history.
    assert (group.id, after_forget["message_id"]) not in emu.reactions


async def test_a_backlog_is_reported_to_the_admins_and_every_photo_is_still_checked(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    admin = emu.create_user("Operator")
    admin_chat = emu.private_chat(admin)
    alice = emu.create_user("Alice")
    group = emu.create_group("Busy", [alice, admin])
    emu.set_member_status(group, emu.bot_user, "administrator")
    settings = bot_settings(
        emu, index_dir, watch={"queue_size": 2}, access={"admins": [admin.id]}
    )
    names = ("horse", "moon", "clock", "rocket", "camera", "brick")
    async with running(make_bot(settings)) as application:
        emu.user_sends_text(group, admin, "/watch on")
        await emu.wait_for_messages(group, 1, timeout=REPLY_DEADLINE_S)
        posted = [emu.user_sends_photo(group, alice, photo_bytes(name)) for name in names]
        [alert] = await emu.wait_for_messages(admin_chat, 1, timeout=REPLY_DEADLINE_S)
        await idle(application)
        watch = watch_of(application)
        checked = watch.figures.checked
        recorded = [await watch.sighting(group.id, photo["message_id"]) for photo in posted]

    assert alert.text is not None
    assert alert.text.startswith("⏳ The repost watch is behind")
    assert checked == len(names)
    assert all(sighting is not None for sighting in recorded)
    assert watch.figures.largest_backlog >= 1


async def test_watch_and_settings_in_a_private_chat_explain_themselves(
    emu: TelegramEmulator, index_dir: Path
) -> None:
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    async with running(make_bot(bot_settings(emu, index_dir))):
        emu.user_sends_text(chat, alice, "/watch on")
        emu.user_sends_text(chat, alice, "/settings")
        watch, settings = await emu.wait_for_messages(chat, 2, timeout=REPLY_DEADLINE_S)
    assert watch.text is not None
    assert watch.text.startswith("👁 The repost watch works in groups")
    assert settings.text is not None
    assert settings.text.startswith("⚙️ /settings is for groups")


def test_settings_buttons_cycle_through_every_value() -> None:
    settings = ChatSettings(chat_id=-5)
    styles = [settings.reply_style]
    for _ in range(3):
        settings = with_change(settings, "style", "everyone")
        styles.append(settings.reply_style)
    assert styles == ["reply", "reaction", "silent", "reply"]
    assert with_change(settings, "add", "everyone").add_policy == "chat_admins"
    assert with_change(ChatSettings(-5, add_policy="admins"), "add", "everyone").add_policy == (
        "everyone"
    )
    assert next_value((0, 7, 30), 30) == 0
    with pytest.raises(ValueError, match="no setting"):
        with_change(settings, "colour", "everyone")


def test_watch_settings_are_validated(tmp_path: Path) -> None:
    emu_like = {"token": "123:" + "a" * 30}
    with pytest.raises(SettingsError, match=r"\[watch\] queue_size must be a whole number"):
        parse_settings(
            {"telegram": emu_like, "watch": {"queue_size": 0}}, environ={}, base_dir=tmp_path
        )
