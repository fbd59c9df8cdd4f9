"""The job commands of the CLI against a real daemon: queue (with --grid), logs -f, wait,
pull, status --json and cancel."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, make_inprocess_daemon
from tests.integration.test_jobs import Gate

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
STATUS_KEYS = {"id", "name", "owner", "state", "priority", "snapshot", "argv", "attempt",
               "exit_code", "signal", "gpus", "host", "created_at", "started_at", "finished_at",
               "peak_rss", "outputs"}


@pytest.fixture
def daemon4(short_tmp: Path) -> Iterator[DaemonProcess]:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_CPUS="4").start()
    yield daemon
    daemon.stop()


def queue(daemon: DaemonProcess, project: Path, *args: str) -> list[dict[str, Any]]:
    done = daemon.cli("queue", "--json", *args, cwd=project)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["jobs"]  # type: ignore[no-any-return]


def status(daemon: DaemonProcess, *args: str) -> Any:
    done = daemon.cli("status", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_grid_queues_the_cartesian_product(daemon4: DaemonProcess, project: Path) -> None:
    jobs = queue(daemon4, project, "--grid", "lr=1e-3,3e-4", "--grid", "bs=16,32,64",
                 "--", "sh", "-c", "echo lr={lr} bs={bs} > $FETCHML_OUTPUT_DIR/run.txt")
    assert len(jobs) == 6 and all(j["state"] == "queued" for j in jobs)
    assert daemon4.cli("wait", *(str(j["id"]) for j in jobs)).returncode == 0
    outputs = sorted((daemon4.state_dir / "runs" / str(j["id"]) / "1" / "outputs" / "run.txt")
                     .read_text().strip() for j in jobs)
    assert outputs == sorted(f"lr={lr} bs={bs}" for lr in ("1e-3", "3e-4")
                             for bs in ("16", "32", "64"))
    names = {j["name"] for j in jobs}  # unnamed sweep jobs are named by their own command
    assert "sh -c echo lr=3e-4 bs=32 > $FETCHML_OUTPUT_DIR/run.txt" in names
    assert len(names) == 6
    named = queue(daemon4, project, "--name", "sweep", "--grid", "lr=1,2", "--", "echo", "{lr}")
    assert {j["name"] for j in named} == {"sweep lr=1", "sweep lr=2"}
    bad = daemon4.cli("queue", "--grid", "lr=1,2", "--", "echo", "no placeholder", cwd=project)
    assert bad.returncode == 2 and "has no {lr}" in bad.stderr


def test_logs_follow_shows_new_lines_within_100_ms_and_ends_with_the_job(
        daemon4: DaemonProcess, project: Path) -> None:
    script = "for i in $(seq 40); do date +%s.%N; sleep 0.05; done"
    [job] = queue(daemon4, project, "--", "sh", "-c", script)
    env = dict(daemon4.env, FETCHML_SOCKET=str(daemon4.socket))
    follower = subprocess.Popen([sys.executable, "-m", "fetchml", "logs", str(job["id"]), "-f"],
                                env=env, cwd=project, stdout=subprocess.PIPE, text=True)
    delays: list[float] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            delays.append(time.time() - float(line))

    reader = threading.Thread(target=read)
    reader.start()
    assert follower.wait(timeout=60) == 0  # it ends by itself when the job ends
    reader.join()
    assert follower.stdout is not None
    follower.stdout.close()
    assert len(delays) == 40
    p50 = statistics.median(delays)
    print(f"\nlogs -f: p50 {p50 * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms after the job "
          "wrote the line")
    assert p50 < 0.1


def test_logs_of_a_finished_job_and_of_a_missing_one(daemon4: DaemonProcess,
                                                     project: Path) -> None:
    [job] = queue(daemon4, project, "--", "sh", "-c", "echo out; echo err >&2")
    assert daemon4.cli("wait", str(job["id"])).returncode == 0
    done = daemon4.cli("logs", str(job["id"]))
    assert done.returncode == 0 and done.stdout == "out\nerr\n"
    missing = daemon4.cli("logs", "987654")
    assert missing.returncode == 1 and "no job 987654" in missing.stderr
    assert daemon4.cli("logs", str(job["id"]), "--attempt", "2").returncode == 1


def test_wait_exits_0_only_if_every_job_succeeded(daemon4: DaemonProcess,
                                                  project: Path) -> None:
    ok = queue(daemon4, project, "--", "true")[0]["id"]
    bad = queue(daemon4, project, "--", "sh", "-c", "exit 3")[0]["id"]
    slow = queue(daemon4, project, "--", "sleep", "30")[0]["id"]
    assert daemon4.cli("wait", str(ok)).returncode == 0
    mixed = daemon4.cli("wait", str(ok), str(bad))
    assert mixed.returncode == 1 and f"job {bad} failed, exit 3" in mixed.stdout
    timed_out = daemon4.cli("wait", str(slow), "--timeout", "0.3s")
    assert timed_out.returncode == 124
    cancelled = daemon4.cli("cancel", str(slow), "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["jobs"][0]["id"] == slow
    assert daemon4.cli("wait", str(slow)).returncode == 1
    as_json = daemon4.cli("wait", str(ok), "--json")
    assert json.loads(as_json.stdout)["jobs"][0]["state"] == "succeeded"


def test_pull_downloads_the_outputs_byte_identical(daemon4: DaemonProcess, project: Path,
                                                   short_tmp: Path) -> None:
    script = ('cd "$FETCHML_OUTPUT_DIR" && mkdir -p ckpt/deep && '
              "head -c 3000000 /dev/urandom > ckpt/model.bin && echo '{\"loss\": 0.1}' > "
              "metrics.json && printf '' > ckpt/deep/empty && printf '#!/bin/sh\\n' > run.sh && "
              "chmod +x run.sh")
    [job] = queue(daemon4, project, "--", "sh", "-c", script)
    assert daemon4.cli("wait", str(job["id"])).returncode == 0
    dest = short_tmp / "pulled"
    done = daemon4.cli("pull", str(job["id"]), str(dest), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == 4
    source = daemon4.state_dir / "runs" / str(job["id"]) / "1" / "outputs"
    for path in source.rglob("*"):
        copy = dest / path.relative_to(source)
        assert copy.is_dir() == path.is_dir()
        if path.is_file():
            assert copy.read_bytes() == path.read_bytes()
            assert os.access(copy, os.X_OK) == os.access(path, os.X_OK)
    again = daemon4.cli("pull", str(job["id"]), str(dest))
    assert again.returncode == 1 and "not empty" in again.stderr
    [empty] = queue(daemon4, project, "--", "true")
    daemon4.cli("wait", str(empty["id"]))
    nothing = daemon4.cli("pull", str(empty["id"]), str(short_tmp / "none"))
    assert nothing.returncode == 1 and "has no outputs" in nothing.stderr


def test_status_json_has_the_documented_keys_in_rfc3339_utc(daemon4: DaemonProcess,
                                                            project: Path) -> None:
    [job] = queue(daemon4, project, "--priority", "7", "--retries", "1", "--timeout", "1m",
                  "--env", "A=b", "--name", "named", "--", "sh", "-c", "echo hi")
    daemon4.cli("wait", str(job["id"]))
    one = status(daemon4, str(job["id"]))
    assert set(one) >= STATUS_KEYS
    assert one["name"] == "named" and one["priority"] == 7 and one["max_attempts"] == 2
    assert one["timeout"] == 60 and one["env"] == {"A": "b"} and one["state"] == "succeeded"
    for key in ("created_at", "started_at", "finished_at"):
        assert RFC3339_UTC.fullmatch(one[key]), one[key]
    listing = status(daemon4)
    assert [j["id"] for j in listing["jobs"]] == [job["id"]]
    assert set(listing["jobs"][0]) >= STATUS_KEYS
    assert status(daemon4, "--state", "failed") == {"jobs": []}
    table = daemon4.cli("status")
    assert table.returncode == 0 and "named" in table.stdout and "exit 0" in table.stdout
    detail = daemon4.cli("status", str(job["id"]))
    assert "attempt      1 of 2" in detail.stdout


def test_cancel_from_the_cli(daemon4: DaemonProcess, project: Path, short_tmp: Path) -> None:
    gate = Gate(short_tmp / "gate")
    [running] = queue(daemon4, project, "--cpus", "4", "--", "sh", "-c", gate.wait_script())
    [waiting] = queue(daemon4, project, "--", "true")
    deadline = time.monotonic() + 10
    while status(daemon4, str(running["id"]))["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    done = daemon4.cli("cancel", str(running["id"]), str(waiting["id"]), "--reason", "oops")
    assert done.returncode == 0, done.stderr
    assert f"job {running['id']} running (stopping)" in done.stdout
    assert f"job {waiting['id']} cancelled" in done.stdout
    assert daemon4.cli("wait", str(running["id"])).returncode == 1
    final = status(daemon4, str(running["id"]))
    assert final["state"] == "cancelled" and final["reason"].endswith("oops")
