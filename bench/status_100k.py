"""`fetchml status` with 100,000 finished jobs in the store.

Fills the SQLite job store directly (one transaction), starts a daemon on it, then times
`jobs.list` over the protocol and the whole `fetchml status` command (a fresh process each run).
Goal: both <= 100 ms.
Usage: python bench/status_100k.py [--jobs 100000] [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import bench_env, throwaway_root  # noqa: E402  (importing common compiles fetchml)

from fetchml.client.local_daemon import LocalDaemon  # noqa: E402
from fetchml.daemon.jobs.model import Job, JobState  # noqa: E402
from fetchml.daemon.store.sqlite import SqliteJobStore  # noqa: E402
from fetchml.daemon.store.sqlite_schema import INSERT_JOB, job_to_row  # noqa: E402


def start_daemon(root: Path, **env: str) -> LocalDaemon:
    """A daemon process on ``root/state``, logging to ``root/daemon.log``, answering."""
    return LocalDaemon(root / "state",
                       bench_env(HOME=str(root), PYTHONUNBUFFERED="1", **env),
                       log_path=root / "daemon.log", cwd=root, start_timeout=30.0).start()


def fill_store(db: Path, count: int, owner: str) -> None:
    """``count`` succeeded jobs, written straight into a freshly migrated database."""

    async def migrate() -> None:
        async with SqliteJobStore(db):
            pass

    asyncio.run(migrate())
    now = time.time()
    template = Job(id=1, name="train lr=3e-4", owner=owner, snapshot="0" * 64,
                   argv=("python", "train.py"), state=JobState.SUCCEEDED, attempt=1,
                   created_at=now, queued_at=now, started_at=now, finished_at=now, host="bench",
                   exit_code=0, peak_rss=1 << 20, cpu_time=0.5)
    first = job_to_row(template)
    rows = [(i, *first[1:]) for i in range(1, count + 1)]
    with sqlite3.connect(db) as conn:
        conn.executemany(INSERT_JOB, rows)
        conn.execute("INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)",
                     (count,))


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def measure_status(root: Path, jobs: int, runs: int) -> dict[str, float]:
    """Milliseconds (median) of jobs.list over the protocol and of the whole CLI command."""
    import getpass

    fill_store(root / "state" / "jobs.db", jobs, getpass.getuser())
    daemon = start_daemon(root)
    try:
        conn = daemon.connect()
        list_samples = []
        for _ in range(runs + 1):
            started = time.perf_counter()
            found = conn.call("jobs.list", {})
            list_samples.append(time.perf_counter() - started)
        assert len(found["jobs"]) == 50, len(found["jobs"])
        conn.close()
        cli_samples = []
        for _ in range(runs + 1):
            started = time.perf_counter()
            daemon.cli("status", check=True)
            cli_samples.append(time.perf_counter() - started)
        started = time.perf_counter()
        daemon.cli("status", "--json", check=True)
        json_ms = (time.perf_counter() - started) * 1000
        click_samples = []  # the floor: a Python that only imports click
        for _ in range(runs + 1):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import click"], check=True)
            click_samples.append(time.perf_counter() - started)
    finally:
        daemon.stop()
    return {"list_ms": median_ms(list_samples[1:]), "cli_ms": median_ms(cli_samples[1:]),
            "cli_json_ms": json_ms, "click_ms": median_ms(click_samples[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with throwaway_root("fml-st-") as root:
        result = measure_status(root, args.jobs, args.runs)
    print(f"{args.jobs} finished jobs in the store")
    print(f"jobs.list over the protocol   {result['list_ms']:7.1f} ms  (goal <= 100 ms)")
    print(f"fetchml status (whole CLI)    {result['cli_ms']:7.1f} ms  (goal <= 100 ms)")
    print(f"python -c 'import click'      {result['click_ms']:7.1f} ms  (the floor of any CLI)")


if __name__ == "__main__":
    main()
