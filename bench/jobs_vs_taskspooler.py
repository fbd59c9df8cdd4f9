"""Job throughput and start latency: fetchml against Debian's task-spooler (tsp).

In one run, on this machine:
- 1,000 trivial jobs (`true`) on 2 slots: fetchml (a daemon with FETCHML_CPUS=2, one
  jobs.submit of 1,000 specs, then jobs.wait) against `tsp -S 2` (1,000 `tsp true`, then wait
  for all). Goal: fetchml's throughput >= tsp's.
- submit-to-start latency of single submits: from sending jobs.submit to the job's first
  instruction (the job is `date +%s.%N`, read back from its log). Goal: p50 <= 20 ms.
- `fetchml status` with 100,000 finished jobs in the store (see status_100k.py). Goal <= 100 ms.

Usage: python bench/jobs_vs_taskspooler.py [--jobs 1000] [--latency-runs 40] [--skip-status]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import percentile, throwaway_root
from status_100k import measure_status, start_daemon

from fetchml.client import Connection
from fetchml.client.transfer import sync_tree

SLOTS = 2


def tiny_snapshot(conn: Connection, root: Path) -> str:
    project = root / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hello')\n")
    return sync_tree(conn, project, max_file_size=1 << 20).snapshot


def fetchml_throughput(root: Path, jobs: int) -> float:
    """Seconds for ``jobs`` trivial jobs, from the submit to the last one's end."""
    daemon = start_daemon(root, FETCHML_CPUS=str(SLOTS))
    try:
        conn = daemon.connect()
        snapshot = tiny_snapshot(conn, root)
        specs = [{"argv": ["true"], "name": f"t{i}"} for i in range(jobs)]
        started = time.perf_counter()
        submitted = conn.call("jobs.submit", {"snapshot": snapshot, "jobs": specs})["jobs"]
        done = _wait(conn, submitted)
        elapsed = time.perf_counter() - started
        bad = [j for j in done if j["state"] != "succeeded"]
        if bad:
            sys.exit(f"{len(bad)} fetchml jobs did not succeed, e.g. {bad[0]}")
        conn.close()
        return elapsed
    finally:
        daemon.stop()


def _wait(conn: Connection, submitted: list[dict[str, object]]) -> list[dict[str, object]]:
    stream = conn.stream("jobs.wait", {"jobs": [str(j["id"]) for j in submitted]})
    for _ in stream.events():
        pass
    return stream.final["jobs"]  # type: ignore[no-any-return]


def tsp_throughput(root: Path, jobs: int) -> float:
    """Seconds for ``jobs`` `tsp true` submits and their runs on 2 slots."""
    tmp = root / "tsp"
    tmp.mkdir()
    env = dict(os.environ, TS_SOCKET=str(tmp / "socket"), TS_MAXFINISHED=str(jobs * 2),
               TMPDIR=str(tmp), TS_SAVELIST=str(tmp / "list"))
    subprocess.run(["tsp", "-S", str(SLOTS)], env=env, check=True)
    try:
        ids = []
        started = time.perf_counter()
        for _ in range(jobs):
            out = subprocess.run(["tsp", "true"], env=env, capture_output=True, text=True,
                                 check=True).stdout
            ids.append(out.strip())
        # tsp runs jobs in order, so once the last two have ended every job has
        for job in ids[-SLOTS:]:
            subprocess.run(["tsp", "-w", job], env=env, check=False)
        elapsed = time.perf_counter() - started
    finally:
        subprocess.run(["tsp", "-K"], env=env, check=False)
    return elapsed


def start_latencies(root: Path, runs: int) -> list[float]:
    """Seconds from sending a single jobs.submit to its job's first instruction."""
    daemon = start_daemon(root, FETCHML_CPUS=str(SLOTS))
    try:
        conn = daemon.connect()
        snapshot = tiny_snapshot(conn, root)
        samples = []
        for _ in range(runs + 2):
            sent = time.time()
            job = conn.call("jobs.submit", {"snapshot": snapshot,
                                            "jobs": [{"argv": ["date", "+%s.%N"]}]})["jobs"][0]
            _wait(conn, [job])
            log = daemon.state_dir / "runs" / str(job["id"]) / "1" / "output.log"
            samples.append(float(log.read_text()) - sent)
        conn.close()
        return samples[2:]  # the first ones warm the daemon up
    finally:
        daemon.stop()


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {model}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--skip-status", action="store_true", help="Skip the 100k status run.")
    args = parser.parse_args()
    if shutil.which("tsp") is None:
        sys.exit("task-spooler is not installed: apt-get install task-spooler")
    with throwaway_root("fml-bj-") as root:
        (root / "a").mkdir()
        fml_s = fetchml_throughput(root / "a", args.jobs)
        tsp_s = tsp_throughput(root, args.jobs)
        (root / "b").mkdir()
        latencies = start_latencies(root / "b", args.latency_runs)
        status = None
        if not args.skip_status:
            (root / "c").mkdir()
            status = measure_status(root / "c", 100_000, 10)
    fml_rate, tsp_rate = args.jobs / fml_s, args.jobs / tsp_s
    lat_ms = sorted(s * 1000 for s in latencies)
    p50 = statistics.median(lat_ms)
    p90 = percentile(lat_ms, 0.9)
    print(f"# fetchml jobs vs task-spooler  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# {machine()}")
    print(f"{'measure':<44}{'fetchml':>12}{'tsp':>12}{'ratio':>9}   goal")
    print(f"{f'{args.jobs} x true on {SLOTS} slots, jobs/s':<44}{fml_rate:>12.0f}"
          f"{tsp_rate:>12.0f}{fml_rate / tsp_rate:>8.2f}x   fetchml >= tsp")
    print(f"{f'{args.jobs} x true on {SLOTS} slots, total s':<44}{fml_s:>12.2f}{tsp_s:>12.2f}")
    print(f"{'submit-to-start latency p50, ms':<44}{p50:>12.1f}{'':>12}"
          f"{p50 / 20:>8.2f}x   <= 20 ms")
    print(f"{'submit-to-start latency p90, ms':<44}{p90:>12.1f}")
    if status is not None:
        print(f"{'status, 100k finished jobs: jobs.list, ms':<44}{status['list_ms']:>12.1f}"
              f"{'':>12}{status['list_ms'] / 100:>8.2f}x   <= 100 ms")
        print(f"{'status, 100k finished jobs: CLI, ms':<44}{status['cli_ms']:>12.1f}"
              f"{'':>12}{status['cli_ms'] / 100:>8.2f}x   <= 100 ms")
        print(f"{'  (python -c import click, same run, ms)':<44}{status['click_ms']:>12.1f}")


if __name__ == "__main__":
    main()
