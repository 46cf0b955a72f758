"""Crash safety: SIGKILL at random points of a build, of a bot's /add and of a background
rebuild; damaged derived files at start-up; a full disk.

Every kill takes the whole process group (the program and its worker processes), as a power cut
or the OOM killer would. After each one the catalog is checked from outside the engine (SQLite's
integrity check, no duplicate paths, no rows without their image or image without features, no
file under originals/ without its row), and the next start must serve, and find, what was
committed. Kill delays come from seeded generators, so a failing run can be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bot_fixtures import REPLY_DEADLINE_S, bot_settings, edited_photo, photo_bytes, running
from engine_fixtures import shapes_jpeg
from PIL import Image
from reliability_helpers import (
    FAST_ENGINE,
    PROCESS_DEADLINE_S,
    BotProcess,
    build_template_index,
    catalog_health,
    create_empty_index,
    generation_leftovers,
    images_with_hash,
    kill_group,
    leaks,
    original_files,
    replies_by_request,
    report_figures,
    run_process,
    service_of,
    sha256,
    started_script,
    subprocess_environment,
    write_bot_config,
)

from bot.app import build_application
from indexer.ann import ANNOY_FILE, CODEBOOK_FILE, CURRENT_FILE
from indexer.errors import StorageFullError
from indexer.search import CATALOG_FILE, GENERATIONS_DIR, ORIGINALS_DIR
from testsupport.telegram_emulator import (
    BotCall,
    EmulatedChat,
    EmulatedUser,
    SentMessage,
    TelegramEmulator,
)

CHAT = -7001
OTHER_CHAT = -7002
COLLECTION = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")
QUERY_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
CORRUPTION_WARNING = "rebuilding the index from the catalog"
FRESH_ADDS = 16


def small_photo(name: str) -> bytes:
    picture = Image.fromarray(np.asarray(Image.open(io.BytesIO(photo_bytes(name)))))
    picture.thumbnail((320, 320))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def drawing(seed: int) -> bytes:
    """A distinct synthetic picture: nobody's photo, never the same picture as another seed."""
    return shapes_jpeg(seed, (240, 180))


def drawing_query(seed: int) -> bytes:
    """The drawing cropped, turned a little and recompressed: another file, the same picture."""
    picture = Image.open(io.BytesIO(drawing(seed))).convert("RGB")
    cropped = picture.crop((12, 9, 228, 171)).rotate(3, fillcolor=(128, 128, 128))
    buffer = io.BytesIO()
    cropped.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


async def top_answers(index: Path, queries: dict[str, bytes]) -> dict[str, tuple[str, bool]]:
    """For each query, the file name of the best match and whether it is verified."""
    answers = {}
    async with service_of(index) as service:
        for label, data in queries.items():
            [best, *_] = await service.query(data, top=1)
            answers[label] = (Path(best.image.path).name, best.verified)
    return answers


async def assert_abandoned_generations_are_removed(index: Path) -> None:
    """Half-written generations a kill left behind are kept for an hour (another process may
    be building one), then removed by the next start."""
    for name in generation_leftovers(index):
        hours_ago = time.time() - 2 * 3600
        os.utime(index / GENERATIONS_DIR / name, (hours_ago, hours_ago))
    async with service_of(index):
        pass
    assert generation_leftovers(index) == []


# --- builds killed at random points --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildReference:
    photos: Path
    count: int
    seconds: float  # one clean build through `python -m indexer build`
    answers: dict[str, tuple[str, bool]]
    queries: dict[str, bytes]


async def cli_build(photos: Path, index: Path) -> tuple[int, str, str]:
    return await run_process(
        "-m", "indexer", "build", photos, "--index", index, "--no-progress", "--workers", "2"
    )


async def make_reference(root: Path, photo_count: int) -> BuildReference:
    """A photo folder of ``photo_count`` files and its clean build."""
    photos = root / "photos"
    photos.mkdir()
    for name in COLLECTION:
        (photos / f"{name}.jpg").write_bytes(small_photo(name))
    for seed in range(photo_count - len(COLLECTION)):
        (photos / f"drawing-{seed:03d}.jpg").write_bytes(drawing(seed))
    queries = {name: edited_photo(name) for name in QUERY_PHOTOS}
    drawings = photo_count - len(COLLECTION)
    queries.update(
        {f"drawing-{seed:03d}": drawing_query(seed) for seed in (0, drawings // 2, drawings - 1)}
    )
    index = root / "clean-index"
    await create_empty_index(index)
    started = time.monotonic()
    status, out, err = await cli_build(photos, index)
    seconds = time.monotonic() - started
    assert status == 0, out + err
    answers = await top_answers(index, queries)
    assert all(verified for _, verified in answers.values()), answers
    return BuildReference(photos, photo_count, seconds, answers, queries)


@dataclass(slots=True)
class KilledBuilds:
    kills: int = 0
    states: list[str] = field(default_factory=list)  # what each kill left behind


async def kill_builds_then_finish(
    reference: BuildReference, index: Path, rng: random.Random, kills: int
) -> KilledBuilds:
    """Start builds of ``index`` and SIGKILL each at a random moment; then let one finish."""
    record = KilledBuilds()
    await create_empty_index(index)
    for number in range(kills):
        # A rerun only has what is left to do: later kills of a round come sooner.
        delay = rng.uniform(0.15, 0.95 if number == 0 else 0.5) * reference.seconds
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m", "indexer", "build", str(reference.photos), "--index", str(index),
            "--no-progress", "--workers", "2",
            env=subprocess_environment(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            await asyncio.wait_for(process.wait(), delay)
        except TimeoutError:
            kill_group(process.pid)
            await process.wait()
            record.kills += 1
        health = catalog_health(index)
        assert health.problems == [], health.problems
        generation = (index / GENERATIONS_DIR / CURRENT_FILE).exists()
        record.states.append(
            f"{delay:.1f}s: {health.images}/{reference.count} committed, generation={generation}"
        )
    status, out, err = await cli_build(reference.photos, index)
    assert status == 0, out + err
    assert f"{reference.count} images in the index" in out, out
    return record


async def check_builds_survive_kills(
    tmp_path: Path, *, photos: int, rounds: int, kills: int, seed: int
) -> None:
    reference = await make_reference(tmp_path, photo_count=photos)
    rng = random.Random(seed)
    survived = 0
    states = []
    for round_number in range(rounds):
        index = tmp_path / f"index-{round_number}"
        record = await kill_builds_then_finish(reference, index, rng, kills)
        survived += record.kills
        states += record.states
        health = catalog_health(index)

        assert health.problems == []
        assert health.images == reference.count
        assert await top_answers(index, reference.queries) == reference.answers
        await assert_abandoned_generations_are_removed(index)
    # A delay may outlast a (re)build on a fast machine; some must land inside one.
    assert survived >= 1, states
    report_figures(
        "crash-build", builds_killed=survived, rounds=rounds, photos=reference.count, states=states
    )


async def test_builds_killed_at_random_points_finish_on_rerun_with_a_clean_catalog(
    tmp_path: Path,
) -> None:
    await check_builds_survive_kills(tmp_path, photos=24, rounds=1, kills=2, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_many_builds_killed_at_random_points_finish_on_rerun_with_a_clean_catalog(
    tmp_path: Path,
) -> None:
    # 100 files: two commit batches of the build (64 files each at most).
    await check_builds_survive_kills(tmp_path, photos=100, rounds=3, kills=3, seed=2)


# --- the bot killed during an /add ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bot_template(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_template_index(photos_dir, tmp_path_factory.mktemp("crash-bot"), COLLECTION)


async def answer_to(
    emu: TelegramEmulator, chat: EmulatedChat, request: dict[str, Any]
) -> list[SentMessage]:
    """The bot's messages replying to ``request`` (an album arrives in one call)."""
    key = (chat.id, int(request["message_id"]))
    await emu.wait_for(
        lambda _: key in replies_by_request(emu.messages_sent(chat)), timeout=REPLY_DEADLINE_S
    )
    return replies_by_request(emu.messages_sent(chat))[key]


async def started_bot(
    emu: TelegramEmulator, config: Path, chat: EmulatedChat, user: EmulatedUser
) -> BotProcess:
    bot = await BotProcess.start(config, emu.token)
    await answer_to(emu, chat, emu.user_sends_text(chat, user, "/start"))  # it is serving
    return bot


def corrupt_current_annoy_file(index: Path) -> None:
    name = (index / GENERATIONS_DIR / CURRENT_FILE).read_text(encoding="utf-8").strip()
    annoy = index / GENERATIONS_DIR / name / ANNOY_FILE
    annoy.write_bytes(annoy.read_bytes()[: annoy.stat().st_size // 3])


def delivered(calls: Sequence[BotCall], request: dict[str, Any]) -> bool:
    """Whether a getUpdates answer has handed ``request`` to the bot."""
    wanted = (request["chat"]["id"], request["message_id"])
    return any(
        (update["message"]["chat"]["id"], update["message"]["message_id"]) == wanted
        for call in calls
        if call.method == "getUpdates" and call.ok
        for update in call.result or []
        if "message" in update
    )


class CatalogWriteLock:
    """Holds SQLite's write lock on a catalog from outside, as a long transaction would."""

    def __init__(self, index: Path) -> None:
        self._connection = sqlite3.connect(index / CATALOG_FILE, isolation_level=None)

    def __enter__(self) -> CatalogWriteLock:
        self._connection.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._connection.execute("ROLLBACK")
        self._connection.close()


async def kill_bot_during_add(
    emu: TelegramEmulator,
    bot: BotProcess,
    index: Path,
    *,
    chat: EmulatedChat,
    user: EmulatedUser,
    data: bytes,
    how: str | float,
) -> tuple[str, bool]:
    """Send /add with ``data`` and SIGKILL the bot once it took the update: after ``how``
    seconds, as soon as it fetches the photo (``"downloaded"``), or (``"file-written"``) while
    its catalog insert waits for a write lock held here, just after the original was written
    to originals/. Returns what happened and
    whether the user had been told "added" before the kill."""
    target = f"{ORIGINALS_DIR}/{sha256(data)[:2]}/{sha256(data)}.jpg"
    if how == "file-written":
        with CatalogWriteLock(index):
            request = emu.user_sends_photo(chat, user, data, caption="/add")
            deadline = time.monotonic() + PROCESS_DEADLINE_S
            while target not in original_files(index):
                assert time.monotonic() < deadline, "the add never wrote its original"
                await asyncio.sleep(0.02)
            await bot.kill()
        what = "killed between writing the original and committing its row"
    elif how == "downloaded":
        downloads = len(emu.calls_of("getFile"))
        request = emu.user_sends_photo(chat, user, data, caption="/add")
        await emu.wait_for(lambda _: len(emu.calls_of("getFile")) > downloads)
        await bot.kill()
        what = "killed as it fetched the photo (before or during its analysis)"
    else:
        assert isinstance(how, float)
        request = emu.user_sends_photo(chat, user, data, caption="/add")
        await emu.wait_for(lambda calls: delivered(calls, request), timeout=REPLY_DEADLINE_S)
        await asyncio.sleep(how)
        await bot.kill()
        what = f"killed {how:.2f} s after the bot received the update"
    confirmed = (chat.id, request["message_id"]) in replies_by_request(emu.messages_sent(chat))
    return what, confirmed


async def check_bot_kills(
    emu: TelegramEmulator, template: Path, tmp_path: Path, kill_points: list[str | float]
) -> None:
    index = Path(shutil.copytree(template, tmp_path / "index"))
    config = write_bot_config(tmp_path / "config.toml", emu, index)
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    pictures = [drawing(500 + number) for number in range(len(kill_points))]
    problems: list[str] = []
    states: list[str] = []
    lost = 0  # adds confirmed to the user, then gone after the restart
    bot = await started_bot(emu, config, chat, alice)
    try:
        for number, (how, data) in enumerate(zip(kill_points, pictures, strict=True)):
            what, confirmed = await kill_bot_during_add(
                emu, bot, index, chat=chat, user=alice, data=data, how=how
            )
            last = number == len(kill_points) - 1
            if last:  # the last restart also finds a damaged Annoy file
                corrupt_current_annoy_file(index)
            bot = await started_bot(emu, config, chat, alice)
            rows = images_with_hash(index, sha256(data))
            health = catalog_health(index)
            states.append(f"{what}: {'added' if rows else 'absent'} after the restart")
            lost += confirmed and not rows
            if len(rows) > 1 or health.problems:
                problems.append(f"{what}: rows {rows}, {health.problems}")
            stray = original_files(index) - health.original_paths
            missing = health.original_paths - original_files(index)
            if stray or missing:
                problems.append(f"{what}: files without rows {stray}, rows without files {missing}")
            results = await answer_to(emu, chat, emu.user_sends_photo(chat, alice, data))
            verified = [r for r in results if "same picture" in (r.text or "")]
            if rows and not (verified and f"#{rows[0][0]}" in (verified[0].text or "")):
                problems.append(f"{what}: added as #{rows[0][0]} but not found: {results}")
            if not rows and verified:
                problems.append(f"{what}: absent but found: {[r.text for r in verified]}")
        retried = {}
        for data in pictures:  # a retry works, whatever the kill left
            [reply] = await answer_to(
                emu, chat, emu.user_sends_photo(chat, alice, data, caption="/add")
            )
            retried[sha256(data)] = reply.text or ""
            if not reply.text or not reply.text.startswith(("✅ Added as #", "☑️ Already in")):
                problems.append(f"retry: {reply.text}")
                continue
            [best, *_] = await answer_to(emu, chat, emu.user_sends_photo(chat, alice, data))
            image_id = reply.text.split("#")[1].split(".")[0]
            if not (best.text or "").startswith("1. ✅ same picture") or f"#{image_id}" not in (
                best.text or ""
            ):
                problems.append(f"after the retry #{image_id} is not found first: {best.text}")
    finally:
        status, log = await bot.stop()

    report_figures(
        "crash-bot-add", kills=len(kill_points), states=states, photos_lost=lost,
        problems=problems,
    )  # fmt: skip
    assert problems == []
    assert lost == 0
    assert status == 0
    assert CORRUPTION_WARNING in log  # the damaged Annoy file was noticed and rebuilt
    assert leaks(" ".join(m.text or "" for m in emu.messages_sent(chat))) == []


async def test_a_bot_killed_during_an_add_has_the_photo_whole_or_absent_and_a_retry_works(
    emu: TelegramEmulator, bot_template: Path, tmp_path: Path
) -> None:
    await check_bot_kills(emu, bot_template, tmp_path, ["downloaded", "file-written"])


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_a_bot_killed_during_many_adds_has_each_photo_whole_or_absent(
    emu: TelegramEmulator, bot_template: Path, tmp_path: Path
) -> None:
    rng = random.Random(4)
    kill_points: list[str | float] = [rng.uniform(0.0, 0.4) for _ in range(6)]
    await check_bot_kills(emu, bot_template, tmp_path, [*kill_points, "downloaded", "file-written"])


async def test_an_original_without_its_row_is_cleaned_up_at_start(
    bot_template: Path, tmp_path: Path
) -> None:
    """The state a kill between writing an original and committing its row leaves (see the
    test above for a real kill in that window): the next start must not keep the file."""
    index = Path(shutil.copytree(bot_template, tmp_path / "index"))
    data = drawing(900)
    stray = index / ORIGINALS_DIR / sha256(data)[:2] / f"{sha256(data)}.jpg"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(data)
    half_written = stray.with_name(f".{stray.name}.tmp")
    half_written.write_bytes(data[:100])

    async with service_of(index):
        pass

    assert not half_written.exists()
    assert not stray.exists(), "an original nobody references survived the restart"


# --- a background rebuild killed -----------------------------------------------------------------

REBUILD_SCRIPT = """
import asyncio, sys
from pathlib import Path
from indexer.search import SearchService

async def main() -> None:
    service = await SearchService.open(Path(sys.argv[1]))
    print("ready", service.generation_name, flush=True)
    for number in range(int(sys.argv[2])):
        print("rebuilt", await service.rebuild(retrain=number % 2 == 0), flush=True)
    await service.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def rebuild_template(bot_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bot's template plus 16 drawings added in a chat: a generation and a fresh buffer."""
    index = Path(shutil.copytree(bot_template, tmp_path_factory.mktemp("rebuild") / "index"))

    async def add_drawings() -> None:
        async with service_of(index) as service:
            for seed in range(FRESH_ADDS):
                await service.add(drawing(700 + seed), scope=CHAT)
            assert (await service.stats()).fresh == FRESH_ADDS

    asyncio.run(add_drawings())
    return index


async def check_rebuild_kills(
    template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, *, kills: int, seed: int
) -> None:
    index = Path(shutil.copytree(template, tmp_path / "index"))
    rng = random.Random(seed)
    served: list[str] = []
    for _ in range(kills):
        process, ready = await started_script(REBUILD_SCRIPT, index, 1000)
        assert process.stdout is not None
        await asyncio.sleep(rng.uniform(0.05, 2.0))
        kill_group(process.pid)
        await process.wait()
        assert process.returncode != 0  # it was killed, not done
        # The generations it had finished (and reported) before the kill, oldest first.
        finished = (ready + await process.stdout.read()).decode().split()[1::2]

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="indexer"):
            async with service_of(index) as service:
                stats = await service.stats()
                answers = {
                    "collection": await service.query(edited_photo("coffee"), top=1),
                    "fresh": await service.query(drawing_query(710), scope=CHAT, top=1),
                }
        # The last finished generation is served, or one whose swap the kill beat the report of;
        # never an older one.
        assert stats.generation not in finished[:-1], (stats.generation, finished)
        served.append(
            f"killed in rebuild {len(finished)}: "
            + ("the last finished one" if stats.generation == finished[-1] else "a newer one")
        )
        assert CORRUPTION_WARNING not in caplog.text
        assert catalog_health(index).problems == []
        assert stats.indexed + stats.fresh == stats.images == len(COLLECTION) + FRESH_ADDS
        assert Path(answers["collection"][0].image.path).name == "coffee.jpg"
        assert all(matches[0].verified for matches in answers.values())

    async with service_of(index) as service:  # and a rebuild runs again
        await service.rebuild()
        stats = await service.stats()
    assert (stats.indexed, stats.fresh) == (len(COLLECTION) + FRESH_ADDS, 0)
    await assert_abandoned_generations_are_removed(index)
    report_figures("crash-rebuild", kills=kills, served=served)


async def test_a_rebuild_killed_at_random_points_leaves_a_whole_generation_served(
    rebuild_template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await check_rebuild_kills(rebuild_template, tmp_path, caplog, kills=2, seed=5)


@pytest.mark.slow
async def test_rebuilds_killed_many_times_leave_a_whole_generation_served(
    rebuild_template: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await check_rebuild_kills(rebuild_template, tmp_path, caplog, kills=8, seed=6)


# --- damaged derived files at start-up -----------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:  # same size, other bytes: only the checksum can tell
        path.write_bytes(np.random.default_rng(9).bytes(len(data)))


@pytest.mark.parametrize(
    ("file_name", "how"),
    [
        (ANNOY_FILE, "truncated"),
        (CODEBOOK_FILE, "garbled"),
        pytest.param(ANNOY_FILE, "garbled", marks=pytest.mark.slow),
        pytest.param(CODEBOOK_FILE, "truncated", marks=pytest.mark.slow),
    ],
)
async def test_a_damaged_index_file_is_detected_at_start_and_rebuilt_from_the_catalog(
    bot_template: Path, tmp_path: Path, file_name: str, how: str
) -> None:
    index = Path(shutil.copytree(bot_template, tmp_path / "index"))
    damaged = (index / GENERATIONS_DIR / CURRENT_FILE).read_text(encoding="utf-8").strip()
    damage(index / GENERATIONS_DIR / damaged / file_name, how)
    query = tmp_path / "query.jpg"
    query.write_bytes(edited_photo("chelsea"))

    status, out, err = await run_process(
        "-m", "indexer", "query", query, "--index", index, "--json"
    )

    assert status == 0, err
    assert CORRUPTION_WARNING in err, err
    assert file_name in err, err
    assert "Traceback" not in err
    assert '"verified": true' in out, out
    assert "chelsea.jpg" in out, out
    current = (index / GENERATIONS_DIR / CURRENT_FILE).read_text(encoding="utf-8").strip()
    assert current != damaged
    async with service_of(index) as service:  # the new generation passes every checksum
        assert service.generation_name == current


# --- a full disk ---------------------------------------------------------------------------------


async def test_a_full_catalog_refuses_an_add_with_storage_full_and_leaves_nothing_behind(
    bot_template: Path, tmp_path: Path
) -> None:
    index = Path(shutil.copytree(bot_template, tmp_path / "index"))
    data = drawing(901)
    async with service_of(index, max_catalog_bytes=1) as full:  # no room to grow
        before = await full.stats()
        with pytest.raises(StorageFullError):
            await full.add(data, scope=CHAT)
        after = await full.stats()
    files_after_failure = original_files(index)
    async with service_of(index) as service:  # space freed
        retried = await service.add(data, scope=CHAT)

    assert (after.images, after.fresh) == (before.images, before.fresh)
    assert files_after_failure == set()
    assert retried.created
    assert catalog_health(index).problems == []


async def test_enospc_while_storing_the_original_is_storage_full_and_leaves_nothing_behind(
    bot_template: Path, tmp_path: Path
) -> None:
    """The original is written to a temporary name first; making that name a link to /dev/full
    gives the write a real ENOSPC from the kernel."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    index = Path(shutil.copytree(bot_template, tmp_path / "index"))
    data = drawing(902)
    target = index / ORIGINALS_DIR / sha256(data)[:2] / f"{sha256(data)}.jpg"

    async with service_of(index) as service:  # (opening removes leftover temporary files)
        target.parent.mkdir(parents=True)
        target.with_name(f".{target.name}.tmp").symlink_to("/dev/full")
        before = await service.stats()
        with pytest.raises(StorageFullError):
            await service.add(data, scope=CHAT)
        after = await service.stats()
        leftovers = original_files(index)
        retried = await service.add(data, scope=CHAT)  # the link is gone: space again

    assert (after.images, after.fresh) == (before.images, before.fresh)
    assert leftovers == set()
    assert retried.created
    assert catalog_health(index).problems == []


async def test_a_failed_add_never_deletes_an_original_another_chat_still_uses(
    bot_template: Path, tmp_path: Path
) -> None:
    """Two chats adding the same bytes share one file under originals/ (it is named by its
    content); a second add that fails on a full disk must leave the first chat's file alone."""
    index = Path(shutil.copytree(bot_template, tmp_path / "index"))
    data = drawing(903)
    async with service_of(index) as service:
        first = await service.add(data, scope=CHAT)
        kept = service.resolve_path(first.image)
    async with service_of(index, max_catalog_bytes=1) as full:  # the disk fills up
        with pytest.raises(StorageFullError):
            await full.add(data, scope=OTHER_CHAT)

    assert kept.exists(), f"chat {CHAT}'s photo #{first.image.id} lost its file"
    health = catalog_health(index)
    assert original_files(index) == health.original_paths


async def test_the_bot_says_the_disk_is_full_saves_nothing_and_a_later_retry_works(
    emu: TelegramEmulator, bot_template: Path, tmp_path: Path
) -> None:
    index = Path(shutil.copytree(bot_template, tmp_path / "index"))
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    data = drawing(904)
    target = index / ORIGINALS_DIR / sha256(data)[:2] / f"{sha256(data)}.jpg"
    application = build_application(bot_settings(emu, index), engine_settings=FAST_ENGINE)
    async with running(application):  # (starting removes leftover temporary files)
        # The original's temporary name leads to /dev/full: a real ENOSPC from the kernel.
        target.parent.mkdir(parents=True)
        target.with_name(f".{target.name}.tmp").symlink_to("/dev/full")
        [refusal] = await answer_to(
            emu, chat, emu.user_sends_photo(chat, alice, data, caption="/add")
        )
        leftovers = original_files(index)
        rows = images_with_hash(index, sha256(data))
        [retry] = await answer_to(  # the failed add removed the link: there is space again
            emu, chat, emu.user_sends_photo(chat, alice, data, caption="/add")
        )
        [found, *_] = await answer_to(emu, chat, emu.user_sends_photo(chat, alice, data))

    assert StorageFullError.user_message in (refusal.text or ""), refusal.text
    assert leaks(refusal.text, str(tmp_path)) == []
    assert (leftovers, rows) == (set(), [])
    assert (retry.text or "").startswith("✅ Added as #")
    image_id = (retry.text or "").split("#")[1].split(".")[0]
    assert (found.text or "").startswith("1. ✅ same picture")
    assert f"#{image_id}" in (found.text or "")
    assert catalog_health(index).problems == []


# --- the bot killed while it checks a watched group's photos ----------------------------------


ACK_WINDOW_S = 2.0


def fetched(call: BotCall, message: dict[str, Any]) -> bool:
    """Whether ``call`` is a getUpdates that gave the bot ``message``."""
    return call.method == "getUpdates" and any(
        (update.get("message") or {}).get("message_id") == message["message_id"]
        for update in call.result or []
    )


def watched_state(index: Path, chat_id: int, message_id: int) -> tuple[int, int]:
    """(rows in the watch inbox, sightings) of one message, read from outside the bot."""
    with contextlib.closing(sqlite3.connect(index / CATALOG_FILE, timeout=30)) as connection:
        waiting = connection.execute(
            "SELECT count(*) FROM watch_inbox WHERE chat_id = ? AND message_id = ?",
            (chat_id, message_id),
        ).fetchone()[0]
        seen = connection.execute(
            "SELECT count(*) FROM sightings WHERE chat_id = ? AND message_id = ?",
            (chat_id, message_id),
        ).fetchone()[0]
    return int(waiting), int(seen)


async def kill_bot_during_watched_add(
    emu: TelegramEmulator,
    bot: BotProcess,
    index: Path,
    *,
    group: EmulatedChat,
    user: EmulatedUser,
    data: bytes,
    how: str,
) -> tuple[str, dict[str, Any]]:
    """Post ``data`` in a watched group and SIGKILL the bot: after it got the update while its
    inbox row waits for the catalog's write lock (``"fetched"``), as soon as the photo is in the
    watch's inbox (``"received"``), as it fetches the photo (``"downloaded"``), or while the
    add waits for the catalog's write lock after writing the original (``"file-written"``)."""
    target = f"{ORIGINALS_DIR}/{sha256(data)[:2]}/{sha256(data)}.jpg"
    deadline = time.monotonic() + PROCESS_DEADLINE_S
    if how == "fetched":
        with CatalogWriteLock(index):
            request = emu.user_sends_photo(group, user, data)
            await emu.wait_for(lambda calls: any(fetched(call, request) for call in calls))
            # Time enough for PTB to ask for the next updates, which tells Telegram this one
            # arrived: the bot must hold that back until the photo is in its inbox.
            await asyncio.sleep(ACK_WINDOW_S)
            unacknowledged = emu.pending_update_count
            await bot.kill()
        assert unacknowledged >= 1, "Telegram was told the photo arrived before it was stored"
        return "killed while the photo it got waited to enter the inbox", request
    if how == "downloaded":
        downloads = len(emu.calls_of("getFile"))
        request = emu.user_sends_photo(group, user, data)
        await emu.wait_for(lambda _: len(emu.calls_of("getFile")) > downloads)
        await bot.kill()
        return "killed as it fetched the photo", request
    request = emu.user_sends_photo(group, user, data)
    while watched_state(index, group.id, request["message_id"]) == (0, 0):
        assert time.monotonic() < deadline, "the watched photo never reached the inbox"
        await asyncio.sleep(0.005)
    if how == "received":
        await bot.kill()
        return "killed as soon as the photo was in the inbox", request
    with CatalogWriteLock(index):
        while target not in original_files(index):
            assert time.monotonic() < deadline, "the watched add never wrote its original"
            await asyncio.sleep(0.02)
        await bot.kill()
    return "killed between writing the original and committing its row", request


async def test_a_bot_killed_during_watched_adds_loses_no_photo_and_links_reposts_to_them(
    emu: TelegramEmulator, bot_template: Path, tmp_path: Path
) -> None:
    index = Path(shutil.copytree(bot_template, tmp_path / "index"))
    config = write_bot_config(tmp_path / "config.toml", emu, index)
    alice = emu.create_user("Alice")
    probe = emu.private_chat(alice)
    group = emu.create_group("Watched", [alice], chat_type="supergroup")
    emu.set_member_status(group, alice, "administrator")
    emu.set_member_status(group, emu.bot_user, "administrator")  # it sees every photo
    kill_points = ["fetched", "received", "downloaded", "file-written"]
    seeds = [700 + number for number in range(len(kill_points))]
    pictures = [drawing(seed) for seed in seeds]
    problems: list[str] = []
    states: list[str] = []
    bot = await started_bot(emu, config, probe, alice)
    try:
        await answer_to(emu, group, emu.user_sends_text(group, alice, "/watch on"))
        posted = []
        for how, data in zip(kill_points, pictures, strict=True):
            what, request = await kill_bot_during_watched_add(
                emu, bot, index, group=group, user=alice, data=data, how=how
            )
            posted.append(request)
            bot = await started_bot(emu, config, probe, alice)  # settings survived: still on
            deadline = time.monotonic() + PROCESS_DEADLINE_S
            while watched_state(index, group.id, request["message_id"]) != (0, 1):
                if time.monotonic() > deadline:
                    state = watched_state(index, group.id, request["message_id"])
                    problems.append(f"{what}: (inbox rows, sightings) = {state}")
                    break
                await asyncio.sleep(0.05)
            states.append(f"{what}: recorded after the restart")
            health = catalog_health(index)
            if health.problems or len(images_with_hash(index, sha256(data))) != 1:
                rows = images_with_hash(index, sha256(data))
                problems.append(f"{what}: {health.problems}, rows {rows}")
        for request, seed in zip(posted, seeds, strict=True):
            repost = emu.user_sends_photo(group, alice, drawing_query(seed))
            [answer] = await answer_to(emu, group, repost)
            if f"/{request['message_id']}" not in str(answer.message.get("entities")):
                problems.append(f"the repost of {request['message_id']} got {answer.text}")
    finally:
        status, _ = await bot.stop()

    report_figures("crash-watch-add", kills=len(kill_points), states=states, problems=problems)
    assert problems == []
    assert status == 0
