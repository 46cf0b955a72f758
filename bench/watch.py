"""Precision of the repost watch: false "seen before" answers, and reposts answered with the
right link.

    python -m bench.watch --photos ../shared/photos --out bench/out/watch.json

A private supergroup's history holds ``--collection`` photos (900 of the folder, split as the
other benchmarks split it). Its history is written the way the watch writes it, without
Telegram, to save time: each photo is added to the chat's scope by ``SearchService.add`` and
gets a sighting with its message id, sender and date; the codebook is then trained on the
history (``rebuild(retrain=True)``), as an operator does after a bulk load.

Then the real bot runs against the Bot API emulator with ``/watch on``, and photos are posted
one at a time, each answered (or not) before the next:

1. unrelated photos: the held-out photos of the folder (100 when the history holds 900), plus
   the CC0 sample photos of scikit-image (from another source, so surely not in the folder).
   Each held-out photo is posted whole, then in ``--unrelated-edits`` edited copies (9: 1,017
   unrelated posts in all, of 117 distinct pictures; no more real photos are at hand). A "seen
   before" answer to an unrelated post is false unless it links to an earlier post of the same
   picture, which is a real repost (those are counted apart);
2. ``--edited`` edited copies of history photos, in every edit kind of ``testsupport.edits`` that
   shows the photo alone (composites would also show other history photos). An answer counts
   as right only if its link points at the original's message.

With ``--history``, the history is seeded once into that folder and copied for each run, so
that runs of two versions of the watch start from the same history (and the second skips the
seeding). The engine's time is also given apart for the first post of a picture (new to the
chat) and for copies of one posted before.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    as_telegram_photo,
    list_photos,
    load_rgb,
    machine_info,
    median,
    seeded_sample,
    split_photos,
    write_json,
)
from bot.app import BotApplication, build_application
from bot.settings import parse_settings
from bot.watch import Sighting
from indexer import CpuPool, SearchService
from testsupport.edits import EDIT_KINDS
from testsupport.telegram_emulator import EmulatedChat, TelegramEmulator, polling

SEED = 20_261_129
HISTORY_FIRST_MESSAGE = 1_000_001  # history message ids; the emulator numbers live posts from 1
ANSWER_DEADLINE_S = 120.0
ADDS_AT_ONCE = 3  # analysis of one add runs while another's is written
SOLO_KINDS = tuple(kind for kind in EDIT_KINDS if not kind.fillers_wanted)


async def seed_history(index: Path, chat_id: int, photos: list[Path], workers: int) -> float:
    """The chat's history: every photo added to its scope with a sighting, as the watch
    stores them. Returns the seconds it took."""
    started = time.perf_counter()
    service = await SearchService.open(index, pool=CpuPool.processes(workers), create=True)
    turn = asyncio.Semaphore(ADDS_AT_ONCE)
    posted_at = time.time() - 30 * 86_400

    async def add(number: int, path: Path) -> None:
        async with turn:
            message_id = HISTORY_FIRST_MESSAGE + number
            result = await service.add(
                as_telegram_photo(load_rgb(path)),
                scope=chat_id,
                added_by=f"Member {number % 17}",
                origin_chat_id=chat_id,
                origin_message_id=message_id,
            )
            sighting = Sighting(
                chat_id=chat_id,
                message_id=message_id,
                image_id=result.image.id,
                sender_id=10_000 + number % 17,
                sender_name=f"Member {number % 17}",
                posted_at=posted_at + number,
                file_unique_id=f"history-{number}",
            )
            await service.chat_records.record_sighting(asdict(sighting), inbox_payload="")
            if not result.created:
                print(f"  history photo {path.name} is a copy of #{result.image.id}", flush=True)

    try:
        await asyncio.gather(*(add(number, path) for number, path in enumerate(photos)))
        await service.rebuild(retrain=True)
    finally:
        await service.close()
        service.pool.shutdown()
    return time.perf_counter() - started


def unrelated_posts(held_out: list[Path], *, edits: int) -> list[tuple[str, str, bytes]]:
    """(source picture, post name, JPEG) of every unrelated post: each held-out photo whole and
    in ``edits`` edited copies (the solo edit kinds in turn), then the CC0 photos."""
    posts = []
    for number, path in enumerate(held_out):
        image = load_rgb(path)
        posts.append((path.name, path.name, as_telegram_photo(image)))
        for copy in range(edits):
            kind = SOLO_KINDS[(number + copy) % len(SOLO_KINDS)]
            edited = kind.edit(image, SEED + 7919 * number + copy)
            data = as_telegram_photo(edited, quality=kind.jpeg_quality)
            posts.append((path.name, f"{kind.name} of {path.name}", data))
    posts.extend((name, name, data) for name, data in cc0_photos())
    return posts


def cc0_photos() -> list[tuple[str, bytes]]:
    """scikit-image's CC0 sample photos (another source: surely not in the folder)."""
    photos: list[tuple[str, bytes]] = []
    try:
        from skimage import data as samples
    except ImportError:
        print("  scikit-image is missing: only the held-out photos are used", flush=True)
        return photos
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass",
                 "gravel", "hubble_deep_field", "immunohistochemistry", "page", "text",
                 "coins", "horse", "moon", "clock", "retina"):  # fmt: skip
        image = getattr(samples, name)()
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append((f"skimage:{name}", as_telegram_photo(np.ascontiguousarray(image[..., :3]))))
    return photos


async def post_and_wait(
    emu: TelegramEmulator, application: BotApplication, group: EmulatedChat, user: Any,
    data: bytes,
) -> tuple[dict[str, Any], str | None, float]:
    """Post one photo, wait until the watch has checked it; its answer's link (or None)."""
    watch = application.bot_data.watch
    assert watch is not None
    checked = watch.figures.checked + watch.figures.given_up
    sent_before = len(emu.messages_sent(group))
    started = time.perf_counter()
    message = emu.user_sends_photo(group, user, data)
    deadline = started + ANSWER_DEADLINE_S
    while watch.figures.checked + watch.figures.given_up == checked or watch.backlog:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"message {message['message_id']} was not checked")
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    # The answer goes out in the background, at Telegram's pace for groups (20 a minute).
    await asyncio.sleep(0.05)
    while watch.answers_pending:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the answer to {message['message_id']} was never sent")
        await asyncio.sleep(0.01)
    answers = [
        m for m in emu.messages_sent(group)[sent_before:]
        if m.reply_to_message_id == message["message_id"]
    ]
    if not answers:
        return message, None, elapsed
    links = [
        e["url"] for e in answers[0].message.get("entities", []) if e["type"] == "text_link"
    ]
    return message, (links[0] if links else ""), elapsed


async def history_index(
    index: Path, kept: Path | None, chat_id: int, photos: list[Path], workers: int
) -> float | None:
    """Make the chat's history at ``index``: seeded there, or copied from ``kept`` (seeded
    there first when it holds none). Returns the seconds seeding took, None when copied."""
    seed_s = None
    if kept is None or not (kept / "index").is_dir():
        print(f"seeding the history with {len(photos)} photos...", flush=True)
        target = index if kept is None else kept / "index.partial"
        shutil.rmtree(target, ignore_errors=True)
        seed_s = await seed_history(target, chat_id, photos, workers)
        print(f"  {seed_s:.0f} s", flush=True)
        if kept is None:
            return seed_s
        target.rename(kept / "index")
    print(f"copying the history kept in {kept}", flush=True)
    shutil.copytree(kept / "index", index)
    return seed_s


async def run(args: argparse.Namespace) -> dict[str, Any]:
    photos = list_photos(args.photos)
    split = split_photos(photos, args.collection, args.unrelated, SEED)
    edited_sources = seeded_sample(list(range(len(split.collection))), args.edited, SEED + 1)
    if args.history is not None:
        args.history.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as folder:
        index = Path(folder) / "index"
        # The emulator numbers its chats alike in every run: a kept history is this group's.
        async with TelegramEmulator(group_privacy=False) as emu:
            admin = emu.create_user("Admin")
            poster = emu.create_user("Poster")
            group = emu.create_group("Watched", [admin, poster], chat_type="supergroup")
            emu.set_member_status(group, admin, "administrator")
            seed_s = await history_index(
                index, args.history, group.id, split.collection, args.workers
            )
            settings = parse_settings(
                {
                    "telegram": {"token": emu.token, "api_base_url": emu.api_base_url,
                                 "api_file_url": emu.file_base_url},
                    "index": {"dir": str(index), "workers": args.workers},
                    "access": {"queries_per_minute": 0},
                    "runtime": {"notify_admins_on_error": False, "log_level": "WARNING"},
                },
                environ={}, base_dir=Path(folder),
            )  # fmt: skip
            application = build_application(settings)
            async with application:
                assert application.post_init is not None
                await application.post_init(application)
                try:
                    async with polling(application):
                        emu.user_sends_text(group, admin, "/watch on")
                        await emu.wait_for_messages(group, 1, timeout=ANSWER_DEADLINE_S)
                        report = await post_everything(
                            emu, application, group, poster=poster, split=split,
                            edited_sources=edited_sources, unrelated_edits=args.unrelated_edits,
                        )
                        watch = application.bot_data.watch
                        assert watch is not None
                        report["engine_median_s"] = median(watch.figures.engine_s)
                finally:
                    assert application.post_shutdown is not None
                    await application.post_shutdown(application)
    report.update(
        machine=machine_info(),
        command=" ".join(["python -m bench.watch", *sys.argv[1:]]),
        history_photos=len(split.collection),
        history_seed_s=seed_s,
    )
    return report


async def post_everything(
    emu: TelegramEmulator, application: BotApplication, group: EmulatedChat, *, poster: Any,
    split: Any, edited_sources: list[int], unrelated_edits: int,
) -> dict[str, Any]:
    unrelated = unrelated_posts(split.unrelated, edits=unrelated_edits)
    print(f"posting {len(unrelated)} unrelated photos...", flush=True)
    internal = str(group.id).removeprefix("-100")
    false_answers: list[str] = []
    own_reposts = own_reposts_linked = 0
    posted: dict[str, list[int]] = {}  # source picture -> message ids of its posts so far
    times: list[float] = []
    # The engine's time for the first post of a picture (new to the chat: every look is
    # taken), and for a copy of one posted before.
    engine_new: list[float] = []
    engine_copy: list[float] = []
    watch = application.bot_data.watch
    assert watch is not None
    engine_times = watch.figures.engine_s
    for source, name, data in unrelated:
        message, link, elapsed = await post_and_wait(emu, application, group, poster, data)
        times.append(elapsed)
        earlier = posted.setdefault(source, [])
        (engine_copy if earlier else engine_new).append(engine_times[-1])
        if earlier:
            own_reposts += 1
            # The watch links to the first post it recognises the picture in, which is
            # an earlier edit of it when the whole photo's post was not recognised.
            if link in {f"https://t.me/c/{internal}/{m}" for m in earlier}:
                own_reposts_linked += 1
                earlier.append(message["message_id"])
                continue
        earlier.append(message["message_id"])
        if link is not None:
            false_answers.append(f"{name}: {link}")
            print(f"  false 'seen before' for {name}: {link}", flush=True)
    print(f"posting {len(edited_sources)} edited copies...", flush=True)
    by_kind: Counter[str] = Counter()
    right_by_kind: Counter[str] = Counter()
    misses: list[dict[str, str]] = []
    for number, source in enumerate(edited_sources):
        kind = SOLO_KINDS[number % len(SOLO_KINDS)]
        path = split.collection[source]
        edited = kind.edit(load_rgb(path), SEED + number)
        data = as_telegram_photo(edited, quality=kind.jpeg_quality)
        _, link, elapsed = await post_and_wait(emu, application, group, poster, data)
        times.append(elapsed)
        engine_copy.append(engine_times[-1])
        expected = f"https://t.me/c/{internal}/{HISTORY_FIRST_MESSAGE + source}"
        by_kind[kind.name] += 1
        if link == expected:
            right_by_kind[kind.name] += 1
        else:
            misses.append({"photo": path.name, "kind": kind.name, "link": str(link)})
            print(f"  {kind.name} of {path.name}: {link} (expected {expected})", flush=True)
    return {
        "unrelated_posted": len(unrelated),
        "unrelated_from_folder": len(split.unrelated),
        "unrelated_pictures": len(posted),
        "unrelated_reposts_of_each_other": own_reposts,
        "unrelated_reposts_linked_to_an_earlier_post": own_reposts_linked,
        "false_seen_before": len(false_answers),
        "false_answers": false_answers,
        "edited_posted": len(edited_sources),
        "edited_right_link": sum(right_by_kind.values()),
        "edited_right_share": sum(right_by_kind.values()) / max(1, len(edited_sources)),
        "by_kind": {k: {"posted": by_kind[k], "right": right_by_kind[k]} for k in by_kind},
        "misses": misses,
        "post_to_checked_median_s": median(times),
        "engine_new_picture_median_s": median(engine_new),
        "engine_copy_median_s": median(engine_copy),
        "unrelated_post_to_checked_median_s": median(times[: len(unrelated)]),
        "edited_post_to_checked_median_s": median(times[len(unrelated) :]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path("../shared/photos"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/watch.json"))
    parser.add_argument("--collection", type=int, default=900)
    parser.add_argument("--unrelated", type=int, default=100)
    parser.add_argument("--edited", type=int, default=200)
    parser.add_argument("--unrelated-edits", type=int, default=9,
                        help="edited copies posted of each held-out photo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--history", type=Path, default=None,
                        help="a folder to keep the seeded history in, for later runs to copy")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    write_json(args.out, report)
    print(
        f"false 'seen before': {report['false_seen_before']} of {report['unrelated_posted']}; "
        f"right link: {report['edited_right_link']} of {report['edited_posted']} "
        f"({report['edited_right_share']:.1%}); engine median "
        f"{report['engine_median_s'] * 1000:.0f} ms (a new picture "
        f"{report['engine_new_picture_median_s'] * 1000:.0f} ms, a copy "
        f"{report['engine_copy_median_s'] * 1000:.0f} ms); post to checked median "
        f"{report['post_to_checked_median_s'] * 1000:.0f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
