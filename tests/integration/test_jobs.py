"""Jobs against a real daemon with real subprocesses: order, resources, dependencies, timeouts,
retries, fencing, cancel (whole process tree), and the event stream."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fetchml.client import Connection
from fetchml.client.transfer import sync_tree
from fetchml.errors import BadRequest, Conflict, NotFound
from tests.conftest import DaemonProcess, make_daemon, make_inprocess_daemon, stop_if_running

TERMINAL = {"succeeded", "failed", "cancelled", "lost"}


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


class Jobs:
    """A protocol client for one daemon, with a tiny snapshot to run jobs on."""

    def __init__(self, daemon: DaemonProcess, root: Path) -> None:
        self.daemon, self.root = daemon, root
        self.conn: Connection = daemon.connect()
        project = root / "project"
        project.mkdir(exist_ok=True)
        (project / "hello.txt").write_text("hello\n")
        self.snapshot = sync_tree(self.conn, project, max_file_size=1 << 20).snapshot

    def reconnect(self) -> None:
        self.conn.close()
        self.conn = self.daemon.connect()

    def submit(self, *specs: dict[str, Any]) -> list[dict[str, Any]]:
        reply = self.conn.call("jobs.submit", {"snapshot": self.snapshot, "jobs": list(specs)})
        return reply["jobs"]  # type: ignore[no-any-return]

    def one(self, argv: list[str], **fields: Any) -> dict[str, Any]:
        return self.submit({"argv": argv, **fields})[0]

    def get(self, job: dict[str, Any] | int) -> dict[str, Any]:
        job_id = job if isinstance(job, int) else job["id"]
        return self.conn.call("jobs.get", {"job": str(job_id)})  # type: ignore[no-any-return]

    def wait(self, *jobs: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
        stream = self.conn.stream("jobs.wait", {"jobs": [str(j["id"]) for j in jobs],
                                                "timeout": timeout})
        for _ in stream.events():
            pass
        assert not stream.final["timed_out"], stream.final
        return stream.final["jobs"]  # type: ignore[no-any-return]

    def wait_state(self, job: dict[str, Any], *states: str,
                   timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.get(job)
            if found["state"] in states:
                return found
            assert time.monotonic() < deadline, f"job {job['id']} stayed {found['state']}"
            time.sleep(0.02)


class Gate:
    """A file jobs wait for: they block until the test opens the gate."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def wait_script(self) -> str:
        return f"while [ ! -e {self.path} ]; do sleep 0.01; done"

    def open(self) -> None:
        self.path.touch()


@pytest.fixture
def gate(short_tmp: Path) -> Gate:
    return Gate(short_tmp / "gate")


def start_daemon(root: Path, *, process: bool = False, **env: str | None) -> Iterator[Jobs]:
    """A daemon with these settings (None removes a variable) and a client for it: served in
    this process, or with ``process`` a daemon process of its own."""
    make = make_daemon if process else make_inprocess_daemon
    daemon = make(root, **{k: v for k, v in env.items() if v is not None})
    for name in [k for k, v in env.items() if v is None]:
        daemon.env.pop(name, None)
    daemon.start()
    jobs = Jobs(daemon, root)
    try:
        yield jobs
    finally:
        jobs.conn.close()
        stop_if_running(daemon)


@pytest.fixture
def one_slot(short_tmp: Path) -> Iterator[Jobs]:
    yield from start_daemon(short_tmp, FETCHML_CPUS="1", FETCHML_KILL_GRACE="1")


def start_order(jobs: Jobs, submitted: list[dict[str, Any]]) -> list[str]:
    done = jobs.wait(*submitted)
    assert all(j["state"] == "succeeded" for j in done), done
    return [j["name"] for j in sorted(done, key=lambda j: j["started_at"])]


# --- order -------------------------------------------------------------------------------------


def test_priority_order_then_fifo_within_a_priority(one_slot: Jobs, gate: Gate) -> None:
    blocker = one_slot.one(sh(gate.wait_script()), name="blocker")
    one_slot.wait_state(blocker, "running")
    queued = [one_slot.one(["true"], name=name, priority=priority)
              for name, priority in [("a5", 5), ("b1", 1), ("c10", 10), ("d5", 5), ("e10", 10),
                                     ("f1", 1)]]
    gate.open()
    assert start_order(one_slot, [blocker, *queued]) == [
        "blocker", "c10", "e10", "a5", "d5", "b1", "f1"]


def test_aging_lets_a_job_that_waited_overtake_higher_priorities(short_tmp: Path,
                                                                 gate: Gate) -> None:
    for jobs in start_daemon(short_tmp, FETCHML_CPUS="1", FETCHML_AGING_INTERVAL="0.1"):
        blocker = jobs.one(sh(gate.wait_script()), name="blocker")
        jobs.wait_state(blocker, "running")
        old = jobs.one(["true"], name="old-p1", priority=1)
        time.sleep(1.2)  # 12 aging steps: 1 + 12 beats a fresh priority 10
        fresh = [jobs.one(["true"], name=f"fresh-p10-{i}", priority=10) for i in range(2)]
        gate.open()
        assert start_order(jobs, [blocker, old, *fresh]) == [
            "blocker", "old-p1", "fresh-p10-0", "fresh-p10-1"]


# --- resources and backfill --------------------------------------------------------------------


def overlapping(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


def test_jobs_start_only_when_their_cpus_fit(short_tmp: Path) -> None:
    for jobs in start_daemon(short_tmp, FETCHML_CPUS="2"):
        big = jobs.one(["sleep", "0.4"], name="big", cpus=2)
        small = [jobs.one(["sleep", "0.4"], name=f"small{i}") for i in range(2)]
        big, *small = jobs.wait(big, *small)
        assert not overlapping(big, small[0]) and not overlapping(big, small[1])
        assert overlapping(small[0], small[1])  # two 1-CPU jobs share the 2 slots
        with pytest.raises(BadRequest, match="can never start: it needs 3 CPUs"):
            jobs.one(["true"], cpus=3)


def test_backfill_uses_only_what_the_blocked_head_does_not_need(short_tmp: Path,
                                                               gate: Gate) -> None:
    # 4 CPUs, 100 bytes of memory. The head waits for memory; 2 CPUs stay beyond its demand.
    for jobs in start_daemon(short_tmp, FETCHML_CPUS="4", FETCHML_MEMORY="100"):
        running = jobs.one(sh(gate.wait_script()), name="running", memory=80)
        jobs.wait_state(running, "running")
        head = jobs.one(["true"], name="head", memory=50)
        greedy = jobs.one(["true"], name="greedy", cpus=3)  # fits the 3 free CPUs, not beyond
        small = jobs.one(sh("sleep 0.2"), name="small", cpus=2)  # fits beyond the head
        small = jobs.wait(small)[0]
        assert small["state"] == "succeeded"
        time.sleep(0.3)  # the scheduler had every chance to start the greedy job
        assert jobs.get(head)["state"] == "queued"
        assert jobs.get(greedy)["state"] == "queued"
        gate.open()
        running, head, greedy = jobs.wait(running, head, greedy)
        assert head["started_at"] <= greedy["started_at"]
        assert small["finished_at"] < head["started_at"]


# --- dependencies, timeouts, retries -----------------------------------------------------------


def test_after_holds_until_success_and_cancels_on_failure(short_tmp: Path) -> None:
    for jobs in start_daemon(short_tmp, FETCHML_CPUS="4"):
        first = jobs.one(["sleep", "0.3"], name="first")
        then = jobs.one(["true"], name="then", after=[str(first["id"])])
        assert then["state"] == "held"
        broken = jobs.one(sh("sleep 0.3; exit 4"), name="broken")
        skipped = jobs.one(["true"], name="skipped", after=[str(broken["id"])])
        chained = jobs.one(["true"], name="chained", after=[str(skipped["id"])])
        first, then, broken, skipped, chained = jobs.wait(first, then, broken, skipped, chained)
        assert then["state"] == "succeeded" and then["started_at"] >= first["finished_at"]
        assert broken["state"] == "failed" and broken["exit_code"] == 4
        assert skipped["state"] == "cancelled"
        assert skipped["reason"] == f"dependency {broken['id']} failed"
        assert chained["state"] == "cancelled"
        assert chained["reason"] == f"dependency {skipped['id']} was cancelled"
        # a dependency that already failed can never succeed: refused, not queued cancelled
        with pytest.raises(Conflict, match=f"job {broken['id']} already ended failed"):
            jobs.one(["true"], after=[str(broken["id"])])
        with pytest.raises(Conflict, match="already ended cancelled"):
            jobs.one(["true"], after=[str(skipped["id"])])
        with pytest.raises(NotFound):
            jobs.one(["true"], after=["999999"])
        with pytest.raises(BadRequest, match="after must be a list"):
            jobs.one(["true"], after="1")


def test_timeout_stops_the_job_and_fails_it(one_slot: Jobs) -> None:
    job = one_slot.one(["sleep", "30"], timeout=0.5)
    job = one_slot.wait(job)[0]
    assert job["state"] == "failed"
    assert job["reason"] == "timed out after 0.5 s"
    assert job["signal"] == 15 and job["exit_code"] is None
    assert job["finished_at"] - job["started_at"] < 5
    with pytest.raises(BadRequest, match="timeout"):
        one_slot.one(["true"], timeout=-1)


def test_retries_number_the_attempts_and_keep_each_log(one_slot: Jobs) -> None:
    flaky = one_slot.one(sh('echo "attempt $FETCHML_ATTEMPT"; test "$FETCHML_ATTEMPT" -ge 3'),
                         retries=3)
    hopeless = one_slot.one(sh("exit 7"), retries=1)
    flaky, hopeless = one_slot.wait(flaky, hopeless)
    assert flaky["state"] == "succeeded" and flaky["attempt"] == 3
    runs = one_slot.daemon.state_dir / "runs" / str(flaky["id"])
    for attempt in (1, 2, 3):
        assert (runs / str(attempt) / "output.log").read_text() == f"attempt {attempt}\n"
    assert hopeless["state"] == "failed" and hopeless["attempt"] == 2
    assert hopeless["reason"] == "attempt 2 failed: exit 7" and hopeless["exit_code"] == 7
    with pytest.raises(BadRequest, match="retries must not be negative"):
        one_slot.one(["true"], retries=-1)


def test_a_command_that_does_not_exist_fails_with_a_reason(one_slot: Jobs) -> None:
    job = one_slot.wait(one_slot.one(["no-such-command-here"]))[0]
    assert job["state"] == "failed" and job["exit_code"] == 127
    assert "command not found: no-such-command-here" in job["reason"]


# --- cancel ------------------------------------------------------------------------------------


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cancel_running_job_kills_its_whole_tree(one_slot: Jobs, short_tmp: Path) -> None:
    pids = short_tmp / "pids"
    # a grandchild that ignores TERM (killed after the grace) and one that escaped with setsid
    script = (f"(trap '' TERM; sleep 300) & echo $! >> {pids}; "
              f"setsid sleep 300 & echo $! >> {pids}; wait")
    job = one_slot.one(sh(script))
    one_slot.wait_state(job, "running")
    deadline = time.monotonic() + 10
    while not pids.exists() or len(pids.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchildren = [int(p) for p in pids.read_text().split()]
    assert not any(gone(pid) for pid in grandchildren)
    cancelled = one_slot.conn.call("jobs.cancel", {"jobs": [str(job["id"])],
                                                   "reason": "wrong lr"})["jobs"][0]
    assert cancelled["state"] == "running"  # stopping: TERM, grace, KILL
    job = one_slot.wait(job)[0]
    assert job["state"] == "cancelled"
    assert job["reason"].endswith(": wrong lr")
    assert all(gone(pid) for pid in grandchildren)


def test_cancel_queued_job_at_once(one_slot: Jobs, gate: Gate) -> None:
    blocker = one_slot.one(sh(gate.wait_script()))
    queued = one_slot.one(["true"])
    dependent = one_slot.one(["true"], after=[str(queued["id"])])
    cancelled = one_slot.conn.call("jobs.cancel", {"jobs": [str(queued["id"])]})["jobs"][0]
    assert cancelled["state"] == "cancelled" and cancelled["reason"].startswith("cancelled by ")
    assert one_slot.wait(dependent)[0]["reason"] == f"dependency {queued['id']} was cancelled"
    gate.open()
    assert one_slot.wait(blocker)[0]["state"] == "succeeded"
    assert one_slot.get(queued)["started_at"] is None
    with pytest.raises(NotFound):
        one_slot.conn.call("jobs.cancel", {"jobs": ["424242"]})


# --- events ------------------------------------------------------------------------------------


def test_every_state_change_is_an_event(short_tmp: Path) -> None:
    for jobs in start_daemon(short_tmp, FETCHML_CPUS="2"):
        watcher = jobs.daemon.connect()
        stream = watcher.stream("jobs.events", {})
        watcher.call("host.ping")  # the subscription is in place once a later request is answered
        first = jobs.one(["sleep", "0.2"], name="first")
        then = jobs.one(["true"], name="then", after=[str(first["id"])])
        broken = jobs.one(sh("exit 1"), name="broken", retries=1)
        skipped = jobs.one(["true"], name="skipped", after=[str(broken["id"])])
        jobs.wait(first, then, broken, skipped)
        seen: dict[str, list[tuple[str, int]]] = {}
        ended = set()
        for event in stream.events():
            job = event.data
            seen.setdefault(job["name"], []).append((job["state"], job["attempt"]))
            if job["state"] in TERMINAL:
                ended.add(job["name"])
            if ended == {"first", "then", "broken", "skipped"}:
                break
        stream.cancel()
        for _ in stream.events():  # to its final reply: nothing is in flight when it closes
            pass
        watcher.close()
        assert seen["first"] == [("queued", 0), ("running", 1), ("succeeded", 1)]
        assert seen["then"] == [("held", 0), ("queued", 0), ("running", 1), ("succeeded", 1)]
        assert seen["broken"] == [("queued", 0), ("running", 1), ("queued", 1), ("running", 2),
                                  ("failed", 2)]
        assert seen["skipped"] == [("held", 0), ("cancelled", 0)]


def test_job_environment(short_tmp: Path) -> None:
    # A daemon process: its own environment (with its FETCHML_* settings) is what jobs inherit.
    for one_slot in start_daemon(short_tmp, process=True, FETCHML_CPUS="1",
                                 FETCHML_KILL_GRACE="1"):
        job = one_slot.one(sh('env | sort; echo "CWD=$(pwd)"'), env={"LR": "3e-4"})
        job = one_slot.wait(job)[0]
        env = dict(line.split("=", 1) for line in (
            one_slot.daemon.state_dir / "runs" / str(job["id"]) / "1" / "output.log"
        ).read_text().splitlines() if "=" in line)
        assert env["LR"] == "3e-4" and env["FETCHML_JOB_ID"] == str(job["id"])
        assert env["FETCHML_ATTEMPT"] == "1" and env["FETCHML_SNAPSHOT"] == one_slot.snapshot
        assert env["FETCHML_OUTPUT_DIR"].endswith(f"runs/{job['id']}/1/outputs")
        assert env["CUDA_VISIBLE_DEVICES"] == "" and env["NVIDIA_VISIBLE_DEVICES"] == "none"
        assert "FETCHML_CPUS" not in env and "FETCHML_KILL_GRACE" not in env
        assert os.path.basename(env["CWD"]) == "work"
