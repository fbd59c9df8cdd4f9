"""Per-job limits as the supervisor enforces them while the job runs.

Memory and processes are enforced by the kernel when the job sits in a cgroup of its own (the
supervisor reads the cgroup's event counters to learn that a limit was hit and stops the job),
else by resource limits set before exec. Log and output sizes are measured by the supervisor
itself, every few hundred milliseconds, so a fast writer may overshoot by what it writes in
that time.

The standard library and psutil only: the supervisor imports this, and every import makes
its fork dearer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from fetchml.daemon.supervise.records import RunSpec

logger = logging.getLogger(__name__)

LIMIT_CHECK_INTERVAL = 0.25  # seconds between two looks at the cgroup counters and the log
# Measuring outputs walks a tree: wait at least this long between walks, and at least this
# many times what the last walk took, so measuring never costs more than a few % of a CPU.
OUTPUT_CHECK_MIN_INTERVAL = 0.5
OUTPUT_CHECK_COST_FACTOR = 20
LOG_TAIL_BYTES = 4096  # how much of the log's end is read to see why a job failed
CGROUP_REMOVE_TRIES = 20  # rmdir fails (EBUSY) for a moment after the last process is reaped
CGROUP_REMOVE_WAIT = 0.01  # seconds between two tries
# What programs print when an allocation fails under RLIMIT_AS.
OUT_OF_MEMORY = re.compile(
    rb"MemoryError|Cannot allocate memory|std::bad_alloc|[Oo]ut of memory|memory exhausted"
)
_UNITS = ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K"))


def format_size(size: int) -> str:
    """A byte count the way --memory takes it: 200M, 1.5G, 97.66K, 100B."""
    for unit, suffix in _UNITS:
        if size >= unit:
            value = size / unit
            text = f"{value:.0f}" if size % unit == 0 else f"{value:.2f}".rstrip("0")
            return f"{text.rstrip('.')}{suffix}"
    return f"{size}B"


@dataclass(frozen=True)
class Breach:
    """A limit the job went over: which one, the message for its status, how to stop it."""

    limit: str  # one of processes.LIMITS
    message: str
    kill_now: bool  # SIGKILL at once: a job out of memory or processes cannot clean up


def join_cgroups(paths: tuple[str, ...]) -> None:
    """Move the calling process into each cgroup directory (in the child, before exec)."""
    for path in paths:
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # "0" names the writing process itself
        finally:
            os.close(fd)


def remove_cgroups(paths: tuple[str, ...]) -> None:
    """Remove the job's cgroup directories once its processes are gone."""
    for path in paths:
        for _ in range(CGROUP_REMOVE_TRIES):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    logger.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                    break
                time.sleep(CGROUP_REMOVE_WAIT)
        else:
            logger.warning("cgroup %s still busy; leaving it for the daemon to remove", path)


def cgroup_counter(path: str, file: str, key: str) -> int:
    """A "key value" line of a cgroup event file (memory.events, pids.events...); 0 if none."""
    try:
        with open(os.path.join(path, file), encoding="ascii") as events:
            for line in events:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return 0


def cgroup_breach(spec: RunSpec) -> Breach | None:
    """The memory or process limit the job's cgroups say it hit, if any."""
    for path in spec.cgroups:
        if spec.memory_limit is not None and (
            cgroup_counter(path, "memory.events", "oom_kill")  # cgroup v2
            or cgroup_counter(path, "memory.oom_control", "oom_kill")  # cgroup v1
        ):
            return Breach("memory", f"memory limit {format_size(spec.memory_limit)} exceeded",
                          True)
        if spec.max_processes is not None and cgroup_counter(path, "pids.events", "max"):
            return Breach("processes", f"process limit {spec.max_processes} reached", True)
    return None


def log_breach(spec: RunSpec, log_size: int) -> Breach | None:
    if spec.max_log_bytes is not None and log_size > spec.max_log_bytes:
        return Breach("log", f"log limit {format_size(spec.max_log_bytes)} exceeded", False)
    return None


def tree_size(root: Path, stop_above: int) -> int:
    """Bytes of the regular files under ``root`` (hard links once, symlinks not followed);
    the walk stops as soon as the sum passes ``stop_above``."""
    total = 0
    seen: set[tuple[int, int]] = set()
    pending = [str(root)]
    while pending and total <= stop_above:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue  # removed or made unreadable meanwhile: not ours to count
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if st.st_nlink > 1:
                            if (st.st_dev, st.st_ino) in seen:
                                continue
                            seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
                except OSError:
                    continue
    return total


class OutputMeter:
    """Measures the outputs directory now and then, never spending much time on it."""

    def __init__(self, spec: RunSpec) -> None:
        self.limit = spec.max_output_bytes
        self.root = Path(spec.output_dir) if spec.output_dir else None
        self.next_check = 0.0  # monotonic

    def due(self, now: float) -> bool:
        return self.limit is not None and now >= self.next_check

    def breach(self, now: float) -> Breach | None:
        if self.limit is None or self.root is None:
            return None
        started = time.monotonic()
        size = tree_size(self.root, self.limit)
        took = time.monotonic() - started
        self.next_check = now + max(OUTPUT_CHECK_MIN_INTERVAL, took * OUTPUT_CHECK_COST_FACTOR)
        if size > self.limit:
            return Breach("output", f"output limit {format_size(self.limit)} exceeded", False)
        return None


def ran_out_of_address_space(spec: RunSpec, log_path: Path) -> Breach | None:
    """Under RLIMIT_AS (no memory cgroup) a failed allocation shows only in what the job
    printed: the end of its log names it when the job failed for want of memory."""
    if spec.memory_limit is None or "RLIMIT_AS" not in spec.rlimits:
        return None
    with contextlib.suppress(OSError), open(log_path, "rb") as log:
        log.seek(max(0, os.fstat(log.fileno()).st_size - LOG_TAIL_BYTES))
        if OUT_OF_MEMORY.search(log.read()):
            return Breach("memory", f"memory limit {format_size(spec.memory_limit)} exceeded "
                          "(address-space limit)", False)
    return None


class LimitWatch:
    """The supervisor's looks at a running job's limits."""

    def __init__(self, spec: RunSpec, log_fd: int, log_path: Path) -> None:
        self.spec, self.log_fd, self.log_path = spec, log_fd, log_path
        self.outputs = OutputMeter(spec)
        self.active = bool(spec.cgroups or spec.max_log_bytes or spec.max_output_bytes)

    def check(self, now: float) -> Breach | None:
        """The limit the job is over now, if any (called every LIMIT_CHECK_INTERVAL)."""
        breach = cgroup_breach(self.spec) or log_breach(self.spec, self._log_size())
        if breach is None and self.outputs.due(now):
            breach = self.outputs.breach(now)
        return breach

    def check_ended(self, wait_status: int) -> Breach | None:
        """After the job ended on its own: the kernel may have killed it for memory, or it
        wrote its last bytes after the last look; a failed or oversized run still says so."""
        failed = not os.WIFEXITED(wait_status) or os.WEXITSTATUS(wait_status) != 0
        breach = None
        if failed:
            breach = cgroup_breach(self.spec) or ran_out_of_address_space(self.spec,
                                                                          self.log_path)
        if breach is None:
            breach = log_breach(self.spec, self._log_size())
        if breach is None and self.spec.max_output_bytes is not None:
            breach = self.outputs.breach(time.monotonic())
        return breach

    def _log_size(self) -> int:
        return os.fstat(self.log_fd).st_size


def sandbox_wrappers(job_pid: int, descendants: list[psutil.Process], depth: int) -> set[int]:
    """The sandbox's own processes among the supervisor's descendants: the job's pid and the
    ``depth - 1`` levels below it (bwrap and its pid 1), which SIGTERM must spare."""
    parents: dict[int, int] = {}
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            parents[process.pid] = process.ppid()
    level = {job_pid}
    wrappers = set(level)
    for _ in range(depth - 1):
        level = {pid for pid, parent in parents.items() if parent in level}
        wrappers |= level
    return wrappers
