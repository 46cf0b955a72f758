"""The Telegram Bot API emulator, driven by the real python-telegram-bot client over HTTP."""

from __future__ import annotations

import asyncio
import datetime as dtm
import html
import io
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import pytest
import skimage.data
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from telegram import (
    Bot,
    ChatMemberAdministrator,
    ChatMemberLeft,
    ChatMemberMember,
    ChatMemberOwner,
    InputMediaDocument,
    InputMediaPhoto,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction
from telegram.error import BadRequest, Conflict, Forbidden, RetryAfter
from telegram.ext import Application, ApplicationBuilder, CommandHandler, ContextTypes
from telegram.helpers import escape_markdown

from testsupport.telegram_emulator import (
    GET_FILE_LIMIT_BYTES,
    BotApiError,
    TelegramEmulator,
    entity_text,
    parse_formatted_text,
    polling,
)

DEADLINE_S = 5.0


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    return _encode(skimage.data.astronaut(), "JPEG")


@pytest.fixture(scope="module")
def coffee_png() -> bytes:
    return _encode(skimage.data.coffee(), "PNG")


@pytest.fixture
async def bot(emu: TelegramEmulator) -> AsyncIterator[Bot]:
    async with Bot(emu.token, base_url=emu.api_base_url, base_file_url=emu.file_base_url) as bot:
        yield bot


# ---- identity and requests -------------------------------------------------------------------


async def test_get_me_describes_the_bot_account(emu: TelegramEmulator, bot: Bot) -> None:
    me = await bot.get_me()

    assert me.is_bot
    assert me.username == emu.bot_user.username == "imgsearch_test_bot"
    assert me.id == emu.bot_user.id == int(emu.token.split(":")[0])
    assert me.can_read_all_group_messages is False  # privacy mode is on by default
    assert [call.method for call in emu.calls] == ["getMe", "getMe"]  # initialize() + ours


async def test_raw_http_answers_have_the_bot_api_shapes(emu: TelegramEmulator) -> None:
    user = emu.create_user("Ann")
    chat = emu.private_chat(user)
    emu.flood_next_calls("sendChatAction", 1, retry_after=7)
    async with aiohttp.ClientSession() as session:
        wrong_token = f"{emu.bot_user.id}:not-the-right-secret"
        async with session.post(f"{emu.url}/bot{wrong_token}/getMe") as response:
            assert response.status == 401
            assert await response.json() == {
                "ok": False,
                "error_code": 401,
                "description": "Unauthorized",
            }
        async with session.get(f"{emu.api_base_url}{emu.token}/noSuchMethod") as response:
            assert response.status == 404
            assert (await response.json())["description"] == "Not Found"
        # JSON bodies, GET query strings and any capitalisation of the name all work.
        async with session.post(
            f"{emu.api_base_url}{emu.token}/SENDMESSAGE", json={"chat_id": chat.id, "text": "hi"}
        ) as response:
            body = await response.json()
            assert body["ok"] is True
            assert body["result"]["text"] == "hi"
            assert isinstance(body["result"]["date"], int)
            assert body["result"]["from"]["is_bot"] is True
        async with session.get(
            f"{emu.api_base_url}{emu.token}/sendChatAction",
            params={"chat_id": str(chat.id), "action": "typing"},
        ) as response:
            assert response.status == 429
            assert await response.json() == {
                "ok": False,
                "error_code": 429,
                "description": "Too Many Requests: retry after 7",
                "parameters": {"retry_after": 7},
            }
        async with session.post(
            f"{emu.api_base_url}{emu.token}/sendMessage", data={"chat_id": "42", "text": "x"}
        ) as response:
            assert response.status == 400
            assert (await response.json())["description"] == "Bad Request: chat not found"

    assert [message.text for message in emu.messages_sent(chat)] == ["hi"]
    assert emu.chat_actions() == []


# ---- messages ----------------------------------------------------------------------------------


async def test_send_message_round_trip_and_reply(emu: TelegramEmulator, bot: Bot) -> None:
    alice = emu.create_user("Alice", "alice_w")
    chat = emu.private_chat(alice)
    question = emu.user_sends_text(chat, alice, "anything like this?")

    answer = await bot.send_message(
        chat.id,
        "Here you go",
        reply_parameters=ReplyParameters(question["message_id"]),
        link_preview_options=None,
    )

    assert answer.text == "Here you go"
    assert answer.chat.type == "private"
    assert answer.reply_to_message is not None
    assert answer.reply_to_message.text == "anything like this?"
    assert answer.reply_to_message.from_user is not None
    assert answer.reply_to_message.from_user.username == "alice_w"
    [sent] = await emu.wait_for_messages(chat, 1)
    assert sent.message_id == answer.message_id
    assert sent.reply_to_message_id == question["message_id"]
    assert sent.call.params["reply_parameters"] == {"message_id": question["message_id"]}

    with pytest.raises(BadRequest, match=r"(?i)message to be replied not found"):
        await bot.send_message(chat.id, "lost", reply_parameters=ReplyParameters(999))
    with pytest.raises(BadRequest, match=r"(?i)chat not found"):
        await bot.send_message(-123, "nobody")
    assert len(emu.messages_sent()) == 1


async def test_parse_modes_become_plain_text_and_entities(emu: TelegramEmulator, bot: Bot) -> None:
    user = emu.create_user("Bo")
    chat = emu.private_chat(user)

    html_message = await bot.send_message(
        chat.id, '<b>3 matches</b> for <a href="https://x.test/p?a=1&amp;b=2">a&lt;b</a> 👍', "HTML"
    )
    markdown = await bot.send_message(
        chat.id, "*score* 0\\.93 for `cat_01.jpg` 🐱 _done_", parse_mode="MarkdownV2"
    )

    assert html_message.text == "3 matches for a<b 👍"
    assert [(e.type, html_message.parse_entity(e)) for e in html_message.entities] == [
        (MessageEntity.BOLD, "3 matches"),
        (MessageEntity.TEXT_LINK, "a<b"),
    ]
    assert html_message.entities[1].url == "https://x.test/p?a=1&b=2"
    assert markdown.text == "score 0.93 for cat_01.jpg 🐱 done"
    assert [(e.type, markdown.parse_entity(e)) for e in markdown.entities] == [
        (MessageEntity.BOLD, "score"),
        (MessageEntity.CODE, "cat_01.jpg"),
        (MessageEntity.ITALIC, "done"),
    ]
    padded = await bot.send_message(chat.id, "\n  <b>padded</b>  \n", parse_mode="HTML")
    assert padded.text == "padded"  # Telegram trims texts; entities follow
    assert [(e.type, e.offset, e.length) for e in padded.entities] == [("bold", 0, 6)]
    with pytest.raises(BadRequest, match=r"(?i)can't parse entities: character '\.' is reserved"):
        await bot.send_message(chat.id, "score 0.93", parse_mode="MarkdownV2")
    with pytest.raises(BadRequest, match=r"(?i)can't parse entities"):
        await bot.send_message(chat.id, "<b>unclosed", parse_mode="HTML")
    with pytest.raises(BadRequest, match=r"(?i)message is too long"):
        await bot.send_message(chat.id, "x" * 4097)
    assert [sent.text for sent in emu.messages_sent(chat)] == [
        html_message.text,
        markdown.text,
        "padded",
    ]


def _entity(kind: str, offset: int, length: int, **extra: str) -> dict[str, object]:
    return {"offset": offset, "length": length, "type": kind, **extra}


@pytest.mark.parametrize(
    ("source", "parse_mode", "text", "entities"),
    [
        (
            '<pre><code class="language-python">x = 1</code></pre>',
            "HTML",
            "x = 1",
            [_entity("pre", 0, 5, language="python")],
        ),
        (
            '<span class="tg-spoiler">s</span> <tg-spoiler>t</tg-spoiler> <u>u</u>',
            "HTML",
            "s t u",
            [_entity("spoiler", 0, 1), _entity("spoiler", 2, 1), _entity("underline", 4, 1)],
        ),
        (
            "<blockquote expandable>q</blockquote>",
            "HTML",
            "q",
            [_entity("expandable_blockquote", 0, 1)],
        ),
        (
            "__u__ ~s~ ||h||",
            "MarkdownV2",
            "u s h",
            [_entity("underline", 0, 1), _entity("strikethrough", 2, 1), _entity("spoiler", 4, 1)],
        ),
        (
            "[*bold* link](https://x.test/a\\)b)",
            "MarkdownV2",
            "bold link",
            [_entity("text_link", 0, 9, url="https://x.test/a)b"), _entity("bold", 0, 4)],
        ),
        (
            "```python\nprint(1)\n```",
            "MarkdownV2",
            "print(1)\n",
            [_entity("pre", 0, 9, language="python")],
        ),
        (
            ">quoted\n>more\nplain",
            "MarkdownV2",
            "quoted\nmore\nplain",
            [_entity("blockquote", 0, 11)],
        ),
        (
            "*bold* _it_ [l](https://x.test) `c`",
            "Markdown",
            "bold it l c",
            [
                _entity("bold", 0, 4),
                _entity("italic", 5, 2),
                _entity("text_link", 8, 1, url="https://x.test"),
                _entity("code", 10, 1),
            ],
        ),
    ],
)
def test_formatting_is_parsed_like_telegram(
    source: str, parse_mode: str, text: str, entities: list[dict[str, object]]
) -> None:
    assert parse_formatted_text(source, parse_mode) == (text, entities)


@pytest.mark.parametrize(
    ("source", "parse_mode", "complaint"),
    [
        ("line<br>break", "HTML", 'Unsupported start tag "br"'),
        ("<b>x</i>", "HTML", 'expected "</b>", found "</i>"'),
        ("1 < 2", "HTML", "Unsupported start tag"),
        ("*open", "MarkdownV2", "Can't find end of Bold entity"),
        ("cat-01.jpg", "MarkdownV2", "Character '-' is reserved"),
        ("_open", "Markdown", "Can't find end of the entity"),
        ("x", "Markdown3", "unsupported parse_mode"),
    ],
)
def test_malformed_formatting_is_refused(source: str, parse_mode: str, complaint: str) -> None:
    with pytest.raises(BotApiError) as refused:
        parse_formatted_text(source, parse_mode)
    assert refused.value.http_status == 400
    assert complaint in refused.value.description


@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=80))
def test_escaped_text_reads_back_as_itself(text: str) -> None:
    assert parse_formatted_text(escape_markdown(text, version=2), "MarkdownV2") == (text, [])
    assert parse_formatted_text(escape_markdown(text, version=1), "Markdown") == (text, [])
    assert parse_formatted_text(html.escape(text), "HTML") == (text, [])


async def test_user_text_carries_command_and_mention_entities(emu: TelegramEmulator) -> None:
    user = emu.create_user("Cy")
    group = emu.create_group("Photos", [user])

    command = emu.user_sends_text(group, user, "/search@imgsearch_test_bot cats")
    mention = emu.user_sends_text(group, user, "👍 ask @imgsearch_test_bot /help")

    assert command["entities"] == [{"offset": 0, "length": 26, "type": "bot_command"}]
    assert command["chat"] == {"id": group.id, "type": "group", "title": "Photos"}
    kinds = [
        (entity["type"], entity_text(mention["text"], entity)) for entity in mention["entities"]
    ]
    assert kinds == [("mention", "@imgsearch_test_bot"), ("bot_command", "/help")]
    assert mention["entities"][0]["offset"] == 7  # the emoji is two UTF-16 code units


async def test_reply_to_message_holds_the_replied_message(emu: TelegramEmulator) -> None:
    user = emu.create_user("Di")
    group = emu.create_group("Team", [user], chat_type="supergroup")
    first = emu.user_sends_text(group, user, "first")
    second = emu.user_sends_text(group, user, "second", reply_to=first)
    third = emu.user_sends_text(group, user, "third", reply_to=second["message_id"])

    assert str(group.id).startswith("-100")
    assert second["reply_to_message"] == first
    # Telegram nests the replied-to message one level deep only.
    assert third["reply_to_message"]["text"] == "second"
    assert "reply_to_message" not in third["reply_to_message"]
    assert [first["message_id"], second["message_id"], third["message_id"]] == [1, 2, 3]


# ---- photos and files --------------------------------------------------------------------------


async def test_send_photo_upload_then_reuse_of_its_file_id(
    emu: TelegramEmulator, bot: Bot, coffee_png: bytes
) -> None:
    user = emu.create_user("Ed")
    chat = emu.private_chat(user)

    uploaded = await bot.send_photo(
        chat.id, coffee_png, caption="<i>best</i> match", parse_mode="HTML"
    )
    reused = await bot.send_photo(chat.id, uploaded.photo[-1].file_id)

    assert len(uploaded.photo) >= 2
    assert (uploaded.photo[-1].width, uploaded.photo[-1].height) == (600, 400)
    assert uploaded.photo[0].width < uploaded.photo[-1].width
    assert uploaded.caption == "best match"
    assert uploaded.caption_entities[0].type == MessageEntity.ITALIC
    assert emu.file_bytes(uploaded.photo[-1].file_id) == coffee_png
    [first_call] = emu.calls_of("sendPhoto")[:1]
    assert first_call.files["photo"].data == coffee_png
    # Fresh file_ids for the same photo; file_unique_id is what stays.
    assert [size.file_id for size in reused.photo] != [size.file_id for size in uploaded.photo]
    assert [size.file_unique_id for size in reused.photo] == [
        size.file_unique_id for size in uploaded.photo
    ]
    sent = await emu.wait_for_messages(chat, 2)
    assert emu.file_bytes(sent[1].largest_photo_file_id) == coffee_png
    with pytest.raises(BadRequest, match=r"(?i)wrong file identifier"):
        await bot.send_photo(chat.id, "AgACnotAFileId")
    with pytest.raises(BadRequest, match=r"(?i)IMAGE_PROCESS_FAILED"):
        await bot.send_photo(chat.id, b"definitely not an image")
    assert len(emu.messages_sent(chat)) == 2


async def test_send_document_keeps_name_type_and_bytes(emu: TelegramEmulator, bot: Bot) -> None:
    user = emu.create_user("Fay")
    chat = emu.private_chat(user)

    sent = await bot.send_document(chat.id, b"a,b\n1,2\n", filename="report.csv", caption="csv")

    assert sent.document is not None
    assert sent.document.file_name == "report.csv"
    assert sent.document.mime_type == "text/csv"
    assert sent.caption == "csv"
    assert emu.file_bytes(sent.document.file_id) == b"a,b\n1,2\n"


async def test_send_media_group_with_uploads_and_file_ids(
    emu: TelegramEmulator, bot: Bot, astronaut_jpeg: bytes, coffee_png: bytes
) -> None:
    user = emu.create_user("Gus")
    chat = emu.private_chat(user)
    known = await bot.send_photo(chat.id, astronaut_jpeg)

    album = await bot.send_media_group(
        chat.id,
        [
            InputMediaPhoto(coffee_png, caption="1. coffee"),
            InputMediaPhoto(known.photo[-1].file_id, caption="2. astronaut"),
        ],
    )

    assert len(album) == 2
    assert album[0].media_group_id is not None
    assert album[0].media_group_id == album[1].media_group_id
    assert [message.caption for message in album] == ["1. coffee", "2. astronaut"]
    assert emu.file_bytes(album[0].photo[-1].file_id) == coffee_png
    assert album[1].photo[-1].file_unique_id == known.photo[-1].file_unique_id
    [call] = emu.calls_of("sendMediaGroup")
    [upload] = call.files.values()
    assert upload.data == coffee_png
    assert call.params["media"][0]["media"] == f"attach://{upload.field_name}"
    assert len(emu.messages_sent(chat)) == 3


@pytest.mark.parametrize(
    ("item_count", "description"),
    [(1, r"(?i)wrong number of messages"), (11, r"(?i)too many messages to send as an album")],
)
async def test_send_media_group_refuses_wrong_item_counts(
    emu: TelegramEmulator, bot: Bot, coffee_png: bytes, item_count: int, description: str
) -> None:
    user = emu.create_user("Hal")
    chat = emu.private_chat(user)

    with pytest.raises(BadRequest, match=description):
        await bot.send_media_group(chat.id, [InputMediaPhoto(coffee_png)] * item_count)
    with pytest.raises(BadRequest, match=r"(?i)can't be mixed"):
        await bot.send_media_group(
            chat.id, [InputMediaPhoto(coffee_png), InputMediaDocument(b"doc", filename="a.txt")]
        )
    assert emu.messages_sent() == []


async def test_user_photo_downloads_as_the_exact_bytes_sent(
    emu: TelegramEmulator, bot: Bot, astronaut_jpeg: bytes
) -> None:
    user = emu.create_user("Ivy")
    chat = emu.private_chat(user)
    message = emu.user_sends_photo(chat, user, astronaut_jpeg, caption="/search like this")

    largest = message["photo"][-1]
    smallest = message["photo"][0]
    file = await bot.get_file(largest["file_id"])
    downloaded = await file.download_as_bytearray()
    thumbnail = await (await bot.get_file(smallest["file_id"])).download_as_bytearray()

    assert bytes(downloaded) == astronaut_jpeg
    assert (largest["width"], largest["height"]) == (512, 512)
    assert largest["file_size"] == len(astronaut_jpeg) == file.file_size
    assert message["caption_entities"] == [{"offset": 0, "length": 7, "type": "bot_command"}]
    with Image.open(io.BytesIO(bytes(thumbnail))) as image:
        assert image.size == (smallest["width"], smallest["height"])
        assert max(image.size) < 512


async def test_album_and_document_from_a_user(
    emu: TelegramEmulator, bot: Bot, astronaut_jpeg: bytes, coffee_png: bytes
) -> None:
    user = emu.create_user("Jo")
    chat = emu.private_chat(user)

    album = emu.user_sends_album(chat, user, [astronaut_jpeg, coffee_png], caption="two")
    document = emu.user_sends_document(
        chat, user, coffee_png, file_name="Coffee.PNG", mime_type="image/png", reply_to=album[0]
    )
    updates = await bot.get_updates(timeout=0)

    assert [update.message.media_group_id for update in updates[:2] if update.message] == [
        album[0]["media_group_id"]
    ] * 2
    assert [update.message.caption for update in updates[:2] if update.message] == ["two", None]
    last = updates[2].message
    assert last is not None
    assert last.document is not None
    assert last.document.file_name == "Coffee.PNG"
    assert last.reply_to_message is not None
    assert last.reply_to_message.message_id == album[0]["message_id"]
    file = await bot.get_file(document["document"]["file_id"])
    assert file.file_path is not None
    assert file.file_path.endswith(".png")
    assert bytes(await file.download_as_bytearray()) == coffee_png


async def test_get_file_refuses_files_over_20_megabytes(emu: TelegramEmulator, bot: Bot) -> None:
    user = emu.create_user("Kim")
    chat = emu.private_chat(user)
    message = emu.user_sends_oversized_document(
        chat,
        user,
        file_size=GET_FILE_LIMIT_BYTES + 1,
        file_name="huge.tiff",
        mime_type="image/tiff",
    )

    assert message["document"]["file_size"] == GET_FILE_LIMIT_BYTES + 1
    with pytest.raises(BadRequest, match=r"(?i)file is too big"):
        await bot.get_file(message["document"]["file_id"])


# ---- updates -----------------------------------------------------------------------------------


async def test_long_poll_returns_as_soon_as_an_update_arrives(
    emu: TelegramEmulator, bot: Bot
) -> None:
    user = emu.create_user("Lee")
    chat = emu.private_chat(user)
    poll = asyncio.create_task(bot.get_updates(timeout=30))
    await emu.wait_for_long_poll(timeout=DEADLINE_S)

    emu.user_sends_text(chat, user, "wake up")
    async with asyncio.timeout(DEADLINE_S):  # far less than the 30 s poll timeout
        updates = await poll

    assert [update.message.text for update in updates if update.message] == ["wake up"]


async def test_long_poll_without_updates_answers_empty_after_its_timeout(
    emu: TelegramEmulator, bot: Bot
) -> None:
    assert await bot.get_updates(timeout=1) == ()
    [call] = emu.calls_of("getUpdates")
    assert call.ok
    assert call.params["timeout"] == 1


async def test_get_updates_offset_confirms_earlier_updates(emu: TelegramEmulator, bot: Bot) -> None:
    user = emu.create_user("Max")
    chat = emu.private_chat(user)
    for text in ("one", "two", "three"):
        emu.user_sends_text(chat, user, text)

    first_batch = await bot.get_updates(limit=2)
    unconfirmed = await bot.get_updates()
    after_first = await bot.get_updates(offset=first_batch[0].update_id + 1)
    after_all = await bot.get_updates(offset=after_first[-1].update_id + 1)

    assert [u.message.text for u in first_batch if u.message] == ["one", "two"]
    assert [u.update_id for u in unconfirmed] == [u.update_id for u in first_batch] + [
        unconfirmed[-1].update_id
    ]
    assert first_batch[1].update_id == first_batch[0].update_id + 1
    assert [u.message.text for u in after_first if u.message] == ["two", "three"]
    assert after_all == ()
    assert emu.pending_update_count == 0


async def test_allowed_updates_drops_other_update_types(emu: TelegramEmulator, bot: Bot) -> None:
    user = emu.create_user("Nia")
    chat = emu.private_chat(user)
    emu.user_sends_text(chat, user, "not wanted")

    only_callbacks = await bot.get_updates(allowed_updates=["callback_query"])
    emu.user_sends_text(chat, user, "wanted")
    everything = await bot.get_updates(allowed_updates=[])

    assert only_callbacks == ()
    assert [u.message.text for u in everything if u.message] == ["wanted"]


async def test_a_second_poll_terminates_the_first_with_conflict(
    emu: TelegramEmulator, bot: Bot
) -> None:
    first = asyncio.create_task(bot.get_updates(timeout=30))
    await emu.wait_for_long_poll(timeout=DEADLINE_S)

    # A second instance of the same bot, as when two deployments run at once.
    async with Bot(emu.token, base_url=emu.api_base_url) as second_instance:
        assert await second_instance.get_updates(timeout=0) == ()
    with pytest.raises(Conflict, match=r"(?i)terminated by other getUpdates request"):
        async with asyncio.timeout(DEADLINE_S):
            await first


async def test_group_privacy_filters_what_the_bot_receives(
    emu: TelegramEmulator, bot: Bot, coffee_png: bytes
) -> None:
    user = emu.create_user("Ned")
    group = emu.create_group("Friends", [user])
    emu.user_sends_text(group, user, "just chatting")
    emu.user_sends_photo(group, user, coffee_png)
    emu.user_sends_text(group, user, "/search@other_bot")
    emu.user_sends_text(group, user, "/search")
    emu.user_sends_text(group, user, "/search@imgsearch_test_bot")
    emu.user_sends_text(group, user, "hey @imgsearch_test_bot")
    reply = await bot.send_message(group.id, "I only hear commands here")
    emu.user_sends_text(group, user, "ok", reply_to=reply.message_id)

    received = [u.message.text for u in await bot.get_updates() if u.message]
    emu.set_member_status(group, emu.bot_user, "administrator")
    emu.user_sends_text(group, user, "admins hear everything")
    received_as_admin = [u.message.text for u in await bot.get_updates(offset=-1) if u.message]

    assert received == ["/search", "/search@imgsearch_test_bot", "hey @imgsearch_test_bot", "ok"]
    assert received_as_admin == ["admins hear everything"]


# ---- flood control, chat state -----------------------------------------------------------------


async def test_flood_control_raises_retry_after_and_has_no_effect(
    emu: TelegramEmulator, bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PTB 22 warns on int retry_after unless opted in to timedelta; warnings are errors here.
    monkeypatch.setenv("PTB_TIMEDELTA", "1")
    user = emu.create_user("Oz")
    chat = emu.private_chat(user)
    emu.flood_next_calls("sendMessage", 2, retry_after=3)

    for _ in range(2):
        with pytest.raises(RetryAfter) as refused:
            await bot.send_message(chat.id, "too fast")
        assert refused.value.retry_after == dtm.timedelta(seconds=3)
    assert emu.messages_sent() == []
    await bot.send_message(chat.id, "in time")

    assert [m.text for m in emu.messages_sent(chat)] == ["in time"]
    assert [call.http_status for call in emu.calls_of("sendMessage")] == [429, 429, 200]


async def test_random_flood_refuses_a_seeded_share_of_calls(
    emu: TelegramEmulator, bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTB_TIMEDELTA", "1")
    user = emu.create_user("Pat")
    chat = emu.private_chat(user)
    emu.flood_random_share("sendChatAction", 0.5, retry_after=1, seed=7)

    outcomes: list[bool] = []
    for _ in range(30):
        try:
            await bot.send_chat_action(chat.id, ChatAction.UPLOAD_PHOTO)
            outcomes.append(True)
        except RetryAfter:
            outcomes.append(False)

    assert 0 < outcomes.count(False) < 30
    assert len(emu.chat_actions(chat)) == outcomes.count(True)
    assert {action.action for action in emu.chat_actions(chat)} == {"upload_photo"}


async def test_chat_actions_and_messages_share_one_ordered_outbox(
    emu: TelegramEmulator, bot: Bot
) -> None:
    user = emu.create_user("Quin")
    chat = emu.private_chat(user)

    await bot.send_chat_action(chat.id, ChatAction.TYPING)
    await bot.send_message(chat.id, "done")
    with pytest.raises(BadRequest, match=r"(?i)wrong parameter action"):
        await bot.send_chat_action(chat.id, "dancing")

    assert [type(output).__name__ for output in emu.outbox] == ["SentChatAction", "SentMessage"]


async def test_get_chat_member_reports_the_status_the_test_set(
    emu: TelegramEmulator, bot: Bot
) -> None:
    owner, admin, member, stranger = (emu.create_user(name) for name in ("Ra", "Sy", "Ty", "Uma"))
    group = emu.create_group("Club", [owner, admin, member], chat_type="supergroup")
    emu.set_member_status(group, owner, "creator")
    emu.set_member_status(group, admin, "administrator")

    statuses = [await bot.get_chat_member(group.id, u.id) for u in (owner, admin, member, stranger)]

    assert [type(status) for status in statuses] == [
        ChatMemberOwner,
        ChatMemberAdministrator,
        ChatMemberMember,
        ChatMemberLeft,
    ]
    assert statuses[1].user.id == admin.id


async def test_bot_cannot_post_where_it_is_blocked_or_kicked(
    emu: TelegramEmulator, bot: Bot
) -> None:
    user = emu.create_user("Vic")
    chat = emu.private_chat(user)
    group = emu.create_group("Old group", [user])
    emu.block_bot(user)
    emu.set_member_status(group, emu.bot_user, "kicked")

    with pytest.raises(Forbidden, match=r"(?i)bot was blocked by the user"):
        await bot.send_message(chat.id, "hello?")
    with pytest.raises(Forbidden, match=r"(?i)bot was kicked"):
        await bot.send_message(group.id, "hello?")
    assert emu.messages_sent() == []


async def test_my_commands_are_stored_per_scope_and_language(
    emu: TelegramEmulator, bot: Bot
) -> None:
    await bot.set_my_commands([("search", "Find similar photos"), ("help", "How it works")])
    await bot.set_my_commands([("search", "Ähnliche Fotos finden")], language_code="de")

    default = await bot.get_my_commands()
    german = await bot.get_my_commands(language_code="de")

    assert [(c.command, c.description) for c in default] == [
        ("search", "Find similar photos"),
        ("help", "How it works"),
    ]
    assert [c.command for c in german] == ["search"]
    assert emu.bot_commands("de") == [{"command": "search", "description": "Ähnliche Fotos finden"}]
    with pytest.raises(BadRequest, match=r"(?i)BOT_COMMAND_INVALID"):
        await bot.set_my_commands([("Bad Command", "spaces and capitals are refused")])


# ---- a real PTB Application --------------------------------------------------------------------


async def _greet(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    assert update.message is not None
    await update.message.reply_text("Hello! Send me a photo.", do_quote=True)


def _application(emu: TelegramEmulator) -> Application:  # type: ignore[type-arg]
    application = (
        ApplicationBuilder()
        .token(emu.token)
        .base_url(emu.api_base_url)
        .base_file_url(emu.file_base_url)
        .build()
    )
    application.add_handler(CommandHandler("start", _greet))
    return application


async def test_application_answers_start_and_ignores_other_bots_commands() -> None:
    # Privacy off, so /start@other_bot does reach the bot and PTB's own filtering is tested.
    async with TelegramEmulator(group_privacy=False) as emu:
        alice = emu.create_user("Alice", "alice_w")
        private = emu.private_chat(alice)
        group = emu.create_group("Photo club", [alice])
        async with polling(_application(emu)):
            emu.user_sends_text(private, alice, "/start")
            [greeting] = await emu.wait_for_messages(private, 1)
            emu.user_sends_text(group, alice, "/start@other_bot")
            addressed = emu.user_sends_text(group, alice, "/start@imgsearch_test_bot")
            [group_greeting] = await emu.wait_for_messages(group, 1)
            await emu.wait_for(lambda _: emu.pending_update_count == 0)

        delivered = [
            update["message"]["text"]
            for call in emu.calls_of("getUpdates")
            for update in call.result or []
        ]
        assert delivered == ["/start", "/start@other_bot", "/start@imgsearch_test_bot"]
        assert greeting.text == "Hello! Send me a photo."
        assert group_greeting.reply_to_message_id == addressed["message_id"]
        assert len(emu.messages_sent(group)) == 1
        assert emu.calls_of("deleteWebhook")[0].ok
