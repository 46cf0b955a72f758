"""Tests of the command line, ``python -m indexer``, run as a user would: in
subprocesses, on a tiny folder, checking outputs and exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_inputs import OK, BadInput, BadInputCorpus, write_bad_inputs
from engine_fixtures import FifoWatchdog, edited_jpeg
from PIL import Image

from testsupport.telegram_exports import NOT_INCLUDED, chat, message, write_result

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_FOLDER_PHOTOS = ("astronaut", "coffee", "chelsea", "camera")
EXIT_OK, EXIT_FAILURE, EXIT_PARTIAL = 0, 1, 3
COMMAND_TIMEOUT = 240  # a guard against hangs, far above any normal run


def run_cli(*arguments: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")])
    )
    return subprocess.run(
        [sys.executable, "-m", "indexer", *map(str, arguments)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


@dataclass(frozen=True, slots=True)
class Workspace:
    root: Path  # cwd of the commands; holds photos/, queries/ and index/
    photos: Path
    queries: Path
    index: Path
    build: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Workspace:
    root = tmp_path_factory.mktemp("cli")
    photos, queries = root / "photos", root / "queries"
    photos.mkdir()
    queries.mkdir()
    for name in TINY_FOLDER_PHOTOS:
        shutil.copyfile(photos_dir / f"{name}.jpg", photos / f"{name}.jpg")
    (photos / "half.jpg").write_bytes((photos_dir / "rocket.jpg").read_bytes()[:5000])
    (queries / "astronaut_crop.jpg").write_bytes(edited_jpeg("astronaut", "crop"))
    (queries / "coffee_flip.jpg").write_bytes(edited_jpeg("coffee", "flip"))
    (queries / "chelsea_rotated.jpg").write_bytes(edited_jpeg("chelsea", "rotate_15"))
    build = run_cli("build", "photos", "--index", "index", "--no-progress", "--workers", "2",
                    cwd=root)
    return Workspace(root, photos, queries, root / "index", build)


@pytest.fixture
def index_copy(workspace: Workspace, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workspace.index, tmp_path / "index"))


# --- build -------------------------------------------------------------------------------------


def test_build_reports_counts_and_the_skipped_file(workspace: Workspace) -> None:
    result = workspace.build

    assert result.returncode == EXIT_PARTIAL, result.stderr  # one file could not be indexed
    assert_no_traceback(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "5 files scanned: 4 added, 0 updated, 0 removed, 0 unchanged, 1 failed"
    )
    assert lines[1].startswith("4 images in the index")
    assert any("skipped" in line and "half.jpg" in line for line in lines[2:])


# --- query: the JSON contract -------------------------------------------------------------------


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_json_output_is_one_object_per_query_in_order(workspace: Workspace) -> None:
    given = [
        "queries/astronaut_crop.jpg",
        str(workspace.queries / "coffee_flip.jpg"),  # absolute
        "queries/chelsea_rotated.jpg",
    ]

    result = run_cli("query", *given, "--index", "index", "--top", "2", "--json",
                     cwd=workspace.root)

    assert result.returncode == EXIT_OK, result.stderr
    assert_no_traceback(result)
    objects = json_lines(result)
    assert [o["query"] for o in objects] == given
    for answer, original in zip(objects, ("astronaut", "coffee", "chelsea"), strict=True):
        assert set(answer) == {"query", "results"}
        results = answer["results"]
        assert isinstance(results, list)
        assert len(results) == 2
        for item in results:
            assert set(item) == {"path", "score", "verified", "inliers"}
            assert isinstance(item["path"], str)
            assert Path(item["path"]).is_absolute()
            assert Path(item["path"]).exists()
            assert type(item["score"]) is float
            assert 0.0 <= item["score"] <= 1.0
            assert type(item["verified"]) is bool
            assert type(item["inliers"]) is int
        best, second = results
        assert best["path"] == str(workspace.photos / f"{original}.jpg")
        assert best["verified"] is True
        assert best["score"] > 0.5 > second["score"]
        assert second["verified"] is False


def test_the_query_is_echoed_exactly_as_given(workspace: Workspace) -> None:
    """Scripts match answers to their inputs by the string they passed."""
    given = ["./queries/astronaut_crop.jpg", "queries//coffee_flip.jpg"]

    result = run_cli("query", *given, "--index", "index", "--json", cwd=workspace.root)

    assert result.returncode == EXIT_OK, result.stderr
    assert [o["query"] for o in json_lines(result)] == given


# --- query: bad inputs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BadQueryRun:
    given: list[str]
    bad: set[str]
    result: subprocess.CompletedProcess[str]
    fifo_releases: int


def refused(corpus: BadInputCorpus) -> list[BadInput]:
    return [r for r in corpus if r.expected != OK or r.expected_features == "none"]


@pytest.fixture(scope="module")
def bad_query_run(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> BadQueryRun:
    """One CLI run over every bad input, with good queries first, between and last."""
    corpus = write_bad_inputs(tmp_path_factory.mktemp("cli-bad-inputs"))
    bad = [str(r.path) for r in refused(corpus)]
    good = [str(path) for path in sorted(workspace.queries.iterdir())]
    given = [good[0], *bad[: len(bad) // 2], good[1], *bad[len(bad) // 2 :], good[2]]
    fifo = corpus["fifo"].path if "fifo" not in corpus.skipped else None
    with FifoWatchdog(fifo or workspace.root / "no-fifo") as watchdog:
        result = run_cli("query", *given, "--index", workspace.index, "--json")
    return BadQueryRun(given, set(bad), result, watchdog.released)


def test_each_bad_query_gets_an_error_line_and_the_others_still_run(
    bad_query_run: BadQueryRun,
) -> None:
    objects = json_lines(bad_query_run.result)

    assert [o["query"] for o in objects] == bad_query_run.given
    for answer in objects:
        if answer["query"] in bad_query_run.bad:
            assert set(answer) == {"query", "error"}, answer
            assert isinstance(answer["error"], str)
            assert answer["error"].strip()
            assert "\n" not in answer["error"]
        else:
            assert set(answer) == {"query", "results"}, answer
            assert answer["results"][0]["verified"] is True
    assert len(bad_query_run.bad) >= 20


def test_bad_queries_give_exit_code_3_and_no_traceback(bad_query_run: BadQueryRun) -> None:
    assert bad_query_run.result.returncode == EXIT_PARTIAL
    assert_no_traceback(bad_query_run.result)


def test_a_fifo_query_does_not_wait_for_a_writer(bad_query_run: BadQueryRun) -> None:
    assert bad_query_run.fifo_releases == 0, "the CLI opened the FIFO and waited for a writer"


# --- query: table and contact sheet ---------------------------------------------------------------


def test_the_table_lists_ranked_results_and_the_sheet_is_a_png(workspace: Workspace) -> None:
    sheet = workspace.root / "sheet.png"

    result = run_cli("query", "queries/coffee_flip.jpg", "--index", "index", "--top", "3",
                     "--sheet", "sheet.png", cwd=workspace.root)

    assert result.returncode == EXIT_OK, result.stderr
    assert_no_traceback(result)
    lines = result.stdout.splitlines()
    assert lines[0] == "queries/coffee_flip.jpg"
    assert len(lines) == 4
    first = lines[1].split()
    assert first[0] == "1."
    assert "same picture, mirrored" in lines[1]
    assert lines[1].endswith(str(workspace.photos / "coffee.jpg"))
    assert [line.split()[0] for line in lines[1:]] == ["1.", "2.", "3."]
    assert "same picture" not in lines[2]
    assert sheet.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(sheet.read_bytes())) as picture:
        assert picture.format == "PNG"
        assert picture.width > 100
        assert picture.height > 100
    assert "sheet.png" in result.stderr


# --- stats and remove -----------------------------------------------------------------------------


def stats_lines(index: Path) -> dict[str, str]:
    result = run_cli("stats", "--index", index)
    assert result.returncode == EXIT_OK, result.stderr
    assert_no_traceback(result)
    return {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in result.stdout.splitlines())
    }


def test_stats_print_the_counts(workspace: Workspace) -> None:
    stats = stats_lines(workspace.index)

    assert stats["images"] == "4"
    assert stats["in Annoy index"].startswith("4 ")
    assert stats["fresh (exact)"] == "0"
    assert stats["files that failed"] == "1"


def test_remove_takes_a_photo_out_of_the_results(workspace: Workspace, index_copy: Path) -> None:
    removed = run_cli("remove", workspace.photos / "coffee.jpg", "--index", index_copy)
    query = run_cli("query", workspace.queries / "coffee_flip.jpg", "--index", index_copy,
                    "--top", "4", "--json")
    again = run_cli("remove", workspace.photos / "coffee.jpg", "--index", index_copy)

    assert removed.returncode == EXIT_OK, removed.stderr
    assert removed.stdout.startswith("removed 1 image(s): #")
    [answer] = json_lines(query)
    assert str(workspace.photos / "coffee.jpg") not in [r["path"] for r in answer["results"]]
    assert not any(r["verified"] for r in answer["results"])
    assert stats_lines(index_copy)["images"] == "3"
    assert again.returncode == EXIT_FAILURE
    assert_no_traceback(again)
    assert again.stderr.startswith("error:")


# --- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["query", "stats", "remove"])
def test_a_missing_index_is_a_one_line_error(tmp_path: Path, command: str) -> None:
    photo_arguments = [] if command == "stats" else [tmp_path / "photo.jpg"]

    result = run_cli(command, *photo_arguments, "--index", tmp_path / "no-index")

    assert result.returncode == EXIT_FAILURE
    assert_no_traceback(result)
    assert result.stdout == ""
    assert result.stderr.startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "no-index").exists()


def test_a_missing_photo_folder_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("build", tmp_path / "no-photos", "--index", tmp_path / "index",
                     "--no-progress")

    assert result.returncode == EXIT_FAILURE
    assert_no_traceback(result)
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error:")


def test_top_must_be_positive(workspace: Workspace) -> None:
    result = run_cli("query", "queries/coffee_flip.jpg", "--index", "index", "--top", "0",
                     cwd=workspace.root)

    assert result.returncode == EXIT_FAILURE
    assert_no_traceback(result)
    assert result.stderr.startswith("error:")


# --- import-telegram-export --------------------------------------------------------------------


def test_an_imported_chat_is_reported_and_its_results_link_to_their_messages(
    workspace: Workspace, index_copy: Path, tmp_path: Path, photos_dir: Path
) -> None:
    export = tmp_path / "ChatExport"
    (export / "photos").mkdir(parents=True)
    shutil.copyfile(photos_dir / "rocket.jpg", export / "photos" / "photo_1.jpg")
    messages = [
        message(1, 1_700_000_000, sender="Ann", sender_id="user5", kind="service",
                action="invite_members", members=["Bo"]),
        message(2, 1_700_000_060, sender="Ann", sender_id="user5", photo="photos/photo_1.jpg",
                width=512, height=512),
        *[
            message(number, 1_700_000_060 + number, sender="Bo", sender_id="user6",
                    photo=NOT_INCLUDED)
            for number in range(3, 10)
        ],
    ]
    write_result(export, chat("Club", "public_supergroup", 1_234_567_890, messages))
    query = tmp_path / "rocket_crop.jpg"
    query.write_bytes(edited_jpeg("rocket", "crop"))

    imported = run_cli("import-telegram-export", export, "--index", index_copy, "--no-progress",
                       "--workers", "1")
    again = run_cli("import-telegram-export", export, "--index", index_copy, "--no-progress")
    chat_id = "-1001234567890"
    found = run_cli("query", query, "--index", index_copy, "--chat", chat_id, "--top", "2",
                    "--json")
    table = run_cli("query", query, "--index", index_copy, "--chat", chat_id, "--top", "1")
    outside = run_cli("query", query, "--index", index_copy, "--top", "1", "--json")
    offline = run_cli("query", workspace.queries / "coffee_flip.jpg", "--index", index_copy,
                      "--chat", chat_id, "--top", "1", "--json")

    assert_no_traceback(imported)
    assert imported.returncode == EXIT_PARTIAL, imported.stderr  # photos were not exported
    lines = imported.stdout.splitlines()
    assert lines[0] == ("chat 'Club' (public_supergroup, chat id -1001234567890): "
                        "9 messages, 8 photos and image files")
    assert lines[1].startswith("1 imported, 0 already in the collection (their messages "
                               "recorded), 0 imported before, 7 missing, 0 failed")
    assert "7 photos are not in the export" in imported.stdout
    assert "  message 3: File not included. Change data exporting settings to download." in lines
    assert "  ... and 2 more" in lines
    assert again.stdout.splitlines()[1].startswith("0 imported, 0 already in the collection "
                                                   "(their messages recorded), 1 imported before")
    [answer] = json_lines(found)
    first = answer["results"][0]  # type: ignore[index]
    assert first["verified"] is True
    assert (first["chat_id"], first["message_id"]) == (-1001234567890, 2)
    assert first["link"] == "https://t.me/c/1234567890/2"
    assert "https://t.me/c/1234567890/2" in table.stdout
    # The chat's photos are its own: not found from outside it.
    [elsewhere] = json_lines(outside)[0]["results"]  # type: ignore[misc]
    assert "chat_id" not in elsewhere
    [from_folder] = json_lines(offline)[0]["results"]  # type: ignore[misc]
    assert from_folder["verified"] is True
    assert from_folder["path"] == str(workspace.photos / "coffee.jpg")
    assert "link" not in from_folder
    assert "chat_id" not in from_folder


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "has no result.json"),
        ("{\"messages\": [", "is not valid JSON"),
        ('{"chats": {"about": "", "list": [{"id": 1, "type": "personal_chat", "messages": []}, '
         '{"id": 2, "type": "personal_chat", "messages": []}]}}', "choose one with --chat"),
    ],
)
def test_an_import_of_what_is_not_an_export_is_a_one_line_error(
    tmp_path: Path, content: str | None, complaint: str
) -> None:
    folder = tmp_path / "Downloads"
    folder.mkdir()
    if content is not None:
        (folder / "result.json").write_text(content)

    result = run_cli("import-telegram-export", folder, "--index", tmp_path / "index")

    assert_no_traceback(result)
    assert result.returncode == EXIT_FAILURE
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert complaint in line
