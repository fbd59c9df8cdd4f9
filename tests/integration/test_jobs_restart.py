"""Jobs outlive the daemon: kill -9 it while jobs run and queue, restart it, lose nothing.

Also: an acknowledged submit survives kill -9 at once, attempts claimed but never launched
are launched after a restart, and a stale attempt's result is refused (fencing).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fetchml.cas.objects import ObjectStore
from fetchml.daemon.jobs.inventory import HostInventory
from fetchml.daemon.jobs.runner import Runner
from fetchml.daemon.store import AttemptResult, Claim, Job, JobSpec, JobState, SqliteJobStore
from fetchml.daemon.supervise.records import RunStatus
from tests.conftest import make_daemon
from tests.integration.test_jobs import Jobs, sh

ROUNDS = 20
SLOTS = 4
QUEUED = 20
JOB_SECONDS = 2  # longer than a restart takes here, so that live jobs get re-adopted


def log_counts(log: str) -> Counter[str]:
    """How the restarted daemons took over attempts, from their logs."""
    counts: Counter[str] = Counter()
    for line in log.splitlines():
        try:
            message = json.loads(line).get("message", "")
        except ValueError:
            continue
        for key, text in (("re-adopted", "re-adopting job"),
                          ("ended while away", "ended while the daemon was away"),
                          ("launched after restart", "was never launched"),
                          ("lost", "supervisor is gone"), ("lost", "vanished without")):
            if text in message:
                counts[key] += 1
    return counts


@pytest.mark.timeout(400)
def test_kill_9_while_jobs_run_and_queue_loses_nothing(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, FETCHML_CPUS=str(SLOTS)).start()
    jobs = Jobs(daemon, short_tmp)
    expected: dict[int, int] = {}  # job id -> the exit code it must report

    def top_up() -> None:
        queued = len(jobs.conn.call("jobs.list", {"states": ["queued"], "limit": 1000})["jobs"])
        specs = [{"argv": sh(f"sleep {JOB_SECONDS}; exit {len(expected) + i}")}
                 for i in range(max(0, QUEUED - queued))]
        if specs:
            for job in jobs.submit(*specs):
                expected[job["id"]] = int(job["argv"][2].rsplit(" ", 1)[1])

    running_at_kill = 0
    rng = random.Random(1234)
    try:
        for _ in range(ROUNDS):
            top_up()
            deadline = time.monotonic() + 20
            while True:
                running = jobs.conn.call("jobs.list", {"states": ["running"]})["jobs"]
                if len(running) == SLOTS:
                    break
                assert time.monotonic() < deadline, "the daemon did not fill its slots"
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.5))  # land the kill anywhere in the jobs' lives
            running_at_kill += len(running)
            jobs.conn.close()
            daemon.kill()
            daemon.start()
            jobs.reconnect()
        assert max(expected.values()) < 256
        done = jobs.wait(*({"id": i} for i in expected), timeout=120)
    finally:
        jobs.conn.close()
        daemon.stop()
    outcomes = Counter(job["state"] for job in done)
    counts = log_counts(daemon.log())
    print(f"\n{ROUNDS} kill -9 rounds, {len(expected)} jobs, {running_at_kill} running at the "
          f"kills; after restarts: {dict(counts)}; outcomes: {dict(outcomes)}")
    assert len(done) == len(expected)
    for job in done:
        code = expected[job["id"]]
        assert job["exit_code"] == code, job
        assert job["state"] == ("succeeded" if code == 0 else "failed"), job
        assert job["attempt"] == 1, job  # never lost, never run twice
    assert counts["lost"] == 0
    # Every restart found attempts to take over (how each was taken over depends on timing).
    assert counts["re-adopted"] > 0
    taken_over = counts["re-adopted"] + counts["ended while away"] + counts[
        "launched after restart"]
    assert taken_over >= ROUNDS * SLOTS // 2


def test_acknowledged_submit_survives_kill_9_at_once(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, FETCHML_CPUS="1").start()
    jobs = Jobs(daemon, short_tmp)
    acknowledged = []
    try:
        for round_number in range(5):
            reply = jobs.conn.call("jobs.submit", {
                "snapshot": jobs.snapshot,
                "jobs": [{"argv": ["sleep", "60"], "name": f"r{round_number}"}]})
            daemon.proc.kill()  # type: ignore[union-attr]  # the moment the reply arrived
            daemon.proc.wait()  # type: ignore[union-attr]
            acknowledged.append(reply["jobs"][0]["id"])
            daemon.start()
            jobs.reconnect()
            for number, job_id in enumerate(acknowledged):
                assert jobs.get(job_id)["name"] == f"r{number}"
        jobs.conn.call("jobs.cancel", {"jobs": [str(i) for i in acknowledged]})
    finally:
        jobs.conn.close()
        daemon.stop()


def test_claimed_but_never_launched_attempts_run_after_a_restart(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, FETCHML_CPUS="2").start()
    jobs = Jobs(daemon, short_tmp)
    first = jobs.wait(jobs.one(["true"]))[0]
    jobs.conn.close()
    daemon.stop()
    # Two jobs claimed for this host, as a daemon that died before launching them would have
    # left them; one even has a spec that no supervisor ever took.
    queued = asyncio.run(_submit_and_claim(daemon.state_dir / "jobs.db", first, [
        ("no-dir", ("true",)), ("stale-spec", ("sh", "-c", "echo relaunched"))]))
    stale = daemon.state_dir / "runs" / str(queued[1]["id"]) / "1"
    stale.mkdir(parents=True)
    (stale / "spec.json").write_text(json.dumps({"argv": ["false"], "cwd": "/"}))
    daemon.start()
    jobs.reconnect()
    try:
        done = jobs.wait(*queued)
        assert [(j["state"], j["attempt"]) for j in done] == [("succeeded", 1)] * 2
        assert (stale / "output.log").read_text() == "relaunched\n"
    finally:
        jobs.conn.close()
        daemon.stop()
    assert log_counts(daemon.log())["launched after restart"] == 2


async def _submit_and_claim(db: Path, like: dict[str, Any],
                            commands: list[tuple[str, tuple[str, ...]]]) -> list[dict[str, Any]]:
    async with SqliteJobStore(db) as store:
        specs = [JobSpec(name=name, owner=like["owner"], snapshot=like["snapshot"], argv=argv)
                 for name, argv in commands]
        submitted = await store.submit(specs, time.time())
        claims = [Claim(job.id, 0, like["host"]) for job in submitted]
        claimed = await store.claim(claims, time.time())
        assert len(claimed) == len(commands)
        return [{"id": job.id} for job in claimed]


async def test_stale_attempt_result_is_refused_through_the_runner(tmp_path: Path) -> None:
    changes: list[Job] = []
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        [job] = await store.submit([JobSpec(name="fenced", owner="me", snapshot="a" * 64,
                                            argv=("true",), max_attempts=2)], time.time())
        [first] = await store.claim([Claim(job.id, 0, "here")], time.time())
        await store.finish(job.id, 1, AttemptResult(JobState.LOST, reason="host vanished"),
                           time.time())
        [second] = await store.claim([Claim(job.id, 1, "here")], time.time())
        runner = Runner(state_dir=tmp_path, host="here", store=store,
                        objects=ObjectStore(tmp_path / "objects"),
                        snapshots=ObjectStore(tmp_path / "snapshots"),
                        inventory=HostInventory("here", 1, 1 << 30, ()), kill_grace=1.0,
                        environ={}, on_change=changes.append, on_end=lambda _: None)
        # attempt 1's supervisor reports late: success, but it no longer holds the job
        for attempt, code in ((first, 0), (second, 3)):
            run_dir = runner.run_dir(job.id, attempt.attempt)
            (run_dir / "outputs").mkdir(parents=True)
            status = RunStatus(exit_code=code, signal=None, reason="exited", error=None,
                               started_at=1.0, finished_at=2.0, peak_rss=0, cpu_time=0.0)
            (run_dir / "status.json").write_text(json.dumps(status.to_dict()))
        await runner._conclude(first, runner.run_dir(job.id, 1))
        current = await store.get(job.id)
        assert current is not None and current.state is JobState.RUNNING
        assert current.attempt == 2 and changes == []
        await runner._conclude(second, runner.run_dir(job.id, 2))
        current = await store.get(job.id)
        assert current is not None and current.state is JobState.FAILED
        assert current.exit_code == 3 and [c.attempt for c in changes] == [2]


def test_hostname_is_the_default_host(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp).start()
    jobs = Jobs(daemon, short_tmp)
    try:
        assert jobs.wait(jobs.one(["true"]))[0]["host"] == socket.gethostname()
    finally:
        jobs.conn.close()
        daemon.stop()
