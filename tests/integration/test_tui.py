"""`fetchml tui` driven with Textual's pilot against a real daemon: jobs appear and change state
live, the output follows, the plot gains points as the job writes them, cancel asks first,
re-queue and pull, narrow terminals, a read-only role, and a daemon restart."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.cli.tui.app import Dashboard
from fetchml.cli.tui.widgets import ConfirmScreen, PromptScreen
from fetchml.client import Connection, Target, connect
from tests.conftest import (
    DaemonProcess,
    make_daemon,
    make_inprocess_daemon,
    stop_if_running,
)

# A training script: writes `count` steps of output and metrics, waits for the gate file, then
# writes as many again and an output file.
TRAIN = b"""\
import json, os, pathlib, sys, time
gate, count = pathlib.Path(sys.argv[1]), int(sys.argv[2])
metrics = open(os.environ["FETCHML_METRICS_FILE"], "a")
def step(i):
    print(f"step {i} loss {1 / (i + 1):.4f}", flush=True)
    metrics.write(json.dumps({"step": i, "loss": 1 / (i + 1), "acc": i / 100}) + "\\n")
    metrics.flush()
for i in range(count):
    step(i)
while not gate.exists():
    time.sleep(0.01)
for i in range(count, 2 * count):
    step(i)
    time.sleep(0.005)
pathlib.Path(os.environ["FETCHML_OUTPUT_DIR"], "model.txt").write_text("weights")
"""
SIZE = (80, 24)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_CPUS="4", FETCHML_GPUS="0,1").start()
    yield daemon
    stop_if_running(daemon)


@pytest.fixture
def daemon_process(short_tmp: Path) -> Iterator[DaemonProcess]:
    """For the restart test."""
    daemon = make_daemon(short_tmp, FETCHML_CPUS="4", FETCHML_GPUS="0,1").start()
    yield daemon
    stop_if_running(daemon)


def upload(conn: Connection) -> str:
    oid = hash_bytes(TRAIN)
    conn.call("cas.put", {"blobs": [{"oid": oid, "size": len(TRAIN), "offset": 0,
                                     "data": TRAIN}]})
    manifest = SnapshotManifest([ManifestEntry.file("train.py", oid, len(TRAIN))])
    return str(conn.call("snapshot.put", {"manifest": manifest.encode()})["snapshot"])


def submit(conn: Connection, *argv: str, **fields: Any) -> dict[str, Any]:
    reply = conn.call("jobs.submit", {"snapshot": upload(conn),
                                      "jobs": [{"argv": list(argv), **fields}]})
    return reply["jobs"][0]  # type: ignore[no-any-return]


def train(conn: Connection, gate: Path, count: int = 20, **fields: Any) -> dict[str, Any]:
    return submit(conn, "python3", "train.py", str(gate), str(count), **fields)


async def until(pilot: Pilot[None], condition: Callable[[], object], what: str,
                timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await pilot.pause(0.05)


def table_states(app: Dashboard) -> dict[int, str]:
    table = app.table
    return {int(str(table.get_row_at(i)[0])): str(table.get_row_at(i)[1])
            for i in range(table.row_count)}


def dashboard(daemon: DaemonProcess, tmp: Path, key: str | None = None) -> Dashboard:
    def reconnect() -> Connection:
        return connect(Target(socket_path=str(daemon.socket)), api_key=key)

    return Dashboard(reconnect, pull_dir=tmp)


async def test_jobs_appear_and_change_state_live(daemon: DaemonProcess, short_tmp: Path) -> None:
    gate = short_tmp / "gate"
    app = dashboard(daemon, short_tmp)
    with daemon.connect() as conn:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.hello, "connected")
            assert app.table.row_count == 0
            job = await asyncio.to_thread(train, conn, gate, 5, gpus=1)
            await until(pilot, lambda: table_states(app).get(job["id"]) == "running",
                        "the new job shows as running")
            assert "job" in str(app.query_one("#gpus").render())
            blocked = await asyncio.to_thread(submit, conn, "sleep", "30", cpus=4)
            await until(pilot, lambda: table_states(app).get(blocked["id"]) == "queued",
                        "a job that does not fit shows as queued")
            gate.touch()
            await until(pilot, lambda: table_states(app).get(job["id"]) == "succeeded",
                        "the job shows as succeeded")
            await until(pilot, lambda: table_states(app).get(blocked["id"]) == "running",
                        "the queued job starts once the first ends")
            await pilot.press("s", "s")  # "running" only
            assert set(table_states(app)) == {blocked["id"]}
            await pilot.press("s", "s", "s", "s")  # back to every state
            await pilot.press("o")  # sort by name
            assert app.board.sort_key == "name"
            await pilot.click("#jobs", offset=(2, 0))  # the "id" header: sort by id again
            await pilot.pause()
            assert app.board.sort_key == "id"
        app.feeds.stop()


@pytest.mark.serial  # follows a log as it is written: timing-sensitive under load
async def test_log_follows_and_plot_gains_points_as_written(daemon: DaemonProcess,
                                                            short_tmp: Path) -> None:
    gate = short_tmp / "gate"
    app = dashboard(daemon, short_tmp)
    with daemon.connect() as conn, contextlib.ExitStack() as cleanup:
        job = await asyncio.to_thread(train, conn, gate, 20)
        cleanup.callback(gate.touch)  # the job waits on the gate: never leave it waiting
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.selected == job["id"], "the job is selected")
            await until(pilot, lambda: app.plot.point_count == 20, "the first 20 points")
            await until(pilot, lambda: "step 19 loss" in app.log_pane.lines[-2],
                        "the first 20 lines of output")
            assert app.metrics.selected == "loss" and app.metrics.names() == ["loss", "acc"]
            assert "loss" in str(app.plot.render()) and "⠀" in str(app.plot.render())
            app.log_pane.focus()
            await pilot.press("home")  # scroll back to read: new output must not pull away
            assert app.log_pane.scroll_y == 0
            gate.touch()
            await until(pilot, lambda: app.plot.point_count == 40, "20 more points")
            await until(pilot, lambda: any("step 39" in line for line in app.log_pane.lines),
                        "20 more lines")
            assert app.log_pane.scroll_y == 0
            await pilot.press("end")  # back at the end: following again
            await until(pilot, lambda: app.log_pane.following
                        and app.log_pane.is_vertical_scroll_end, "following at the end")
            await pilot.press("m")
            assert app.metrics.selected == "acc"
            await pilot.press("slash")
            assert isinstance(app.screen, PromptScreen)
            await pilot.press(*"LOSS 0.5000", "enter")  # any case
            assert app.log_pane.matches == [1]  # "step 1 loss 0.5000"
            assert not app.log_pane.following  # searching stops following
            await pilot.press("f")
            assert app.log_pane.following
        app.feeds.stop()


async def test_cancel_asks_first_then_cancels(daemon: DaemonProcess, short_tmp: Path) -> None:
    app = dashboard(daemon, short_tmp)
    with daemon.connect() as conn:
        job = await asyncio.to_thread(submit, conn, "sleep", "60")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: table_states(app).get(job["id"]) == "running",
                        "the job runs")
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            other = await asyncio.to_thread(submit, conn, "true")  # changes behind the dialog
            await until(pilot, lambda: table_states(app).get(other["id"]) == "succeeded",
                        "the table changes behind the dialog")
            await pilot.press("n")
            await pilot.pause(0.3)
            assert conn.call("jobs.get", {"job": str(job["id"])})["state"] == "running"
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: table_states(app).get(job["id"]) == "cancelled",
                        "the job shows as cancelled")
            assert conn.call("jobs.get", {"job": str(job["id"])})["state"] == "cancelled"
        app.feeds.stop()


async def test_requeue_with_the_same_options_and_pull_outputs(daemon: DaemonProcess,
                                                              short_tmp: Path) -> None:
    gate = short_tmp / "gate"
    gate.touch()
    app = dashboard(daemon, short_tmp)
    with daemon.connect() as conn:
        job = await asyncio.to_thread(train, conn, gate, 3, priority=7, gpus=1,
                                      env={"SEED": "3"}, labels={"sweep": "a"})
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: table_states(app).get(job["id"]) == "succeeded",
                        "the job ends")
            await until(pilot, lambda: (app.current_job or {}).get("outputs"),
                        "its outputs are known")
            await pilot.press("p")
            pulled = short_tmp / "outputs" / str(job["id"]) / "model.txt"
            await until(pilot, pulled.exists, "its outputs are pulled")
            assert pulled.read_text() == "weights"
            await pilot.press("p")  # again: never over the first copy
            await until(pilot, (short_tmp / "outputs" / f"{job['id']}-2").exists,
                        "a second copy beside the first")
            await pilot.press("r")
            await until(pilot, lambda: len(app.board.jobs) == 2, "the re-queued job appears")
        again = conn.call("jobs.get", {"job": str(max(app.board.jobs))})
        for key in ("argv", "snapshot", "priority", "gpus", "retries", "env", "labels", "cpus"):
            assert again[key] == job[key], key
        app.feeds.stop()


async def test_narrow_terminal_keeps_jobs_and_log(daemon: DaemonProcess,
                                                  short_tmp: Path) -> None:
    app = dashboard(daemon, short_tmp)
    with daemon.connect() as conn:
        job = await asyncio.to_thread(submit, conn, "sh", "-c", "echo hello; sleep 30")
        async with app.run_test(size=(50, 16)) as pilot:
            await until(pilot, lambda: any("hello" in line for line in app.log_pane.lines),
                        "the output shows")
            assert not app.query_one("#side").display
            assert app.table.region.width > 0 and app.log_pane.region.height > 0
            assert app.plot.region.height > 0
            await pilot.resize_terminal(*SIZE)
            await pilot.pause()
            assert app.query_one("#side").display
            assert table_states(app) == {job["id"]: "running"}
        app.feeds.stop()


async def test_analyst_sees_everyone_and_cannot_cancel(daemon: DaemonProcess,
                                                       short_tmp: Path) -> None:
    with daemon.connect() as admin:  # root on the Unix socket is admin
        key = admin.call("admin.users.add", {"name": "carol", "role": "analyst"})["key"]
        job = await asyncio.to_thread(submit, admin, "sleep", "30")
        app = dashboard(daemon, short_tmp, key)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: table_states(app).get(job["id"]) == "running",
                        "another user's job shows")
            assert app.hello["role"] == "analyst"
            await pilot.press("c", "y")
            await until(pilot, lambda: any(severity == "error" and "may not" in message
                                           for severity, message in app.told),
                        "the refusal is shown")
            assert admin.call("jobs.get", {"job": str(job["id"])})["state"] == "running"
        app.feeds.stop()


async def test_reconnects_after_the_daemon_restarts(daemon_process: DaemonProcess,
                                                    short_tmp: Path) -> None:
    daemon = daemon_process
    app = dashboard(daemon, short_tmp)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.hello, "connected")
        await asyncio.to_thread(daemon.stop)
        await until(pilot, lambda: app.problem, "the lost connection shows")
        await asyncio.to_thread(daemon.start)
        with daemon.connect() as conn:
            job = await asyncio.to_thread(submit, conn, "true")
        await until(pilot, lambda: not app.problem and job["id"] in table_states(app),
                    "connected again, with the new job")
    app.feeds.stop()
