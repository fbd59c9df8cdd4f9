"""Job store cost: submit throughput and submit-to-start latency, Redis against SQLite.

In one run, on this machine, one daemon (FETCHML_CPUS=2) per store, the same client work:
- single submits: N sequential jobs.submit calls of one job each (held behind a long-running
  job, so nothing starts and only the store is measured): submits/s and p50 round trip;
- a sweep: one jobs.submit of M jobs (held the same way): jobs/s;
- submit-to-start: from sending jobs.submit of `date +%s.%N` to that command running (read
  back from its log), one job at a time on an idle daemon: p50 and p90.
Redis runs as deployed: appendonly yes, appendfsync always (every acknowledged submit is on
disk); SQLite with WAL and synchronous=FULL. Both on the same filesystem.

Usage: python bench/store_submit.py [--submits 300] [--sweep 2000] [--latency-runs 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_env, machine_line, percentile, throwaway_root

from fetchml.client import Connection
from fetchml.client.local_daemon import LocalDaemon
from fetchml.client.transfer import sync_tree

START_TIMEOUT_S = 30.0
SLOTS = 2


@contextmanager
def redis_server(root: Path) -> Iterator[str]:
    """A redis-server with AOF on and fsync always, on a free port; yields its URL."""
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root.mkdir()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def daemon(root: Path, store: str) -> Iterator[tuple[Connection, Path]]:
    """A daemon on ``store``; yields a connection and its state dir."""
    root.mkdir()
    env = bench_env(HOME=str(root), FETCHML_CPUS=str(SLOTS))
    with LocalDaemon(root / "state", env, ("--store", store, "--name", "bench"),
                     log_path=root / "daemon.log", cwd=root,
                     start_timeout=START_TIMEOUT_S) as running:
        conn = running.connect()
        try:
            yield conn, running.state_dir
        finally:
            conn.close()


def _wait(conn: Connection, job_ids: list[int]) -> list[dict[str, object]]:
    stream = conn.stream("jobs.wait", {"jobs": [str(i) for i in job_ids]})
    for _ in stream.events():
        pass
    return stream.final["jobs"]  # type: ignore[no-any-return]


def measure(root: Path, store: str, submits: int, sweep: int, runs: int) -> dict[str, float]:
    with daemon(root, store) as (conn, state):
        project = root / "project"
        project.mkdir()
        (project / "train.py").write_text("print('hello')\n")
        snapshot = sync_tree(conn, project, max_file_size=1 << 20).snapshot

        def submit(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            reply = conn.call("jobs.submit", {"snapshot": snapshot, "jobs": jobs})
            return reply["jobs"]  # type: ignore[no-any-return]

        blocker = submit([{"argv": ["sleep", "3600"], "cpus": SLOTS}])[0]
        held: dict[str, Any] = {"argv": ["true"], "after": [str(blocker["id"])]}
        round_trips = []
        started = time.perf_counter()
        for _ in range(submits):
            sent = time.perf_counter()
            submit([held])
            round_trips.append(time.perf_counter() - sent)
        single_s = time.perf_counter() - started
        started = time.perf_counter()
        submit([held] * sweep)
        sweep_s = time.perf_counter() - started
        conn.call("jobs.cancel", {"jobs": [str(blocker["id"])]})  # its dependents with it
        _wait(conn, [int(str(blocker["id"]))])
        latencies = []
        for _ in range(runs + 2):
            sent = time.time()
            job = submit([{"argv": ["date", "+%s.%N"]}])[0]
            _wait(conn, [int(str(job["id"]))])
            log = state / "runs" / str(job["id"]) / "1" / "output.log"
            latencies.append(float(log.read_text()) - sent)
    lat_ms = sorted(s * 1000 for s in latencies[2:])  # the first two warm the daemon up
    return {"submits_per_s": submits / single_s,
            "submit_p50_ms": statistics.median(round_trips) * 1000,
            "sweep_jobs_per_s": sweep / sweep_s,
            "start_p50_ms": statistics.median(lat_ms),
            "start_p90_ms": percentile(lat_ms, 0.9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--sweep", type=int, default=2000)
    parser.add_argument("--latency-runs", type=int, default=40)
    args = parser.parse_args()
    with throwaway_root("fml-bs-") as root:
        sqlite = measure(root / "sqlite", "sqlite", args.submits, args.sweep, args.latency_runs)
        with redis_server(root / "redis-data") as url:
            redis = measure(root / "redis", url, args.submits, args.sweep, args.latency_runs)
        print("# job store: Redis (AOF, fsync always) vs SQLite (WAL, synchronous=FULL)")
        print(f"# {machine_line(root)}")
    rows = [
        (f"single submits ({args.submits}), submits/s", "submits_per_s", "{:.0f}"),
        ("single submit round trip p50, ms", "submit_p50_ms", "{:.1f}"),
        (f"one sweep of {args.sweep} jobs, jobs/s", "sweep_jobs_per_s", "{:.0f}"),
        ("submit-to-start p50, ms", "start_p50_ms", "{:.1f}"),
        ("submit-to-start p90, ms", "start_p90_ms", "{:.1f}"),
    ]
    print(f"{'measure':<42}{'sqlite':>10}{'redis':>10}{'redis/sqlite':>14}")
    for label, key, fmt in rows:
        print(f"{label:<42}{fmt.format(sqlite[key]):>10}{fmt.format(redis[key]):>10}"
              f"{redis[key] / sqlite[key]:>13.2f}x")
    print(f"(cpu count {os.cpu_count()}; numbers vary with the disk's fsync cost)")


if __name__ == "__main__":
    main()
