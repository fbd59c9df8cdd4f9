"""fetchml sync against rsync -a to a local directory, on the same tree, in the same run.

Tree: 10,000 files of 200 B - 8 KiB in nested folders plus one 512 MiB file. Cases:
(a) first sync, (b) no-op sync, (c) one file changed, (d) the same tree under another
directory name (a fresh copy, no stat cache). Goals: (a) <= 1.5x rsync, (b) <= 1.0x,
(c) <= 1.0x, (d) fetchml sends 0 bytes where rsync copies everything.

fetchml makes what it stores durable (fsync) and plain rsync does not, so (a) is also shown
against rsync followed by `sync`; the goals are against plain rsync.

Usage: python bench/sync_vs_rsync.py [--runs 3] [--files 10000] [--big-mib 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    Daemon,
    fetchml_command,
    machine_line,
    median,
    running_daemon,
    throwaway_root,
    time_command,
)

SMALL_MIN, SMALL_MAX = 200, 8 * 1024
# Files per leaf folder; folders nest two levels (pkgNN/modNN/).
FILES_PER_DIR = 100
# Files are dated an hour back, as in a real project where most files are old.
AGE_S = 3600
RSYNC = ["rsync", "-a", "--stats", "--exclude=/.fetchml"]
_RSYNC_SENT = re.compile(r"Total transferred file size: ([\d,]+)")


@dataclass
class Case:
    name: str
    goal: str
    fetchml: list[float] = field(default_factory=list)
    rsync: list[float] = field(default_factory=list)
    fetchml_sent: list[int] = field(default_factory=list)
    rsync_sent: list[int] = field(default_factory=list)


def build_tree(root: Path, files: int, big_mib: int, seed: int = 7) -> int:
    """Create the benchmark tree; returns its total size in bytes."""
    rng = random.Random(seed)
    total = 0
    for index in range(files):
        leaf = index // FILES_PER_DIR
        folder = root / f"pkg{leaf // 10:02d}" / f"mod{leaf % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(SMALL_MIN, SMALL_MAX))
        (folder / f"file{index:05d}.py").write_bytes(data)
        total += len(data)
    big = root / "data" / "weights.bin"
    big.parent.mkdir(parents=True, exist_ok=True)
    with open(big, "wb") as stream:
        for _ in range(big_mib):
            stream.write(os.urandom(1 << 20))
    total += big_mib << 20
    old = os.stat(root).st_mtime - AGE_S
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (old, old))
    return total


def copy_tree(src: Path, dst: Path) -> None:
    """A plain copy with mtimes, without fetchml's per-project state."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fetchml"), copy_function=shutil.copy2)


def fetchml_sync(daemon: Daemon, tree: Path) -> tuple[float, int]:
    elapsed, out = time_command([*fetchml_command(), "sync", "--json", str(tree)], daemon.env)
    return elapsed, int(json.loads(out)["sent_bytes"])


def rsync(src: Path, dst: Path, then_sync: bool = False) -> tuple[float, int]:
    cmd = [*RSYNC, f"{src}/", f"{dst}/"]
    if then_sync:
        cmd = ["sh", "-c", " ".join(cmd) + " && sync"]
    elapsed, out = time_command(cmd)
    found = _RSYNC_SENT.search(out)
    return elapsed, int(found.group(1).replace(",", "")) if found else -1


def change_one_file(tree: Path, run: int) -> None:
    path = tree / "pkg00" / "mod00" / f"file{run:05d}.py"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def fresh_first_syncs(root: Path, tree: Path, runs: int, first: Case,
                      durable: list[float]) -> None:
    """(a): each run against an empty store and no stat cache, and rsync into an empty dir."""
    for run in range(runs):
        shutil.rmtree(tree / ".fetchml", ignore_errors=True)
        os.sync()
        with running_daemon(root / f"state-a{run}") as daemon:
            elapsed, sent = fetchml_sync(daemon, tree)
        first.fetchml.append(elapsed)
        first.fetchml_sent.append(sent)
        shutil.rmtree(root / f"state-a{run}")
        for then_sync in (False, True):
            shutil.rmtree(root / "dest", ignore_errors=True)
            os.sync()
            elapsed, sent = rsync(tree, root / "dest", then_sync)
            if then_sync:
                durable.append(elapsed)
            else:
                first.rsync.append(elapsed)
                first.rsync_sent.append(sent)


def repeated(runs: int, case: Case, prepare: Callable[[int], None],
             fetchml_run: Callable[[int], tuple[float, int]],
             rsync_run: Callable[[int], tuple[float, int]]) -> None:
    for run in range(runs):
        prepare(run)
        for samples, sent, action in ((case.fetchml, case.fetchml_sent, fetchml_run),
                                      (case.rsync, case.rsync_sent, rsync_run)):
            elapsed, count = action(run)
            samples.append(elapsed)
            sent.append(count)


def start_up_floor(runs: int) -> tuple[float, float]:
    """Medians of `python -c pass` and `fetchml --version`: what any CLI run costs first."""
    python = median([time_command([sys.executable, "-c", "pass"])[0] for _ in range(runs)])
    cli = median([time_command([*fetchml_command(), "--version"])[0] for _ in range(runs)])
    return python, cli


def report(cases: list[Case], durable: list[float], root: Path, tree_bytes: int,
           files: int, floor: tuple[float, float]) -> None:
    print(machine_line(root))
    print(f"tree: {files} small files + one large file, {tree_bytes / 2**20:.0f} MiB in all; "
          f"medians of {len(cases[0].fetchml)} runs ((b) and (c): {len(cases[1].fetchml)})")
    header = (f"{'case':<26}{'fetchml s':>10}{'rsync s':>10}{'ratio':>8}  {'goal':<10}"
              f"{'fetchml sent':>14}{'rsync sent':>14}")
    print(header)
    print("-" * len(header))
    for case in cases:
        ours, theirs = median(case.fetchml), median(case.rsync)
        print(f"{case.name:<26}{ours:>10.3f}{theirs:>10.3f}{ours / theirs:>8.2f}  "
              f"{case.goal:<10}{int(median(case.fetchml_sent)):>14,}"
              f"{int(median(case.rsync_sent)):>14,}")
    ours = median(cases[0].fetchml)
    print(f"{'(a) vs rsync && sync':<26}{ours:>10.3f}{median(durable):>10.3f}"
          f"{ours / median(durable):>8.2f}  (fetchml is durable; rsync alone is not)")
    print(f"start-up floor: python -c pass {floor[0]:.3f} s, fetchml --version {floor[1]:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big-mib", type=int, default=512)
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        sys.exit("rsync is not installed; install it to run this benchmark")
    with throwaway_root("fml-bench-") as root:
        tree = root / "proj"
        tree_bytes = build_tree(tree, args.files, args.big_mib)
        first = Case("(a) first sync", "<= 1.5x")
        durable: list[float] = []
        fresh_first_syncs(root, tree, args.runs, first, durable)
        noop = Case("(b) no-op sync", "<= 1.0x")
        changed = Case("(c) one file changed", "<= 1.0x")
        moved = Case("(d) same tree, new dir", "0 B sent")
        dest = root / "dest"
        with running_daemon(root / "state") as daemon:
            fetchml_sync(daemon, tree)
            rsync(tree, dest)

            def copy(run: int) -> None:
                copy_tree(tree, root / f"copy{run}")

            # The quick cases get more runs: their medians are the noisiest.
            quick_runs = max(args.runs, 5)
            repeated(quick_runs, noop, lambda run: None,
                     lambda run: fetchml_sync(daemon, tree), lambda run: rsync(tree, dest))
            repeated(quick_runs, changed, lambda run: change_one_file(tree, run),
                     lambda run: fetchml_sync(daemon, tree), lambda run: rsync(tree, dest))
            repeated(args.runs, moved, copy,
                     lambda run: fetchml_sync(daemon, root / f"copy{run}"),
                     lambda run: rsync(root / f"copy{run}", root / f"dest-d{run}"))
        floor = start_up_floor(max(args.runs, 5))
        report([first, noop, changed, moved], durable, root, tree_bytes, args.files, floor)


if __name__ == "__main__":
    main()
