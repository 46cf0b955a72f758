"""Bad and odd inputs through every door: the offline build and the query of the command line,
the library, and the bot (as documents and as photos); then property tests that decoding plus
extraction never crash the interpreter and never hang, whatever bytes or arrays they get.

The corpus is ``bad_inputs.write_bad_inputs``: every case is generated here, nothing is shipped.
Each door reports how many inputs it was given (``report_figures``) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from bad_inputs import OK, BadInput, BadInputCorpus, encoded, sample_photo
from bot_fixtures import REPLY_DEADLINE_S, bot_settings, edited_photo, running
from engine_fixtures import FifoWatchdog
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from reliability_helpers import (
    FAST_ENGINE,
    IsolatedCalls,
    Outcome,
    build_template_index,
    catalog_health,
    create_empty_index,
    deliveries,
    leaks,
    original_files,
    replies_by_request,
    report_figures,
    service_of,
    sha256,
    subprocess_environment,
)

from bot.app import build_application
from indexer.analysis import Analysis, analyze_bytes
from indexer.build import IMAGE_SUFFIXES
from indexer.errors import ImageError, IndexerError, NoFeaturesError
from indexer.features import DESCRIPTOR_SIZE, MIN_KEYPOINTS, LocalFeatures, extract_features
from indexer.settings import EngineSettings
from testsupport.telegram_emulator import TelegramEmulator

EXIT_PARTIAL = 3
CLI_DEADLINE_S = 240
COLLECTION = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick")
SKIPPED_LINE = re.compile(
    r"^  skipped (?P<path>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): (?P<why>.+)$"
)
RESULT_CAPTION = re.compile(r"^\d+\. ")


def python(*arguments: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, arguments)],
        cwd=cwd,
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=CLI_DEADLINE_S,
        check=False,
    )


def traceback_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Lines of a traceback in the output: operators may read exception names in a reason,
    never a traceback."""
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if "Traceback" in line or 'File "' in line]


def no_traceback(result: subprocess.CompletedProcess[str]) -> bool:
    return traceback_lines(result) == []


def has_bytes(record: BadInput) -> bool:
    """A regular, readable file: something a user could upload."""
    return record.path.is_file() and os.access(record.path, os.R_OK) and record.name != "fifo"


def refused(record: BadInput) -> bool:
    """Whether every door must refuse this input (the noise case may go either way)."""
    return record.expected != OK or record.expected_features == "none"


def expected_error(record: BadInput) -> type[IndexerError] | None:
    if record.expected != OK:
        assert isinstance(record.expected, type)
        return record.expected
    return NoFeaturesError if record.expected_features == "none" else None


def fifo_of(corpus: BadInputCorpus, fallback: Path) -> Path:
    return corpus["fifo"].path if "fifo" not in corpus.skipped else fallback / "no-fifo"


# --- the offline build, through `python -m indexer build` ----------------------------------------


@dataclass(frozen=True, slots=True)
class CliBuild:
    corpus: BadInputCorpus
    index: Path
    result: subprocess.CompletedProcess[str]
    fifo_releases: int

    def skipped(self) -> dict[str, str]:
        found = {}
        for line in self.result.stdout.splitlines():
            match = SKIPPED_LINE.match(line)
            if match is not None:
                found[ast.literal_eval(match.group("path"))] = match.group("why")
        return found


def scanned_by_a_build(record: BadInput) -> bool:
    return (
        os.path.lexists(record.path)
        and not record.path.is_dir()
        and record.path.suffix.lower() in IMAGE_SUFFIXES
    )


@pytest.fixture(scope="module")
def cli_build(corpus: BadInputCorpus, tmp_path_factory: pytest.TempPathFactory) -> CliBuild:
    index = tmp_path_factory.mktemp("bad-inputs-index") / "index"
    asyncio.run(create_empty_index(index))  # the build keeps these (fast) settings
    folder = corpus.records[0].path.parent
    with FifoWatchdog(fifo_of(corpus, folder)) as watchdog:
        result = python(
            "-m", "indexer", "build", folder, "--index", index, "--no-progress", "--workers", "2"
        )
    return CliBuild(corpus, index, result, watchdog.released)


def test_the_build_skips_each_bad_file_with_its_path_and_reason_and_completes(
    cli_build: CliBuild,
) -> None:
    corpus, result = cli_build.corpus, cli_build.result
    must_fail = {str(r.path) for r in corpus if scanned_by_a_build(r) and refused(r)}
    if "symlink_loop" in {r.name for r in corpus}:
        must_fail.add(str(corpus["symlink_loop"].path.with_name("b.jpg")))
    must_index = {str(r.path) for r in corpus if r.expected == OK and r.expected_features == "some"}
    skipped = cli_build.skipped()
    health = catalog_health(cli_build.index)
    leaked = traceback_lines(result)
    report_figures(
        "inputs-build",
        cases=len(corpus),
        scanned_files=len([r for r in corpus if scanned_by_a_build(r)]),
        skipped=len(skipped),
        indexed=health.images,
        leaked=len(leaked),
    )

    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert leaked == [], result.stderr
    assert set(skipped) - {str(corpus["pure_noise"].path)} == must_fail
    assert all(reason.strip() for reason in skipped.values())
    summary = result.stdout.splitlines()[0]
    assert summary.endswith(f", {len(skipped)} failed"), summary
    assert health.problems == []
    assert health.images in (len(must_index), len(must_index) + 1)  # + the noise, maybe


def test_the_build_never_waits_on_a_fifo(cli_build: CliBuild) -> None:
    if "fifo" in cli_build.corpus.skipped:
        pytest.skip(cli_build.corpus.skipped["fifo"])

    assert cli_build.fifo_releases == 0, (
        "the build opened the FIFO for reading and blocked until the watchdog wrote to it"
    )


# --- queries, through `python -m indexer query --json` -------------------------------------------


def test_every_input_through_the_cli_query_gets_one_json_line_and_the_others_still_run(
    cli_build: CliBuild, tmp_path: Path
) -> None:
    corpus = cli_build.corpus
    good = tmp_path / "good.jpg"
    picture = sample_photo("astronaut", (384, 288)).rotate(6).crop((30, 20, 360, 270))
    good.write_bytes(encoded(picture, "JPEG", quality=85))
    # Decodable pictures cost a KAZE run each and are the bot's and the build's business here.
    records = [r for r in corpus if refused(r) or r.name == "pure_noise"]
    given = [str(good), *(str(r.path) for r in records[::2]), str(good)]
    given += [*(str(r.path) for r in records[1::2]), str(good)]
    by_path = {str(r.path): r for r in records}

    with FifoWatchdog(fifo_of(corpus, tmp_path)) as watchdog:
        result = python("-m", "indexer", "query", *given, "--index", cli_build.index, "--json")

    assert result.returncode == EXIT_PARTIAL, result.stderr
    assert no_traceback(result), result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [answer["query"] for answer in answers] == given
    for answer in answers:
        record = by_path.get(answer["query"])
        if record is None or (not refused(record) and record.name != "pure_noise"):
            assert set(answer) == {"query", "results"}, answer
            assert answer["results"], answer
            if record is None:
                assert answer["results"][0]["verified"] is True
        elif refused(record):
            assert set(answer) == {"query", "error"}, answer
            assert answer["error"].strip(), answer
            assert "\n" not in answer["error"]
    assert watchdog.released == 0
    report_figures(
        "inputs-cli-query", bad_inputs=len(records), error_lines=result.stdout.count('"error"')
    )


# --- the library ---------------------------------------------------------------------------------


async def test_the_library_refuses_each_bad_input_with_its_own_error_and_stores_nothing(
    cli_build: CliBuild, tmp_path: Path
) -> None:
    index = Path(shutil.copytree(cli_build.index, tmp_path / "index"))
    corpus = cli_build.corpus
    before = catalog_health(index)
    unexpected: list[str] = []
    tried = 0
    async with service_of(index, threads=2) as service:
        with FifoWatchdog(fifo_of(corpus, tmp_path)) as watchdog:
            for record in corpus:
                if not refused(record):
                    continue  # decodable pictures: see the build, the bot and test_search.py
                error = expected_error(record)
                attempts: list[tuple[str, Any]] = [("query(path)", record.path)]
                if error is not None and has_bytes(record):
                    attempts.append(("add(bytes)", record.path.read_bytes()))
                for door, source in attempts:
                    tried += 1
                    try:
                        if door == "query(path)":
                            outcome: object = await service.query(source, scope=-42, top=3)
                        else:
                            outcome = await service.add(source, scope=-42)
                    except IndexerError as raised:
                        outcome = raised
                    except Exception as raised:  # the point: nothing else may escape
                        unexpected.append(f"{record.name} {door}: {type(raised).__name__}")
                        continue
                    if type(outcome) is not error:
                        unexpected.append(f"{record.name} {door}: {outcome!r}, not {error}")
                    elif leaks(outcome.user_message) or not outcome.user_message:
                        unexpected.append(f"{record.name}: {outcome.user_message!r}")

    after = catalog_health(index)
    assert unexpected == []
    assert watchdog.released == 0
    assert (after.images, after.problems) == (before.images, [])
    assert original_files(index) == set()
    report_figures(
        "inputs-library",
        refused_cases=len([r for r in corpus if refused(r)]),
        calls=tried,
        unexpected=len(unexpected),
    )


# --- the bot -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bot_index(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_template_index(photos_dir, tmp_path_factory.mktemp("bot-inputs"), COLLECTION)


def send_as_photo(
    emu: TelegramEmulator, chat: Any, user: Any, data: bytes
) -> dict[str, Any] | None:
    """Send ``data`` as a photo if Telegram would take it as one (the emulator decodes it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about the pixel bombs it refuses
            return emu.user_sends_photo(chat, user, data)
    except (ValueError, Image.DecompressionBombError):
        return None


# Formats the engine recognises and names to the user, with advice where it has some.
NAMED_FORMATS = {
    "html_named_jpg": "This is an HTML page",
    "heic_header": "This is a HEIC/HEIF photo (the iPhone default)",
    "pdf_named_png": "This is a PDF document",
    "svg_drawing": "This is an SVG drawing",
}


def expected_reply_problem(record: BadInput, texts: list[str]) -> str | None:
    """Why these reply texts are wrong for this input, or None."""
    error = expected_error(record)
    if record.name == "oversized_sparse_file":
        return None if len(texts) == 1 and "too big" in texts[0] else f"{texts}"
    if record.name in NAMED_FORMATS:
        named = len(texts) == 1 and texts[0].startswith(f"⚠️ {NAMED_FORMATS[record.name]}")
        return None if named else f"{texts}, want {NAMED_FORMATS[record.name]!r}"
    if error is not None:
        return None if texts == [f"⚠️ {error.user_message}"] else f"{texts}, want {error}"
    if record.name == "pure_noise":
        return None
    return None if texts and all(RESULT_CAPTION.match(t) for t in texts) else f"{texts}"


async def test_every_input_sent_to_the_bot_gets_one_friendly_reply_then_search_still_works(
    emu: TelegramEmulator, bot_index: Path, corpus: BadInputCorpus, tmp_path: Path
) -> None:
    """Every case as a document; the refused ones that Telegram takes as photos, as photos."""
    await check_bot_inputs(
        emu, bot_index, corpus, tmp_path, documents=True, photos_of=refused, run="inputs-bot"
    )


@pytest.mark.slow
async def test_every_picture_sent_as_a_photo_gets_one_friendly_reply(
    emu: TelegramEmulator, bot_index: Path, corpus: BadInputCorpus, tmp_path: Path
) -> None:
    """The decodable cases as photos too (each costs a search)."""
    await check_bot_inputs(
        emu, bot_index, corpus, tmp_path, documents=False,
        photos_of=lambda record: not refused(record), run="inputs-bot-photos",
    )  # fmt: skip


async def check_bot_inputs(
    emu: TelegramEmulator,
    bot_index: Path,
    corpus: BadInputCorpus,
    tmp_path: Path,
    *,
    documents: bool,
    photos_of: Callable[[BadInput], bool],
    run: str,
) -> None:
    index = Path(shutil.copytree(bot_index, tmp_path / "index"))
    alice = emu.create_user("Alice")
    chat = emu.private_chat(alice)
    sent: list[tuple[BadInput, str, int]] = []  # (record, how, message id)
    application = build_application(bot_settings(emu, index), engine_settings=FAST_ENGINE)
    async with running(application):
        for record in corpus:
            if record.name == "oversized_sparse_file" and documents:
                message = emu.user_sends_oversized_document(
                    chat,
                    alice,
                    file_size=record.path.stat().st_size,
                    file_name=record.path.name,
                    mime_type="image/jpeg",
                )
                sent.append((record, "document", message["message_id"]))
                continue
            if not has_bytes(record):
                continue
            data = record.path.read_bytes()
            if documents:
                mime = mimetypes.guess_type(record.path.name)[0] or "application/octet-stream"
                message = emu.user_sends_document(
                    chat, alice, data, file_name=record.path.name, mime_type=mime
                )
                sent.append((record, "document", message["message_id"]))
            photo = send_as_photo(emu, chat, alice, data) if photos_of(record) else None
            if photo is not None:
                sent.append((record, "photo", photo["message_id"]))
        wanted = {(chat.id, message_id) for _, _, message_id in sent}

        def all_answered(_: object) -> bool:
            return wanted <= set(replies_by_request(emu.messages_sent(chat)))

        await emu.wait_for(all_answered, timeout=4 * REPLY_DEADLINE_S)
        normal = emu.user_sends_photo(chat, alice, edited_photo("coffee"))
        await emu.wait_for(
            lambda _: (
                (chat.id, normal["message_id"]) in replies_by_request(emu.messages_sent(chat))
            ),
            timeout=REPLY_DEADLINE_S,
        )

    answers = replies_by_request(emu.messages_sent(chat))
    problems = []
    answered_twice = leaked = 0
    for record, how, message_id in sent:
        replies = answers[(chat.id, message_id)]
        texts = [reply.text or "" for reply in replies]
        if deliveries(replies) != 1:
            answered_twice += deliveries(replies) > 1
            problems.append(f"{record.name} as {how}: answered {deliveries(replies)} times")
        if any(leaks(text, str(tmp_path), str(corpus.records[0].path.parent)) for text in texts):
            leaked += 1
            problems.append(f"{record.name} as {how}: leaks in {texts}")
        wrong = expected_reply_problem(record, texts)
        if wrong is not None:
            problems.append(f"{record.name} as {how}: {wrong}")
    sent_documents = sum(1 for _, how, _ in sent if how == "document")
    report_figures(
        run,
        documents=sent_documents,
        photos=len(sent) - sent_documents,
        answered=len(wanted & set(answers)),
        answered_twice=answered_twice,
        leaked=leaked,
    )
    assert problems == []
    [first, *_] = answers[(chat.id, normal["message_id"])]
    assert (first.text or "").startswith("1. ✅ same picture"), first.text
    assert (first.text or "").endswith("coffee.jpg")


# --- property tests: decoding and extraction never crash, never hang -----------------------------

TINY_ENGINE = EngineSettings(
    working_side=96, min_side=32, max_keypoints=100, query_keypoints=100, kaze_enough_keypoints=40
)
ISOLATED_SETTINGS = settings(
    max_examples=120,
    deadline=None,  # each example crosses a process boundary
    # A crash costs a new worker per shrinking step; the first failing example is reported as is.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def _extract(array: npt.NDArray[Any]) -> LocalFeatures:
    return extract_features(array, max_keypoints=100)


def _analyze(data: bytes) -> Analysis:
    return analyze_bytes(data, TINY_ENGINE, for_query=True)


def features_problem(features: object, shape: tuple[int, ...] | None) -> str | None:
    """What is wrong with extracted features, or None."""
    if not isinstance(features, LocalFeatures):
        return f"returned {type(features).__name__}"
    count = len(features)
    if not MIN_KEYPOINTS <= count <= 100:
        return f"{count} keypoints"
    if features.descriptors.shape != (count, DESCRIPTOR_SIZE) or features.points.shape != (
        count,
        2,
    ):
        return f"shapes {features.descriptors.shape} {features.points.shape}"
    if not np.all(np.isfinite(features.descriptors)) or not np.all(np.isfinite(features.points)):
        return "non-finite values"
    if shape is not None and (features.height, features.width) != shape[:2]:
        return f"size {features.width}x{features.height} for an array of shape {shape}"
    inside = (features.points >= -0.5) & (features.points <= [features.width, features.height])
    return None if inside.all() else "keypoints outside the image"


def extraction_problem(outcome: Outcome, array: npt.NDArray[Any]) -> str | None:
    """Any 2-D uint8 array gives features or NoFeaturesError; other arrays may also be refused
    with a ValueError or TypeError naming the problem. Nothing else, and never a crash."""
    if outcome.kind == "returned":
        return features_problem(outcome.value, array.shape)
    if outcome.kind == "raised":
        if outcome.indexer_error and outcome.user_message:
            return None
        gray = array.ndim == 2 and array.dtype == np.uint8
        argument_error = outcome.error_type in ("builtins.ValueError", "builtins.TypeError")
        if argument_error and not gray:
            return None
    return f"{outcome.describe()} for {array.dtype} {array.shape}"


DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_)


def any_array() -> st.SearchStrategy[npt.NDArray[Any]]:
    side = st.integers(0, 48)
    shapes = st.one_of(
        st.tuples(side, side),
        st.tuples(side, side, st.sampled_from([1, 2, 3, 4, 5])),
        st.tuples(st.integers(1, 2), st.integers(200, 3000)),
        st.tuples(side),
        st.just(()),
    )
    return st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(dtype, shapes))


KNOWN_HOSTILE_ARRAYS = {
    "nan-float32": np.full((48, 48), np.nan, np.float32),
    "inf-float32": np.full((48, 48), np.inf, np.float32),
    "huge-float32": np.full((48, 48), 3e38, np.float32),
    "empty-uint8": np.zeros((0, 0), np.uint8),
    "scalar-uint8": np.zeros((), np.uint8),
    "two-channel-uint8": np.zeros((48, 48, 2), np.uint8),
    "bool": np.zeros((48, 48), np.bool_),
    "float64": np.linspace(0, 1, 48 * 48).reshape(48, 48),
}


@pytest.fixture(scope="module")
def isolated() -> Iterator[IsolatedCalls]:
    with IsolatedCalls() as calls:
        yield calls


@pytest.mark.parametrize("name", sorted(KNOWN_HOSTILE_ARRAYS))
def test_extraction_refuses_arrays_it_cannot_use_without_crashing(
    name: str, isolated: IsolatedCalls
) -> None:
    array = KNOWN_HOSTILE_ARRAYS[name]
    outcome = isolated.run(_extract, array)

    assert extraction_problem(outcome, array) is None, extraction_problem(outcome, array)


def test_extraction_never_crashes_or_hangs_on_any_array() -> None:
    tried = 0
    with IsolatedCalls() as isolated:

        @ISOLATED_SETTINGS
        @given(array=any_array())
        @example(array=np.zeros((64, 64), np.uint8))
        def check(array: npt.NDArray[Any]) -> None:
            nonlocal tried
            tried += 1
            problem = extraction_problem(isolated.run(_extract, array), array)
            assert problem is None, problem

        check()
    report_figures("inputs-property-extraction", arrays=tried)


def analysis_problem(outcome: Outcome, data: bytes) -> str | None:
    """Bytes give an analysis of themselves or an ImageError; nothing else, never a crash."""
    if outcome.kind == "returned":
        analysis = outcome.value
        if not isinstance(analysis, Analysis):
            return f"returned {type(analysis).__name__}"
        if analysis.content_hash != sha256(data) or analysis.file_size != len(data):
            return "the analysis does not describe these bytes"
        return features_problem(analysis.features, None)
    if outcome.kind == "raised" and outcome.indexer_error and outcome.user_message:
        module, _, name = (outcome.error_type or "").rpartition(".")
        if module == "indexer.errors" and issubclass(
            getattr(sys.modules[module], name), ImageError
        ):
            return None
    return f"{outcome.describe()} for {len(data)} bytes starting {data[:16]!r}"


def small_encodings() -> dict[str, bytes]:
    photo = sample_photo("chelsea", (64, 48))
    return {name: encoded(photo, name) for name in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")}


SMALL_ENCODINGS = small_encodings()


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    payload = bytearray(SMALL_ENCODINGS[draw(st.sampled_from(sorted(SMALL_ENCODINGS)))])
    cut = draw(st.integers(1, len(payload)))
    del payload[cut:]
    for position, mask in draw(
        st.lists(st.tuples(st.integers(0), st.integers(1, 255)), max_size=6)
    ):
        payload[position % len(payload)] ^= mask
    return bytes(payload)


def test_analysis_never_crashes_or_hangs_on_any_bytes() -> None:
    tried = 0
    with IsolatedCalls() as isolated:

        @ISOLATED_SETTINGS
        @given(data=st.one_of(st.binary(max_size=2048), damaged_files()))
        def check(data: bytes) -> None:
            nonlocal tried
            tried += 1
            problem = analysis_problem(isolated.run(_analyze, data), data)
            assert problem is None, problem

        check()
    report_figures("inputs-property-analysis-bytes", inputs=tried)


def encodable_arrays() -> st.SearchStrategy[npt.NDArray[Any]]:
    side = st.integers(1, 80)
    gray, colour = st.tuples(side, side), st.tuples(side, side, st.sampled_from([2, 3, 4]))
    return st.one_of(
        hnp.arrays(np.uint8, st.one_of(gray, colour)),
        hnp.arrays(np.uint16, gray),
        hnp.arrays(np.int32, gray),
        hnp.arrays(np.float32, gray),  # NaN and infinities included
        hnp.arrays(np.bool_, gray),
    )


def test_analysis_never_crashes_or_hangs_on_any_encoded_array() -> None:
    tried = 0
    with IsolatedCalls() as isolated:

        @ISOLATED_SETTINGS
        @given(array=encodable_arrays(), container=st.sampled_from(["PNG", "TIFF"]))
        def check(array: npt.NDArray[Any], container: str) -> None:
            nonlocal tried
            picture = Image.fromarray(array)
            if picture.mode in {"I", "F"}:
                container = "TIFF"  # PNG has no 32-bit modes
            buffer = io.BytesIO()
            picture.save(buffer, container)
            data = buffer.getvalue()
            tried += 1
            problem = analysis_problem(isolated.run(_analyze, data), data)
            assert problem is None, problem

        check()
    report_figures("inputs-property-analysis-arrays", arrays=tried)
