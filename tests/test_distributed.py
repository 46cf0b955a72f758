"""The build's extraction on Dask (``--dask``): the same catalog as a local build, and
nothing lost or stored twice when a worker or the client is killed.

A scheduler and two single-threaded worker processes are started once for the module with
Dask's own commands (``dask scheduler``, ``dask worker``), on loopback, as docs/CLUSTER.md
runs them; ``local:2`` starts its own LocalCluster of two processes. The photos are small
generated drawings and the engine runs with ``FAST_ENGINE``, so each build takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_fixtures import shapes_jpeg
from reliability_helpers import (
    FAST_ENGINE,
    PROCESS_DEADLINE_S,
    REPOSITORY,
    catalog_health,
    create_empty_index,
    kill_group,
    run_process,
    subprocess_environment,
)

from indexer.build import COMMIT_EVERY, BuildReport, DaskOptions, build_index
from indexer.errors import ClusterError
from indexer.search import CATALOG_FILE

distributed = pytest.importorskip("distributed")

PHOTOS = 24
BROKEN = "sub/broken.jpg"


def photo_names(count: int) -> list[str]:
    # A subfolder too: paths below the root are kept as the scan found them.
    return [f"{'sub/' if number % 5 == 0 else ''}shape-{number:03}.jpg" for number in range(count)]


def write_photos(folder: Path, count: int, size: tuple[int, int] = (480, 360)) -> Path:
    for number, name in enumerate(photo_names(count)):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shapes_jpeg(number, size))
    (folder / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return folder


def stored(index: Path, root: str) -> dict[str, tuple[Any, ...]]:
    """Everything the catalog holds about each photo file, by its path below ``root``:
    the image row, its stored features (blob included), or the recorded failure."""
    connection = sqlite3.connect(index / CATALOG_FILE)
    try:
        rows = {
            str(path): tuple(values)
            for path, *values in connection.execute(
                "SELECT i.path, i.content_hash, i.file_size, i.file_mtime_ns, i.width, i.height, "
                "f.keypoints, f.width, f.height, f.data "
                "FROM images i JOIN features f ON f.image_id = i.id"
            )
        }
        rows.update(
            (str(path), ("failed", size, mtime, reason))
            for path, size, mtime, reason in connection.execute(
                "SELECT path, file_size, file_mtime_ns, reason FROM failures"
            )
        )
    finally:
        connection.close()
    prefix = root.rstrip("/") + "/"
    assert all(path.startswith(prefix) for path in rows), sorted(rows)[:3]
    return {path.removeprefix(prefix): values for path, values in rows.items()}


def image_count(index: Path) -> int:
    connection = sqlite3.connect(index / CATALOG_FILE, timeout=30)
    try:
        return int(connection.execute("SELECT count(*) FROM images").fetchone()[0])
    finally:
        connection.close()


async def dask_build(photos: Path | str, index: Path, options: DaskOptions) -> BuildReport:
    return await build_index(
        photos, index, progress=False, settings=FAST_ENGINE, dask=options
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("dask-photos"), PHOTOS)


@pytest.fixture(scope="module")
def reference(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The catalog a local build (two processes) makes of ``photos``."""
    index = tmp_path_factory.mktemp("dask-reference") / "index"
    report = asyncio.run(
        build_index(photos, index, workers=2, progress=False, settings=FAST_ENGINE)
    )
    assert report.added == PHOTOS
    assert [Path(path).name for path, _ in report.failed] == ["broken.jpg"]
    return stored(index, str(photos))


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a scheduler with two worker processes of one thread each (loopback)."""
    folder = tmp_path_factory.mktemp("dask-cluster")
    scheduler_file = folder / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--port", "0",
             "--scheduler-file", str(scheduler_file), *common],
            env=subprocess_environment(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "dask", "worker", "--scheduler-file", str(scheduler_file),
                 "--nworkers", "2", "--nthreads", "1", "--local-directory", str(folder), *common],
                env=subprocess_environment(), start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        yield str(json.loads(scheduler_file.read_text())["address"])
    finally:
        for process in reversed(processes):
            kill_group(process.pid)
            process.wait()


@contextlib.asynccontextmanager
async def client_of(address: str) -> AsyncIterator[Any]:
    """A client of the test's own, to watch and disturb the cluster a build uses."""
    async with distributed.Client(address, asynchronous=True) as client:
        await client.wait_for_workers(2, timeout=PROCESS_DEADLINE_S)
        yield client


# --- same results ------------------------------------------------------------------------------


async def test_a_local_cluster_of_two_processes_stores_what_a_local_build_stores(
    photos: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    report = await dask_build(photos, tmp_path / "index", DaskOptions("local:2", batch=3))

    assert report.added == PHOTOS
    assert stored(tmp_path / "index", str(photos)) == reference
    assert catalog_health(tmp_path / "index").problems == []


async def test_photos_sent_by_the_client_are_stored_as_a_local_build_stores_them(
    photos: Path, reference: dict[str, Any], scheduler: str, tmp_path: Path
) -> None:
    options = DaskOptions(scheduler, send_bytes=True, batch=5)
    report = await dask_build(photos, tmp_path / "index", options)
    again = await dask_build(photos, tmp_path / "index", options)

    assert report.added == PHOTOS
    assert stored(tmp_path / "index", str(photos)) == reference
    assert (again.added, again.unchanged, again.still_failing) == (0, PHOTOS, 1)


async def test_photos_given_as_a_url_are_read_through_fsspec_with_the_same_features(
    photos: Path, reference: dict[str, Any], scheduler: str, tmp_path: Path
) -> None:
    url = photos.as_uri()
    report = await dask_build(url, tmp_path / "index", DaskOptions(scheduler))

    assert report.added == PHOTOS
    found = stored(tmp_path / "index", url)
    assert found.keys() == reference.keys()
    # fsspec gives modification times (third of every row) in float seconds, not os.stat's
    # nanoseconds: they may differ by a rounding.
    for name, values in found.items():
        expected = reference[name]
        assert values[:2] + values[3:] == expected[:2] + expected[3:]
        assert abs(values[2] - expected[2]) < 1000


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server on loopback (moto's), for the duration of a test."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_environment(endpoint: str) -> dict[str, str]:
    """What docs/CLUSTER.md tells every worker to set for an S3-compatible endpoint, with
    the server's test credentials; no configuration file of the machine's is read."""
    return subprocess_environment(
        FSSPEC_S3_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",  # noqa: S106 - the local server accepts any
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY="127.0.0.1",
    )


async def test_photos_in_an_s3_compatible_bucket_are_stored_as_a_local_build_stores_them(
    photos: Path, reference: dict[str, Any], s3_endpoint: str, tmp_path: Path
) -> None:
    import boto3

    environment = s3_environment(s3_endpoint)
    bucket = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",  # noqa: S106
    )  # fmt: skip
    bucket.create_bucket(Bucket="archive")
    for path in sorted(photos.rglob("*")):
        if path.is_file():
            key = f"photos/{path.relative_to(photos).as_posix()}"
            bucket.put_object(Bucket="archive", Key=key, Body=path.read_bytes())
    index = tmp_path / "index"
    await create_empty_index(index)
    command = ["-m", "indexer", "build", "s3://archive/photos/", "--index", str(index),
               "--no-progress", "--dask", "local:2"]  # fmt: skip

    status, out, err = await run_process(*command, environment=environment)
    again = await run_process(*command, environment=environment)

    # 3: the broken photo is reported as a failure, as in a local build.
    assert status == 3, out + err
    assert f"{PHOTOS} added" in out
    found = stored(index, "s3://archive/photos")
    assert found.keys() == reference.keys()
    # Everything but the modification time (third of every row): the bucket's, not the file's.
    for name, values in found.items():
        expected = reference[name]
        assert values[:2] + values[3:] == expected[:2] + expected[3:]
        assert values[2] > 0
    assert f"0 added, 0 updated, 0 removed, {PHOTOS} unchanged" in again[1], again


# --- failures ----------------------------------------------------------------------------------


async def test_a_worker_killed_mid_build_loses_nothing_and_stores_nothing_twice(
    reference: dict[str, Any], photos: Path, scheduler: str, tmp_path: Path
) -> None:
    async with client_of(scheduler) as watcher:
        build = asyncio.create_task(
            dask_build(photos, tmp_path / "index", DaskOptions(scheduler, batch=1))
        )
        # Kill a worker while it runs one of the build's tasks.
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        busy: list[str] = []
        while not busy and time.monotonic() < deadline and not build.done():
            processing = await watcher.processing()
            busy = [worker for worker, keys in processing.items() if keys]
            await asyncio.sleep(0.02)
        assert busy, "the build never ran a task"
        pids = await watcher.run(os.getpid, workers=busy[:1])
        os.kill(pids[busy[0]], signal.SIGKILL)
        assert not build.done()
        report = await asyncio.wait_for(build, PROCESS_DEADLINE_S)
        # The nanny started a new worker process in its place.
        await watcher.wait_for_workers(2, timeout=PROCESS_DEADLINE_S)
        assert pids[busy[0]] not in (await watcher.run(os.getpid)).values()

    assert report.added == PHOTOS
    assert catalog_health(tmp_path / "index").problems == []
    assert stored(tmp_path / "index", str(photos)) == reference


async def test_a_client_killed_mid_build_resumes_on_the_next_run(
    scheduler: str, tmp_path: Path
) -> None:
    # More than a commit's worth, so that the kill comes after the first commit, before the last.
    count = COMMIT_EVERY + 32
    photos = write_photos(tmp_path / "photos", count, size=(320, 240))
    index = tmp_path / "index"
    await create_empty_index(index)
    command = [
        sys.executable, "-m", "indexer", "build", str(photos), "--index", str(index),
        "--no-progress", "--dask", scheduler, "--dask-batch", "2",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, env=subprocess_environment(), start_new_session=True,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while (
            not (index / CATALOG_FILE).exists() or image_count(index) == 0
        ) and time.monotonic() < deadline:
            assert process.returncode is None, "the build ended before the kill"
            await asyncio.sleep(0.02)
    finally:
        kill_group(process.pid)
        await process.wait()
    assert process.returncode == -signal.SIGKILL
    committed = image_count(index)
    assert 0 < committed < count
    assert catalog_health(index).problems == []

    status, out, err = await run_process(*command[1:])

    # 3 when the broken file was not committed before the kill, and so is reported now.
    assert status in {0, 3}, out + err
    assert f"{count - committed} added, 0 updated, 0 removed, {committed} unchanged" in out
    health = catalog_health(index)
    assert health.problems == []
    assert health.images == count


def test_the_settings_documented_for_a_cluster_started_by_hand_are_those_of_local_n() -> None:
    import dask.config

    from indexer.distributed import QUIET_CLUSTER_CONFIG

    documented = dict(
        line.split("=", 1)
        for line in (REPOSITORY / "docs" / "CLUSTER.md").read_text().splitlines()
        if line.startswith("DASK_")
    )
    # Read as Dask reads its environment: DASK_A__B_C=value is a.b-c, the value parsed.
    config = dask.config.collect_env(documented)

    assert len(documented) == len(QUIET_CLUSTER_CONFIG)
    for key, value in QUIET_CLUSTER_CONFIG.items():
        assert dask.config.get(key, config=config) == value, key


# --- set-up errors and the optional extra ------------------------------------------------------


def test_a_worker_that_cannot_see_the_folder_stops_the_build_instead_of_failing_each_photo(
    tmp_path: Path,
) -> None:
    from indexer.distributed import analyze_batch

    missing = tmp_path / "not-mounted-here"
    with pytest.raises(ClusterError, match="--dask-send-bytes"):
        analyze_batch([str(missing / "a.jpg")], str(missing), FAST_ENGINE)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--dask", "localhost:8786"], "tcp://HOST:PORT, or local:N"),
        (["--dask", "local:none"], "local:N needs a number"),
        (["--dask-send-bytes"], "need --dask"),
        (["--dask", "local:1", "--dask-batch", "0"], "at least 1"),
        (["--dask", "local:1", "--workers", "2"], "--workers is for a local build"),
    ],
)
async def test_a_bad_dask_option_is_a_clear_error(
    photos: Path, tmp_path: Path, arguments: list[str], message: str
) -> None:
    status, _, err = await run_process(
        "-m", "indexer", "build", str(photos), "--index", str(tmp_path / "index"), *arguments
    )

    assert status == 1
    assert message in err
    assert "Traceback" not in err


async def test_a_url_without_dask_is_a_clear_error(photos: Path, tmp_path: Path) -> None:
    status, _, err = await run_process(
        "-m", "indexer", "build", photos.as_uri(), "--index", str(tmp_path / "index")
    )

    assert status == 1
    assert "only a build with --dask reads those" in err


# Dask made unimportable, as in an install without the extra.
WITHOUT_DASK = """
import sys
sys.modules["distributed"] = None
from indexer.__main__ import main
status = main(sys.argv[1:])
leaked = sorted(name for name in ("dask", "distributed", "fsspec") if sys.modules.get(name))
print("imported:", leaked, "status:", status)
"""


async def test_the_engine_builds_without_dask_and_says_what_to_install_for_dask(
    tmp_path: Path,
) -> None:
    photos = write_photos(tmp_path / "photos", 2, size=(320, 240))
    index = tmp_path / "index"
    await create_empty_index(index)
    local = await run_process("-c", WITHOUT_DASK, "build", str(photos), "--index", str(index),
                              "--no-progress", "--workers", "1")
    on_dask = await run_process("-c", WITHOUT_DASK, "build", str(photos), "--index", str(index),
                                "--dask", "local:2")

    assert "2 added" in local[1], local
    assert "imported: [] status: 3" in local[1], local
    assert "status: 1" in on_dask[1]
    assert "--dask needs the dask extra (distributed is missing)" in on_dask[2]
    assert "imgsearch[dask]" in on_dask[2]


# The client tries to reconnect for about half a minute before it gives the tasks up.
@pytest.mark.slow
async def test_a_scheduler_lost_mid_build_stops_it_with_a_message_and_keeps_the_commits(
    photos: Path, tmp_path: Path
) -> None:
    # A cluster of the test's own (workers as threads): its scheduler is closed mid-build.
    async with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0",
        asynchronous=True,
    ) as cluster:  # fmt: skip
        build = asyncio.create_task(
            dask_build(photos, tmp_path / "index", DaskOptions(cluster.scheduler_address))
        )
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while not cluster.scheduler.tasks:
            assert not build.done()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await cluster.scheduler.close()
        with pytest.raises(ClusterError, match="run the build again"):
            await asyncio.wait_for(build, PROCESS_DEADLINE_S)
    assert catalog_health(tmp_path / "index").problems == []
