"""Job metrics against a real daemon: `fetchml metrics` of a sweep, `status JOB`, malformed
lines, following points as they are written, a daemon restart mid-run, who may see them, and
the daemon's memory while a job writes 100,000 points."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fetchml.errors import BadRequest, NotFound
from tests.conftest import (
    DaemonProcess,
    make_daemon,
    make_inprocess_daemon,
    stop_if_running,
)
from tests.integration.test_tui import submit, train

# Writes `sys.argv[1]` points of three series as fast as it can.
FLOOD = """\
import json, os, sys
with open(os.environ["FETCHML_METRICS_FILE"], "w") as out:
    for i in range(int(sys.argv[1])):
        out.write(json.dumps({"step": i, "loss": 1 / (i + 1), "acc": i * 1e-5, "lr": 3e-4}))
        out.write("\\n")
"""


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_CPUS="4").start()
    yield daemon
    stop_if_running(daemon)


@pytest.fixture
def daemon_process(short_tmp: Path) -> Iterator[DaemonProcess]:
    """For the kill -9 test."""
    daemon = make_daemon(short_tmp, FETCHML_CPUS="4").start()
    yield daemon
    stop_if_running(daemon)


@pytest.fixture
def project(short_tmp: Path) -> Path:
    root = short_tmp / "project"
    root.mkdir()
    (root / "flood.py").write_text(FLOOD)
    return root


def queue(daemon: DaemonProcess, project: Path, *args: str) -> list[str]:
    done = daemon.cli("queue", "--json", *args, cwd=project)
    assert done.returncode == 0, done.stderr
    return [str(job["id"]) for job in json.loads(done.stdout)["jobs"]]


def cli_json(daemon: DaemonProcess, *args: str) -> Any:
    done = daemon.cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_metrics_of_a_sweep_print_the_comparison_table(daemon: DaemonProcess,
                                                       project: Path) -> None:
    ids = queue(daemon, project, "--grid", "n=10,20,30", "--", "python3", "flood.py", "{n}")
    assert daemon.cli("wait", *ids).returncode == 0
    done = daemon.cli("metrics", *ids)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.strip().splitlines()
    assert header.split() == ["JOB", "NAME", "STATE", "STEP", "ACC", "LOSS", "LR"]
    assert len(rows) == 3
    for job_id, count, row in zip(ids, (10, 20, 30), rows, strict=True):
        cells = row.split()
        assert cells[0] == job_id and "succeeded" in cells and cells[-4] == str(count - 1)
        assert float(cells[-2]) == pytest.approx(1 / count) and float(cells[-1]) == 3e-4
    several = cli_json(daemon, "metrics", *ids)
    assert [doc["job"] for doc in several["jobs"]] == [int(i) for i in ids]
    one = cli_json(daemon, "metrics", ids[0])
    assert one["job"] == int(ids[0]) and set(one["series"]) == {"loss", "acc", "lr"}
    assert one["series"]["loss"][0] == [0, 1.0] and one["series"]["loss"][-1] == [9, 0.1]
    assert len(one["series"]["loss"]) == 10 and one["counts"]["loss"] == 10
    assert cli_json(daemon, "metrics", ids[0], "--max-points", "2")["series"]["acc"] == [
        [0, 0.0], [9, 9e-5]]
    human = daemon.cli("metrics", ids[2]).stdout
    assert "loss" in human and "▁" in human and "0.0333333" in human
    status = daemon.cli("status", ids[1])
    assert "metrics      acc 0.00019, loss 0.05, lr 0.0003  at step 19" in status.stdout
    assert cli_json(daemon, "status", ids[1])["metrics"]["loss"] == {"step": 19, "value": 0.05}
    missing = daemon.cli("metrics", ids[0], "999")
    assert missing.returncode == 1 and "no job 999" in missing.stderr


def test_malformed_lines_are_counted_and_skipped(daemon: DaemonProcess, project: Path) -> None:
    lines = ['{"step": 0, "loss": 1.0}', "not json", "[1, 2]", '{"step": "x", "loss": 1}',
             '{"loss": ' + " " * 70_000 + "2}", '{"step": 2, "loss": NaN, "note": "spike"}',
             '{"step": 3, "loss": 0.25}']
    (project / "write.py").write_text(
        "import os\nopen(os.environ['FETCHML_METRICS_FILE'], 'w').write(" +
        repr("\n".join(lines)) + ")\n")  # the last line has no newline: the end counts it
    [job] = queue(daemon, project, "--", "python3", "write.py")
    assert daemon.cli("wait", job).returncode == 0
    doc = cli_json(daemon, "metrics", job)
    assert doc["malformed"] == 4 and doc["records"] == 3
    assert doc["series"] == {"loss": [[0, 1.0], [2, None], [3, 0.25]]}
    assert "4 malformed lines skipped" in daemon.cli("metrics", job).stdout
    run_dir = daemon.state_dir / "runs" / job / "1"
    assert (run_dir / "metrics.msgpack").is_file()


def test_follow_streams_points_as_they_are_written(daemon: DaemonProcess,
                                                   short_tmp: Path) -> None:
    gate = short_tmp / "gate"
    with daemon.connect() as conn:
        job = train(conn, gate, 25)
        stream = conn.stream("jobs.metrics", {"jobs": [str(job["id"])], "follow": True})
        seen: list[list[Any]] = []
        opened = False
        for event in stream.events():
            data = event.data
            if data["reset"]:
                seen = []
            seen.extend(data["series"].get("loss", []))
            if len(seen) == 25 and not opened:
                assert conn.call("jobs.get", {"job": str(job["id"])})["state"] == "running"
                gate.touch()  # the first points came while the job waited
                opened = True
        assert [step for step, _ in seen] == list(range(50))
        [final] = stream.final["jobs"]
        assert final["state"] == "succeeded" and final["counts"] == {"loss": 50, "acc": 50}
        assert final["series"] == {}
        # a job that is over: the stream sends what was kept and ends at once
        again = conn.stream("jobs.metrics", {"jobs": [str(job["id"])], "follow": True,
                                             "names": ["acc"]})
        events = list(again.events())
        assert len(events) == 1 and len(events[0].data["series"]["acc"]) == 50


def test_every_attempt_starts_with_an_empty_metrics_file(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        job = submit(conn, "sh", "-c", 'test -f "$FETCHML_METRICS_FILE" && '
                     'test ! -s "$FETCHML_METRICS_FILE" && echo "$FETCHML_METRICS_FILE"')
        [done] = conn.call("jobs.wait", {"jobs": [str(job["id"])]})["jobs"]
        assert done["state"] == "succeeded"
        [entry] = conn.call("jobs.metrics", {"jobs": [str(job["id"])]})["jobs"]
    assert entry["series"] == {} and entry["records"] == 0 and entry["malformed"] == 0
    run_dir = daemon.state_dir / "runs" / str(job["id"]) / "1"
    assert (run_dir / "output.log").read_text().strip() == str(run_dir / "metrics.jsonl")
    assert not (run_dir / "metrics.msgpack").exists()  # nothing to keep


def test_bad_requests_and_other_users_jobs(daemon: DaemonProcess, short_tmp: Path) -> None:
    from fetchml.client import Target, connect

    with daemon.connect() as admin:
        job = submit(admin, "true")
        keys = {name: admin.call("admin.users.add", {"name": name, "role": role})["key"]
                for name, role in (("bob", "researcher"), ("carol", "analyst"))}
        for args in ({"jobs": []}, {"jobs": [str(job["id"])] * 101},
                     {"jobs": [str(job["id"])], "max_points": 0}):
            with pytest.raises(BadRequest):
                admin.call("jobs.metrics", args)
        with pytest.raises(NotFound):
            admin.call("jobs.metrics", {"jobs": ["424242"]})
    target = Target(socket_path=str(daemon.socket))
    with connect(target, api_key=keys["bob"]) as bob, pytest.raises(NotFound):
        bob.call("jobs.metrics", {"jobs": [str(job["id"])]})
    with connect(target, api_key=keys["carol"]) as carol:
        assert carol.call("jobs.metrics", {"jobs": [str(job["id"])]})["jobs"][0]["job"] == \
            job["id"]


def test_a_daemon_restart_mid_run_loses_no_points(daemon_process: DaemonProcess,
                                                  short_tmp: Path) -> None:
    daemon = daemon_process
    gate = short_tmp / "gate"
    with daemon.connect() as conn:
        job = train(conn, gate, 30)
    metrics_file = daemon.state_dir / "runs" / str(job["id"]) / "1" / "metrics.jsonl"
    deadline = time.monotonic() + 20
    while not metrics_file.exists() or metrics_file.read_text().count("\n") < 30:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    daemon.kill()
    daemon.start()
    with daemon.connect() as conn:
        reply = conn.call("jobs.metrics", {"jobs": [str(job["id"])]})
        assert reply["jobs"][0]["counts"]["loss"] == 30  # followed again from the start
        gate.touch()
        conn.call("jobs.wait", {"jobs": [str(job["id"])]})
        [entry] = conn.call("jobs.metrics", {"jobs": [str(job["id"])]})["jobs"]
    assert entry["counts"] == {"loss": 60, "acc": 60} and len(entry["series"]["loss"]) == 60


def rss_while(daemon: DaemonProcess, work: Any) -> tuple[int, int, Any]:
    """The daemon's RSS before ``work()`` and its peak while it runs (sampled every 10 ms)."""
    assert daemon.proc is not None
    proc = psutil.Process(daemon.proc.pid)
    before = proc.memory_info().rss
    peak, done = before, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return before, peak, result


def test_a_job_writing_100k_points_keeps_the_daemon_memory_bounded(
        short_tmp: Path, project: Path) -> None:
    points = 100_000
    daemon = make_daemon(short_tmp, FETCHML_METRICS_MAX_POINTS="1000").start()
    try:
        [warm] = queue(daemon, project, "--", "python3", "flood.py", "1000")
        assert daemon.cli("wait", warm).returncode == 0
        [job] = queue(daemon, project, "--", "python3", "flood.py", str(points))

        def follow_to_the_end() -> list[Any]:
            with daemon.connect() as conn:
                stream = conn.stream("jobs.metrics", {"jobs": [job], "follow": True})
                return list(stream.events())

        before, peak, events = rss_while(daemon, follow_to_the_end)
        growth = (peak - before) / 2**20
        run_dir = daemon.state_dir / "runs" / job / "1"
        raw, kept = ((run_dir / name).stat().st_size for name in ("metrics.jsonl",
                                                                   "metrics.msgpack"))
        print(f"\n{points} points x 3 series: daemon RSS {before / 2**20:.1f} MiB before, "
              f"peak +{growth:.1f} MiB; metrics file {raw / 2**20:.1f} MiB, kept copy "
              f"{kept / 2**10:.1f} KiB; {len(events)} follow events")
        assert growth < 40, f"the daemon grew by {growth:.1f} MiB"
        assert kept < 3 * 1000 * 16 + 4096  # three series of at most 1000 points
        with daemon.connect() as conn:
            [entry] = conn.call("jobs.metrics", {"jobs": [job]})["jobs"]
        assert entry["counts"]["loss"] == points and entry["records"] == points
        loss = entry["series"]["loss"]
        assert 500 <= len(loss) <= 1000 and loss[0][0] == 0 and loss[-1][0] == points - 1
        steps = [step for step, _ in loss[:-1]]
        assert len({b - a for a, b in itertools.pairwise(steps)}) == 1  # evenly spread
    finally:
        daemon.stop()
