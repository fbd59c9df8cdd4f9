"""fetchml watch: time from a file write to the new snapshot being stored by the daemon.

Tree: the sync benchmark's 10,000 files of 200 B - 8 KiB in nested folders; its 512 MiB
file is left out by default (--big-mib 0): it changes nothing here but the first sync's time.
A `fetchml watch --json` process runs against a throwaway daemon; each of the --edits edits
rewrites one file, then waits for the watcher's JSON line. "Stored" is the modification time
of the snapshot file the daemon wrote (``snapshots/ab/cdef...``), so the latency is measured
on the daemon's side, and cross-checked against the moment the JSON line arrived.
Goals with the default debounce (200 ms): p50 <= 300 ms, p95 <= 600 ms.

Usage: python bench/watch_latency.py [--edits 50] [--files 10000] [--big-mib 0]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import fetchml_command, machine_line, percentile, running_daemon, throwaway_root
from sync_vs_rsync import FILES_PER_DIR, build_tree

GOAL_P50_MS, GOAL_P95_MS = 300.0, 600.0
# Longest wait for one sync line before the benchmark gives up.
LINE_TIMEOUT_S = 60.0
# Pause after each sync so every edit is its own burst (longer than the debounce).
SETTLE_S = 0.3


def edited_file(tree: Path, files: int, index: int) -> Path:
    number = (index * 7919) % files  # spread the edits over the whole tree
    leaf = number // FILES_PER_DIR
    return tree / f"pkg{leaf // 10:02d}" / f"mod{leaf % 10:02d}" / f"file{number:05d}.py"


class WatchProcess:
    """`fetchml watch --json TREE`, its stdout lines read by a thread into a queue."""

    def __init__(self, tree: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([*fetchml_command(), "watch", "--json", str(tree)],
                                     env=env, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.time_ns(), json.loads(line)))

    def next_line(self) -> tuple[int, dict[str, Any]]:
        try:
            return self.lines.get(timeout=LINE_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError("the watcher printed no sync line in time") from None

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(timeout=20)


def daemon_put_ms(socket: Path, tree: Path, runs: int = 10) -> list[float]:
    """How long the daemon takes to store a new manifest of this tree (one entry changed,
    its object already uploaded), without any watcher: its share of each sync."""
    from fetchml.cas.hashing import hash_bytes
    from fetchml.cas.ignore import IgnoreRules
    from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
    from fetchml.cas.scan import scan_tree
    from fetchml.client import Target, connect

    entries = list(scan_tree(tree, rules=IgnoreRules.load(tree), cache=None).manifest.entries)
    at = next(index for index, entry in enumerate(entries) if entry.kind == "file")
    timings = []
    with connect(Target(socket_path=str(socket))) as conn:
        for run in range(runs):
            data = f"baseline edit {run} {time.time_ns()}".encode()
            oid = hash_bytes(data)
            conn.call("cas.put", {"blobs": [{"oid": oid, "size": len(data), "offset": 0,
                                             "data": data}]})
            entries[at] = ManifestEntry.file(entries[at].path, oid, len(data))
            encoded = SnapshotManifest(entries).encode()
            started = time.perf_counter()
            conn.call("snapshot.put", {"manifest": encoded})
            timings.append((time.perf_counter() - started) * 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big-mib", type=int, default=0)
    args = parser.parse_args()
    stored_ms: list[float] = []
    line_ms: list[float] = []
    hashed: list[int] = []
    with throwaway_root("fml-bench-") as root:
        tree = root / "tree"
        tree.mkdir()
        build_tree(tree, args.files, args.big_mib)
        print(machine_line(root))
        print(f"tree: {args.files} files of 200 B - 8 KiB"
              + (f" + one {args.big_mib} MiB file" if args.big_mib else
                 " (the 512 MiB file of the sync benchmark left out)"))
        with running_daemon(root / "state") as daemon:
            watcher = WatchProcess(tree, daemon.env)
            try:
                _, first = watcher.next_line()
                print(f"initial sync: {first['files']} files, sent {first['sent_files']}")
                rng = random.Random(11)
                for index in range(args.edits):
                    path = edited_file(tree, args.files, index)
                    data = rng.randbytes(rng.randint(200, 8192))
                    written_ns = time.time_ns()
                    path.write_bytes(data)
                    seen_ns, line = watcher.next_line()
                    snapshot = str(line["snapshot"])
                    stored = daemon.state_dir / "snapshots" / snapshot[:2] / snapshot[2:]
                    stored_ns = os.stat(stored).st_mtime_ns
                    stored_ms.append((stored_ns - written_ns) / 1e6)
                    line_ms.append((seen_ns - written_ns) / 1e6)
                    hashed.append(int(line["hashed_files"]))
                    time.sleep(SETTLE_S)
            finally:
                watcher.stop()
            put_ms = daemon_put_ms(daemon.socket, tree)
    p50, p95 = percentile(stored_ms, 0.5), percentile(stored_ms, 0.95)
    print(f"{args.edits} edits, write -> snapshot stored: p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
          f"max {max(stored_ms):.0f} ms  (goals: p50 <= {GOAL_P50_MS:.0f}, "
          f"p95 <= {GOAL_P95_MS:.0f})")
    print(f"write -> JSON line: p50 {percentile(line_ms, 0.5):.0f} ms, "
          f"p95 {percentile(line_ms, 0.95):.0f} ms, max {max(line_ms):.0f} ms")
    print(f"files read per sync: max {max(hashed)}")
    put_p50 = percentile(put_ms, 0.5)
    print(f"the daemon's snapshot.put of a new manifest alone: p50 {put_p50:.0f} ms, "
          f"max {max(put_ms):.0f} ms; the rest (debounce + watcher): p50 {p50 - put_p50:.0f} ms")
    met = p50 <= GOAL_P50_MS and p95 <= GOAL_P95_MS
    print("goals met" if met else "goals NOT met")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
