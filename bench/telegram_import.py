"""Importing a Telegram Desktop export against building the same photos as a folder.

    python -m bench.telegram_import --photos ../shared/photos --count 1000 --repeats 3 \
        --out bench/out/telegram_import.json

``--count`` photos of the folder (the first ones, in path order) are laid out twice in a
temporary folder (``--work``, default the system's temporary folder; never inside the
repository), as symbolic links, so no photo is copied:

- a plain folder, indexed by ``build``;
- a Telegram Desktop export of a private supergroup, one photo per message, with the real
  ``result.json`` shape, imported by ``import-telegram-export``.

Each repeat builds and imports into new, empty indexes (in alternating order, so a slow
moment of the shared machine does not always hit the same side), with the same workers. The
medians and their ratio come from the same run.

The export writer (``testsupport.telegram_exports``) is also what the tests use to make
exports of every shape.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import list_photos, machine_info, median, timed, write_json
from indexer import build_index, import_export
from testsupport.telegram_exports import chat, message, write_result

FIRST_POST = 1_600_000_000  # Unix time of the benchmark's first message
POST_INTERVAL_S = 60


def export_of_photos(photos: Sequence[Path], folder: Path, *, bare_id: int) -> Path:
    """A private supergroup's export holding ``photos`` (linked, not copied), one a message."""
    (folder / "photos").mkdir(parents=True)
    messages = []
    for number, photo in enumerate(photos, start=1):
        relative = f"photos/photo_{number}@{number:08d}{photo.suffix.lower()}"
        (folder / relative).symlink_to(photo.absolute())
        messages.append(
            message(number, FIRST_POST + number * POST_INTERVAL_S, sender=f"Member {number % 7}",
                    sender_id=f"user{1000 + number % 7}", photo=relative)
        )
    return write_result(folder, chat("Benchmark group", "private_supergroup", bare_id, messages))


def folder_of_photos(photos: Sequence[Path], folder: Path) -> Path:
    """The same photos as a plain folder for ``build`` (linked, not copied)."""
    folder.mkdir(parents=True)
    for number, photo in enumerate(photos, start=1):
        (folder / f"{number:08d}{photo.suffix.lower()}").symlink_to(photo.absolute())
    return folder


# -- the benchmark --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    photos = list_photos(args.photos)[: args.count]
    work = Path(tempfile.mkdtemp(prefix="bench-telegram-import-", dir=args.work))
    try:
        folder = folder_of_photos(photos, work / "photos")
        export = export_of_photos(photos, work / "export", bare_id=1_234_567_890)
        build_s: list[float] = []
        import_s: list[float] = []
        imported: list[int] = []
        for repeat in range(args.repeats):
            order = ("build", "import") if repeat % 2 == 0 else ("import", "build")
            for side in order:
                index = work / f"index-{side}-{repeat}"
                if side == "build":
                    report, seconds = timed(lambda i=index: asyncio.run(build_index(
                        folder, i, workers=args.workers, progress=False)))
                    build_s.append(seconds)
                    print(f"repeat {repeat + 1}: build {seconds:.1f} s ({report.added} added)",
                          file=sys.stderr)
                else:
                    result, seconds = timed(lambda i=index: asyncio.run(import_export(
                        export, i, workers=args.workers, progress=False)))
                    import_s.append(seconds)
                    imported.append(result.imported + result.seen_before)
                    print(f"repeat {repeat + 1}: import {seconds:.1f} s ({result.imported} new, "
                          f"{result.seen_before} seen before, {len(result.failed)} failed)",
                          file=sys.stderr)
                shutil.rmtree(index)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    build_median, import_median = median(build_s), median(import_s)
    return {
        "machine": machine_info(),
        "photos": len(photos),
        "workers": args.workers,
        "repeats": args.repeats,
        "build_s": build_s,
        "import_s": import_s,
        "imported": imported,
        "build_median_s": build_median,
        "import_median_s": import_median,
        "build_photos_per_s": len(photos) / build_median,
        "import_photos_per_s": len(photos) / import_median,
        "import_over_build": import_median / build_median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.telegram_import", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--photos", type=Path, required=True, help="folder of photos")
    parser.add_argument("--count", type=int, default=1000, help="photos (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the temporary export and indexes go (default: system temp)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/telegram_import.json"))
    args = parser.parse_args()
    results = run(args)
    write_json(args.out, results)
    print(
        f"{results['photos']} photos, {args.repeats} runs each: build median "
        f"{results['build_median_s']:.1f} s ({results['build_photos_per_s']:.1f} photos/s), "
        f"import median {results['import_median_s']:.1f} s "
        f"({results['import_photos_per_s']:.1f} photos/s): import / build "
        f"{results['import_over_build']:.2f}x"
    )


if __name__ == "__main__":
    main()
