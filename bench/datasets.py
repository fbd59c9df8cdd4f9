"""Datasets: what a 1 GiB push sends, and what ten jobs on one version cost the host.

Pushes a 1 GiB dataset (64 files of 16 MiB), pushes it again unchanged, then with one file
changed, and reports bytes sent and time for each. Then runs one job on it (cold: the version
is materialised), one more (warm), and ten at once, and reports their wall times, how many
distinct trees the jobs saw (inode of the dataset root), and the disk used by the cache and by
the ten run directories, against the 10 GiB that a copy per job would take.
Usage: python bench/datasets.py [--mib 1024] [--jobs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import Daemon, machine_line, running_daemon, throwaway_root

MiB = 1 << 20
FILE_MIB = 16  # size of each dataset file


def disk_usage(path: Path) -> int:
    """Bytes of blocks allocated under ``path`` (symlinks counted, never followed)."""
    total = 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            total += st.st_blocks * 512
    return total


def push(daemon: Daemon, data: Path) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    out = daemon.cli("--json", "dataset", "push", "big", str(data), check=True).stdout
    return time.perf_counter() - started, json.loads(out)


def run_jobs(daemon: Daemon, project: Path, count: int, script: str) -> tuple[float, list[str]]:
    started = time.perf_counter()
    grid = ["--grid", "i=" + ",".join(str(i) for i in range(count))] if count > 1 else []
    out = daemon.cli("--json", "queue", "--dataset", "big", *grid, "--", "sh", "-c",
                     ("true {i}; " if count > 1 else "") + script, cwd=project,
                     check=True).stdout
    ids = [str(job["id"]) for job in json.loads(out)["jobs"]]
    daemon.cli("wait", *ids, check=True)
    elapsed = time.perf_counter() - started
    return elapsed, [daemon.cli("logs", job_id, check=True).stdout for job_id in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="dataset size in MiB")
    parser.add_argument("--jobs", type=int, default=10, help="jobs sharing the dataset")
    options = parser.parse_args()
    with throwaway_root("fml-bench-") as root:
        print(machine_line(root))
        data, project = root / "data", root / "proj"
        data.mkdir()
        project.mkdir()
        (project / "run.sh").write_text("echo hi\n")
        block = os.urandom(FILE_MIB * MiB)
        for i in range(options.mib // FILE_MIB):
            (data / f"shard{i:03d}.bin").write_bytes(i.to_bytes(8, "big") + block[8:])
        config = root / "daemon.yaml"
        config.write_text(f"cpus: {max(16, options.jobs)}\n")
        with running_daemon(root / "state", "--config", str(config)) as daemon:
            for label in ("first push", "same tree again"):
                seconds, result = push(daemon, data)
                print(f"{label:<22} {seconds:6.2f} s  version {result['version']}  sent "
                      f"{result['sent_files']} files, {int(result['sent_bytes']) / MiB:.1f} MiB")
            with open(data / "shard007.bin", "r+b") as shard:
                shard.write(b"changed!")
            seconds, result = push(daemon, data)
            print(f"{'one file changed':<22} {seconds:6.2f} s  version {result['version']}  "
                  f"sent {result['sent_files']} files, "
                  f"{int(result['sent_bytes']) / MiB:.1f} MiB")
            show = 'stat -L -c "inode %i" "$FETCHML_DATA_DIR/big"'
            cold, _ = run_jobs(daemon, project, 1, show)
            warm, _ = run_jobs(daemon, project, 1, show)
            many, outputs = run_jobs(daemon, project, options.jobs, show)
            inodes = {line for out in outputs for line in out.splitlines()
                      if line.startswith("inode")}
            cache = disk_usage(daemon.state_dir / "datasets" / "cache")
            runs = disk_usage(daemon.state_dir / "runs")
            print(f"one job, cold          {cold:6.2f} s  (materialises {options.mib} MiB)")
            print(f"one job, warm          {warm:6.2f} s")
            print(f"{options.jobs} jobs at once        {many:6.2f} s  distinct trees seen: "
                  f"{len(inodes)}")
            print(f"disk: cache {cache / MiB:.1f} MiB, run dirs of {options.jobs + 2} jobs "
                  f"{runs / MiB:.2f} MiB (a copy per job: "
                  f"{options.jobs * options.mib / 1024:.1f} GiB)")
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
