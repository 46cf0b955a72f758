"""Moving pictures in the engine: videos, animated GIFs and video stickers are indexed as a
few frames of one catalog image, a moving query matches when any of its frames verifies,
results say which frame matched, and what cannot or should not be read is refused clearly.

Every video here is generated (a camera panning and zooming over a CC0 photo), a few
dozen frames of 320 x 240: each described frame costs one KAZE extraction.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from bad_inputs import correlation
from conftest import jpeg_bytes, photo_array
from engine_fixtures import TEST_SETTINGS, copy_of_shared_index, run_build, stem
from PIL import Image

from indexer.__main__ import main
from indexer.analysis import analyze_bytes
from indexer.catalog import GLOBAL_SCOPE
from indexer.errors import CorruptImageError, EmptyImageError, ImageError, ImageTooLargeError
from indexer.moving import moving_format
from indexer.search import Match, StageTimings
from testsupport.engine import copy_index, opened_service
from testsupport.videos import WEBM_CODEC, gif_bytes, pan_and_zoom, truncated, video_bytes

# A photo of the 12-photo index, and one that is not in it.
INDEXED = "astronaut"
UNINDEXED = "horse"
FRAMES = 24
FPS = 12.0


def describe(matches: list[Match]) -> str:
    return ", ".join(
        f"{stem(m)}(verified={m.verified}, frame={m.frame_seconds}, query={m.query_seconds})"
        for m in matches
    )


@pytest.fixture(scope="module")
def moving_index(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    return copy_of_shared_index(tmp_path_factory, photos_dir, "moving")


@pytest.fixture
def private_index(moving_index: Path, tmp_path: Path) -> Path:
    return copy_index(moving_index, tmp_path / "index")


@pytest.fixture(scope="module")
def clip() -> bytes:
    """An MP4 panning and zooming over a photo of the index."""
    return video_bytes(pan_and_zoom(photo_array(INDEXED), frames=FRAMES), fps=FPS)


# --- which files are moving pictures ------------------------------------------------------------


def test_videos_and_animations_are_told_from_still_images(clip: bytes) -> None:
    still = photo_array("coffee")
    frames = list(pan_and_zoom(still, frames=4))

    assert moving_format(clip) == "MP4"
    assert moving_format(video_bytes(frames, codec=WEBM_CODEC)) == "WEBM"
    assert moving_format(gif_bytes(frames)) == "GIF"
    # A GIF of one frame is a still image, and stays with the image decoder.
    assert moving_format(gif_bytes(frames[:1])) is None
    assert moving_format(jpeg_bytes(still)) is None


def test_a_video_is_described_by_several_frames_in_time_order(clip: bytes) -> None:
    analysis = analyze_bytes(clip, TEST_SETTINGS)

    seconds = [frame.seconds for frame in analysis.video_frames]
    assert 2 <= len(seconds) <= TEST_SETTINGS.video_frames
    assert seconds == sorted(seconds)
    assert seconds[0] >= 0
    assert seconds[-1] < FRAMES / FPS
    assert analysis.features is analysis.video_frames[0].features
    assert (analysis.format, analysis.width, analysis.height) == ("MP4", 320, 240)


def test_a_static_animation_is_described_by_one_frame() -> None:
    """Frames that show the same scene are kept once."""
    frame = next(pan_and_zoom(photo_array("coffee"), frames=1))
    # Pillow merges identical frames: a few pixels differ, as a blinking cursor would.
    frames = [frame.copy() for _ in range(6)]
    for number, each in enumerate(frames):
        each[:4, :4] = 40 * number

    analysis = analyze_bytes(gif_bytes(frames), TEST_SETTINGS)

    assert analysis.format == "GIF"

    assert len(analysis.video_frames) == 1


def test_a_query_describes_its_first_frame_and_leaves_the_rest(clip: bytes) -> None:
    analysis = analyze_bytes(clip, TEST_SETTINGS, for_query=True)

    assert len(analysis.video_frames) == 1
    assert len(analysis.frames_left) == TEST_SETTINGS.query_video_frames - 1


# --- queries that move --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mp4", "webm", "gif"])
async def test_a_moving_query_made_from_a_photo_finds_the_photo(
    moving_index: Path, kind: str
) -> None:
    frames = list(pan_and_zoom(photo_array(INDEXED), frames=FRAMES))
    query = {
        "mp4": lambda: video_bytes(frames, fps=FPS),
        "webm": lambda: video_bytes(frames, fps=FPS, codec=WEBM_CODEC),
        "gif": lambda: gif_bytes(frames),
    }[kind]()

    async with opened_service(moving_index) as service:
        matches = await service.query(query, top=3)

    assert matches, "no results"
    first = matches[0]
    assert (stem(first), first.verified) == (INDEXED, True), describe(matches)
    assert first.frame_seconds is None  # the photo found does not move
    assert first.query_seconds is not None
    assert 0 < first.query_seconds < FRAMES / FPS


async def test_a_moving_query_of_nothing_known_verifies_nothing_and_tries_each_frame(
    moving_index: Path,
) -> None:
    query = video_bytes(pan_and_zoom(photo_array(UNINDEXED), frames=FRAMES), fps=FPS)

    timings = StageTimings()
    async with opened_service(moving_index) as service:
        matches = await service.query(query, top=3, timings=timings)

    assert not any(match.verified for match in matches), describe(matches)
    assert timings.counts["video frame"] == TEST_SETTINGS.query_video_frames


# --- moving pictures in the collection ----------------------------------------------------------


async def test_an_added_video_is_one_image_found_by_a_still_of_one_of_its_frames(
    private_index: Path,
) -> None:
    frames = list(pan_and_zoom(photo_array(UNINDEXED), frames=FRAMES))
    clip = video_bytes(frames, fps=FPS)
    still = jpeg_bytes(frames[FRAMES // 2])

    async with opened_service(private_index) as service:
        before = await service.count()
        added = await service.add(clip, scope=GLOBAL_SCOPE)
        after = await service.count()
        matches = await service.query(still, top=3)

    assert added.created
    assert added.image.moving
    assert after == before + 1  # its frames are not images of the collection
    assert added.image.path.endswith(".mp4")
    first = matches[0]
    assert (first.image.id, first.verified) == (added.image.id, True), describe(matches)
    assert first.frame_seconds is not None
    # The still is the middle frame; the frame found is the sampled frame nearest it.
    assert abs(first.frame_seconds - (FRAMES // 2) / FPS) < 0.5 * FRAMES / FPS
    assert first.path.read_bytes() == clip


async def test_adding_the_same_video_again_creates_nothing(private_index: Path) -> None:
    clip = video_bytes(pan_and_zoom(photo_array(UNINDEXED), frames=FRAMES), fps=FPS)

    async with opened_service(private_index) as service:
        first = await service.add(clip)
        again = await service.add(clip)

    assert first.created
    assert not again.created
    assert again.image.id == first.image.id


async def test_a_removed_video_takes_its_frames_with_it(private_index: Path) -> None:
    frames = list(pan_and_zoom(photo_array(UNINDEXED), frames=FRAMES))
    still = jpeg_bytes(frames[-3])

    async with opened_service(private_index) as service:
        added = await service.add(video_bytes(frames, fps=FPS))
        found = await service.query(still, top=3)
        await service.remove(added.image.id)
        after_removal = await service.query(still, top=3)
        await service.rebuild()
        after_rebuild = await service.query(still, top=3)
        frames_left = await service.catalog.frame_ids([added.image.id])

    assert found[0].image.id == added.image.id, describe(found)
    assert frames_left == []
    for matches in (after_removal, after_rebuild):
        assert all(m.image.id != added.image.id for m in matches), describe(matches)
        assert not any(m.verified for m in matches), describe(matches)


def test_build_indexes_videos_and_animations_and_names_what_it_cannot_read(
    tmp_path: Path, photos_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg", "rocket.jpg"):
        shutil.copyfile(photos_dir / name, folder / name)
    horse = list(pan_and_zoom(photo_array(UNINDEXED), frames=FRAMES))
    (folder / "horse.mp4").write_bytes(video_bytes(horse, fps=FPS))
    (folder / "astronaut.gif").write_bytes(
        gif_bytes(pan_and_zoom(photo_array(INDEXED), frames=12))
    )
    (folder / "cut-short.mp4").write_bytes(truncated(video_bytes(horse, fps=FPS)))
    index = tmp_path / "index"

    report = run_build(folder, index)

    assert report.added == 5
    assert [Path(path).name for path, _ in report.failed] == ["cut-short.mp4"]
    assert "damaged" in report.failed[0][1] or "cannot" in report.failed[0][1]
    assert report.images == 5  # frames are not counted as images

    query = tmp_path / "still.jpg"
    query.write_bytes(jpeg_bytes(horse[5]))
    assert main(["query", str(query), "--index", str(index), "--json", "--top", "1"]) == 0
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert Path(result["path"]).name == "horse.mp4"
    assert result["verified"] is True
    assert 0 <= result["frame_seconds"] < FRAMES / FPS

    # A second build finds nothing changed: frames are not taken for vanished files.
    again = run_build(folder, index)
    assert (again.added, again.removed, again.unchanged) == (0, 0, 5)


# --- the contact sheet of a moving query or result ---------------------------------------------

SHEET_THUMB = 256  # the CLI's thumbnail side
SHEET_PADDING = 12  # around each cell (contact_sheet's)
SHEET_FRAME = (256, 192)  # a 320 x 240 frame in a 256-pixel cell


@pytest.fixture(scope="module")
def video_folder_index(tmp_path_factory: pytest.TempPathFactory, photos_dir: Path) -> Path:
    """An index of a folder holding a photo (the astronaut) and a video (of the horse)."""
    folder = tmp_path_factory.mktemp("sheet-photos")
    shutil.copyfile(photos_dir / f"{INDEXED}.jpg", folder / f"{INDEXED}.jpg")
    shutil.copyfile(photos_dir / "coffee.jpg", folder / "coffee.jpg")
    horse = pan_and_zoom(photo_array(UNINDEXED), frames=FRAMES)
    (folder / f"{UNINDEXED}.mp4").write_bytes(video_bytes(horse, fps=FPS))
    index = tmp_path_factory.mktemp("sheet-index") / "index"
    report = run_build(folder, index)
    assert (report.added, report.failed) == (3, [])
    return index


def query_with_sheet(
    query: Path, index: Path, sheet: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, object], npt.NDArray[np.uint8], str]:
    """Run the CLI's query with ``--json --top 1 --sheet``: its one result, the sheet's
    pixels and its standard error."""
    assert main(["query", str(query), "--index", str(index), "--json", "--top", "1",
                 "--sheet", str(sheet)]) == 0
    output = capsys.readouterr()
    [result] = json.loads(output.out)["results"]
    with Image.open(sheet) as decoded:
        assert decoded.format == "PNG"
        pixels = np.asarray(decoded.convert("L"))
    # The query and one result: two cells side by side.
    assert pixels.shape[1] == 2 * (SHEET_THUMB + SHEET_PADDING) + SHEET_PADDING
    return result, pixels, output.err


def frame_shown(
    sheet: npt.NDArray[np.uint8], cell: int, frames: list[npt.NDArray[np.uint8]]
) -> int:
    """Which of ``frames`` (320 x 240, RGB) cell ``cell`` of the sheet shows: the most alike."""
    left = SHEET_PADDING + cell * (SHEET_THUMB + SHEET_PADDING)
    left += (SHEET_THUMB - SHEET_FRAME[0]) // 2
    top = SHEET_PADDING + (SHEET_THUMB - SHEET_FRAME[1]) // 2
    # Inside the coloured frame drawn around the query and verified results.
    shown = sheet[top + 8 : top + SHEET_FRAME[1] - 8, left + 8 : left + SHEET_FRAME[0] - 8]
    likeness = []
    for frame in frames:
        expected = np.asarray(Image.fromarray(frame).convert("L").resize(SHEET_FRAME))
        likeness.append(correlation(shown, expected[8:-8, 8:-8]))
    return int(np.argmax(likeness))


def test_the_sheet_of_a_photo_query_shows_the_frame_of_the_video_found(
    video_folder_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = list(pan_and_zoom(photo_array(UNINDEXED), frames=FRAMES))
    still = tmp_path / "still.jpg"
    still.write_bytes(jpeg_bytes(frames[FRAMES // 2]))
    sheet = tmp_path / "sheet.png"

    result, pixels, errors = query_with_sheet(still, video_folder_index, sheet, capsys)

    assert Path(str(result["path"])).name == f"{UNINDEXED}.mp4"
    assert result["verified"] is True
    assert isinstance(result["frame_seconds"], float)
    assert abs(frame_shown(pixels, 0, frames) - FRAMES // 2) <= 1
    assert abs(frame_shown(pixels, 1, frames) - round(result["frame_seconds"] * FPS)) <= 1
    assert errors == f"contact sheet written to {sheet}\n"


def test_the_sheet_of_a_video_query_shows_its_frame_that_found_the_photo(
    video_folder_index: Path, clip: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = list(pan_and_zoom(photo_array(INDEXED), frames=FRAMES))
    query = tmp_path / "clip.mp4"
    query.write_bytes(clip)
    sheet = tmp_path / "sheet.png"

    result, pixels, errors = query_with_sheet(query, video_folder_index, sheet, capsys)

    assert Path(str(result["path"])).name == f"{INDEXED}.jpg"
    assert result["verified"] is True
    assert isinstance(result["query_seconds"], float)
    assert abs(frame_shown(pixels, 0, frames) - round(result["query_seconds"] * FPS)) <= 1
    assert errors == f"contact sheet written to {sheet}\n"


def test_a_sheet_that_cannot_be_written_is_one_error_line(
    video_folder_index: Path, clip: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    query = tmp_path / "clip.mp4"
    query.write_bytes(clip)
    sheet = tmp_path / "no such folder" / "sheet.png"

    code = main(["query", str(query), "--index", str(video_folder_index), "--json",
                 "--sheet", str(sheet)])

    assert code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot write the contact sheet to {sheet}: ")
    assert not sheet.parent.exists()


# --- what is refused ----------------------------------------------------------------------------


def refusal(data: bytes, **settings: object) -> ImageError:
    with pytest.raises(ImageError) as raised:
        analyze_bytes(data, dataclasses.replace(TEST_SETTINGS, **settings), for_query=True)
    return raised.value


def test_a_broken_video_is_refused_as_damaged(clip: bytes) -> None:
    error = refusal(truncated(clip))

    assert isinstance(error, CorruptImageError)
    assert "damaged" in error.user_message


def test_a_video_of_no_frames_and_an_empty_file_are_refused() -> None:
    empty_container = video_bytes([])

    assert isinstance(refusal(empty_container), EmptyImageError | CorruptImageError)
    assert isinstance(refusal(empty_container[:0]), EmptyImageError)


def test_a_video_longer_than_the_limit_is_refused_before_any_frame_is_read(clip: bytes) -> None:
    error = refusal(clip, max_video_seconds=1.0)

    assert isinstance(error, ImageTooLargeError)
    assert "long" in error.user_message


def test_a_video_larger_than_the_limit_is_refused(clip: bytes) -> None:
    error = refusal(clip, max_video_pixels=320 * 200)

    assert isinstance(error, ImageTooLargeError)
    assert "320x240" in error.user_message


def test_a_video_slower_to_read_than_its_budget_is_given_up(clip: bytes) -> None:
    error = refusal(clip, video_read_seconds=0.0)

    assert isinstance(error, ImageTooLargeError)
    assert "too long to read" in error.user_message
