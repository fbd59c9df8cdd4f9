"""The per-job supervisor: runs one attempt of one job and records how it ended.

It lives in its own session, outside the daemon, so a daemon restart or crash never touches a
running job. It spawns the job in a session of its own, samples the log size into
``output.idx`` and the tree's memory and CPU, turns SIGTERM (cancel) and the timeout into
TERM-grace-KILL of the whole process tree, and writes ``status.json`` last, once no process of
the job is left. It stops a job that goes over one of its limits (``limits.py``) and says
which one in the status. Being a child subreaper, it also adopts descendants that escape with
setsid or a double fork, so it can find them, kill them and reap them.

Only the standard library and psutil: the launcher forks one supervisor per job from a small
interpreter, and every module imported here makes each fork dearer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil

from fetchml.daemon.supervise.job_limits import (
    LIMIT_CHECK_INTERVAL,
    Breach,
    LimitWatch,
    remove_cgroups,
    sandbox_wrappers,
)
from fetchml.daemon.supervise.records import RunSpec, RunStatus, SupervisorInfo, write_json_atomic
from fetchml.daemon.supervise.rundir import SPEC_FILE, SUPERVISOR_FILE, RunDir, index_of
from fetchml.daemon.supervise.spawn import SpawnFailure, exec_failure, find_executable, spawn_job
from fetchml.daemon.supervise.spawn import read_to_end as read_to_end  # the launcher's too
from fetchml.errors import BadRequest

logger = logging.getLogger(__name__)

INDEX_INTERVAL = 0.25  # seconds between two looks at the log size for output.idx
TREE_SAMPLE_INTERVAL = 0.5  # seconds between two psutil walks of the tree (RSS, CPU)
# The first walk comes sooner, and the gap doubles up to the interval: a job that allocates and
# exits within a second is still measured, while trivial jobs end before any walk.
FIRST_TREE_SAMPLE = 0.05
KILL_RETRY_INTERVAL = 0.1  # after SIGKILL, send it again this often: a fork may race the kill
KILL_WAIT_LIMIT = 5.0  # seconds to wait for SIGKILLed processes (D state) before giving up
EXIT_ALREADY_SUPERVISED = 3  # supervisor exit code: another supervisor holds this run directory
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>
# Set aside for status.json when the supervisor starts: a job that fills the disk must still
# be recorded as ended, not lost (a status is a few hundred bytes; blocks are up to 64 KiB).
STATUS_RESERVE_BYTES = 64 * 1024
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

CANCEL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
WAKE_SIGNALS = CANCEL_SIGNALS | {signal.SIGCHLD}


def run_supervisor(run_dir: Path) -> int:
    """Run the attempt described by ``run_dir/spec.json``; return this process's exit code.

    0 once status.json is written (whatever the job did), EXIT_ALREADY_SUPERVISED when another
    supervisor holds the run directory, 1 when not even status.json could be written.
    """
    run_dir = Path(os.path.abspath(run_dir))  # the supervisor changes directory to spawn
    _take_signals()
    _become_subreaper()
    started_at = time.time()
    try:
        spec_fd = os.open(RunDir(run_dir).spec, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        logger.error("cannot open %s: %s", RunDir(run_dir).spec, exc.strerror)
        return 1
    if not _lock(spec_fd):
        logger.error("%s is already run by another supervisor", run_dir)
        return EXIT_ALREADY_SUPERVISED
    # spec_fd stays open (and locked) until this process exits.
    _reserve_status_space(run_dir)
    try:
        spec = RunSpec.from_dict(json.loads(read_to_end(spec_fd)))
    except (BadRequest, ValueError, OSError) as exc:
        message = f"{SPEC_FILE} cannot be used: {exc}"
        return _finish(run_dir, _failed_status(message, None, started_at))
    try:
        log_fd = _open_append(run_dir / spec.log)
    except OSError as exc:
        message = f"the log {run_dir / spec.log} cannot be opened ({exc.strerror})"
        return _finish(run_dir, _failed_status(message, None, started_at))
    if CANCEL_SIGNALS & signal.sigpending():  # cancelled before it started: never start it
        return _finish(run_dir, _unstarted_status("cancelled", None, None, started_at))
    spawned = spawn_job(spec, log_fd)
    # Linux starts a child's maxrss at its parent's peak RSS (the image it had before exec),
    # so a child maxrss up to our peak (measured after the exec) says nothing about the job.
    inherited_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if isinstance(spawned, SpawnFailure):
        remove_cgroups(spec.cgroups)
        return _finish(run_dir, _failed_status(spawned.error, spawned.exit_code, started_at))
    watch = _JobWatch(spec, run_dir, log_fd, spawned, started_at, inherited_rss)
    try:
        write_json_atomic(RunDir(run_dir).supervisor, asdict(watch.info()))
    except OSError as exc:  # the job runs regardless; only re-adoption by a new daemon suffers
        logger.error("cannot write %s: %s", SUPERVISOR_FILE, exc)
    status = watch.run()
    remove_cgroups(spec.cgroups)  # every process of the job is reaped by now
    return _finish(run_dir, status)


def warm_up() -> None:
    """Run through what a supervisor does, without a job, in a freshly forked process.

    A fork shares memory copy-on-write, and CPython writes to every object it touches
    (reference counts), so the first pass through the code copies hundreds of pages. A
    launcher's spare does it while it waits, off the path from launch to job start: this
    takes a trivial job's supervisor from about 470 page faults to 60, and 5.5 ms of CPU to 2.7.
    """
    _take_signals()
    _become_subreaper()
    spec = RunSpec.from_dict(json.loads(json.dumps({"argv": ["true"], "env": {}, "cwd": "/"})))
    with contextlib.suppress(OSError):
        find_executable(spec.argv[0], {"PATH": "/nonexistent"})
    watch = _JobWatch(spec, Path(os.path.abspath("/")), -1, os.getpid(), 0.0, 0)
    json.dumps(asdict(watch.info()))
    # Not watch._sample_tree(): psutil finds children by reading every process's stat file,
    # milliseconds on a busy host, and trivial jobs end before their first sample anyway.
    status = _failed_status(exec_failure(spec.argv[0], errno.ENOENT, "").error, None, 0.0)
    json.dumps(status.to_dict())


def _reserve_status_space(run_dir: Path) -> None:
    """Write (not allocate: some filesystems would not keep it) the space status.json needs."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(RunDir(run_dir).status_reserve, flags, 0o600)
        try:
            os.write(fd, b"\n" * STATUS_RESERVE_BYTES)
        finally:
            os.close(fd)
    except OSError as exc:
        logger.warning("cannot set space aside for %s: %s", RunDir(run_dir).status, exc.strerror)


def _finish(run_dir: Path, status: RunStatus) -> int:
    paths = RunDir(run_dir)
    try:
        write_json_atomic(paths.status, status.to_dict())
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS or not _finish_in_reserve(paths, status):
            logger.error("cannot write %s: %s", paths.status, exc)
            return 1
    with contextlib.suppress(OSError):
        os.unlink(paths.status_reserve)
    return 0


def _finish_in_reserve(paths: RunDir, status: RunStatus) -> bool:
    """Write status.json into the space set aside for it, the disk being full; the status
    then says so. Overwriting blocks a file already has needs no free space."""
    note = "the disk was full when the job ended"
    status = replace(status, error=f"{status.error}; {note}" if status.error else note)
    data = json.dumps(status.to_dict()).encode()
    with contextlib.suppress(OSError):
        os.unlink(paths.path / f".{paths.status.name}.tmp")  # write_json_atomic's, unwritten
    try:
        fd = os.open(paths.status_reserve, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size < len(data):
                return False
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        os.replace(paths.status_reserve, paths.status)
    except OSError as exc:
        logger.error("cannot write %s even into the space set aside: %s", paths.status, exc)
        return False
    logger.warning("wrote %s into the space set aside: the disk is full", paths.status)
    return True


def _failed_status(error: str, exit_code: int | None, started_at: float) -> RunStatus:
    return _unstarted_status("spawn_failed", error, exit_code, started_at)


def _unstarted_status(
    reason: str, error: str | None, exit_code: int | None, started_at: float
) -> RunStatus:
    return RunStatus(
        exit_code=exit_code,
        signal=None,
        reason=reason,
        error=error,
        started_at=started_at,
        finished_at=time.time(),
        peak_rss=0,
        cpu_time=0.0,
    )


def _take_signals() -> None:
    """Receive SIGCHLD, SIGTERM and SIGINT through sigtimedwait only, never asynchronously."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WAKE_SIGNALS)
    for sig in WAKE_SIGNALS:  # drop what the launcher installed (a reaper, SIG_IGN)
        signal.signal(sig, signal.SIG_DFL)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        # Without it escaped descendants go to init: still killed through the process group.
        logger.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_append(path: Path) -> int:
    """The log and its index: the daemon's to read (the job writes the log through its fd)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o600)


class _JobWatch:
    """Waits for the job and its whole tree, enforcing timeout, cancel and clean-up."""

    def __init__(self, spec: RunSpec, run_dir: Path, log_fd: int, job_pid: int,
                 started_at: float, inherited_rss: int) -> None:
        self.spec = spec
        self.inherited_rss = inherited_rss  # KiB, as ru_maxrss
        self.log_fd = log_fd
        self.index_path = index_of(run_dir / spec.log)
        self.index_fd: int | None = None
        self.indexed_size = 0
        self.job_pid = job_pid
        self.me = psutil.Process()
        self.started_at = started_at
        self.reason = "exited"
        self.error: str | None = None
        self.limit: str | None = None
        self.limits = LimitWatch(spec, log_fd, run_dir / spec.log)
        self.job_wait_status: int | None = None
        self.job_finished_at: float | None = None
        self.peak_rss = 0
        self.cpu_time = 0.0

    def info(self) -> SupervisorInfo:
        # The job is unreaped until run() waits for it, so its /proc entry still exists.
        return SupervisorInfo(
            pid=self.me.pid,
            create_time=self.me.create_time(),
            job_pid=self.job_pid,
            job_pgid=self.job_pid,  # the job called setsid(): it leads its own group
            job_create_time=psutil.Process(self.job_pid).create_time(),
            started_at=self.started_at,
        )

    def run(self) -> RunStatus:
        now = time.monotonic()
        deadline = now + self.spec.timeout if self.spec.timeout is not None else math.inf
        next_index = now + INDEX_INTERVAL
        sample_gap = FIRST_TREE_SAMPLE
        next_sample = now + sample_gap
        kill_at = math.inf  # finite once the tree is being terminated: when SIGKILL goes out
        give_up_at = math.inf
        next_limit_check = now + LIMIT_CHECK_INTERVAL if self.limits.active else math.inf
        while True:
            children_left = self._reap()
            if self.job_wait_status is not None and not children_left:
                break
            now = time.monotonic()
            if kill_at == math.inf and self.job_wait_status is not None:
                kill_at = self._terminate(now)  # leftovers would hold GPUs: the job is over
            elif kill_at == math.inf and now >= deadline:
                self.reason = "timeout"
                kill_at = self._terminate(now)
            elif kill_at == math.inf and now >= next_limit_check:
                breach = self.limits.check(now)
                if breach is not None:
                    self._record_breach(breach)
                    kill_at = now if breach.kill_now else self._terminate(now)
                next_limit_check = now + LIMIT_CHECK_INTERVAL
            if now >= kill_at:
                self._signal_tree(signal.SIGKILL)
                give_up_at = min(give_up_at, now + KILL_WAIT_LIMIT)
                kill_at = now + KILL_RETRY_INTERVAL
            if now >= give_up_at:
                self.error = "some processes of the job did not die after SIGKILL"
                logger.error("%s; leaving them to init", self.error)
                break
            if now >= next_index:
                self._index()
                next_index = now + INDEX_INTERVAL
            if self.job_wait_status is not None:
                next_sample = math.inf
            elif now >= next_sample:
                self._sample_tree()
                sample_gap = min(sample_gap * 2, TREE_SAMPLE_INTERVAL)
                next_sample = now + sample_gap
            if kill_at < math.inf:
                next_limit_check = math.inf
            wake = min(next_index, next_sample, kill_at, give_up_at, deadline, next_limit_check)
            info = signal.sigtimedwait(WAKE_SIGNALS, max(0.0, wake - time.monotonic()))
            if info is None or info.si_signo not in CANCEL_SIGNALS or kill_at < math.inf:
                continue
            self._reap()  # a job that ended on its own just before the cancel stays "exited"
            if self.job_wait_status is None:
                self.reason = "cancelled"
                kill_at = self._terminate(time.monotonic())
        return self._status()

    def _record_breach(self, breach: Breach) -> None:
        logger.info("stopping the job: %s", breach.message)
        self.reason, self.limit, self.error = "limit", breach.limit, breach.message

    def _reap(self) -> bool:
        """Reap every exited child; return whether any child is still alive."""
        while True:
            try:
                pid, wait_status, _ = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.job_pid:
                self.job_wait_status = wait_status
                self.job_finished_at = time.time()

    def _terminate(self, now: float) -> float:
        """Send SIGTERM (and SIGCONT, for stopped ones) to the tree; return the grace's end."""
        self._signal_tree(signal.SIGTERM, signal.SIGCONT)
        return now + self.spec.kill_grace

    def _signal_tree(self, *signals: int) -> None:
        spare_wrappers = signal.SIGKILL not in signals and self.spec.wrapper_depth > 0
        for sig in signals:
            if self.job_wait_status is None and not spare_wrappers:
                # Unreaped, the job's pid (= its group id) cannot have been reused.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.job_pid, sig)
        try:
            descendants = self.me.children(recursive=True)
        except psutil.Error:
            descendants = []
        wrappers = (sandbox_wrappers(self.job_pid, descendants, self.spec.wrapper_depth)
                    if spare_wrappers else set())
        for process in descendants:  # escaped ones too: they were reparented to us
            if process.pid in wrappers:
                continue
            for sig in signals:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(sig)


    def _index(self) -> None:
        """Append "<epoch> <log size>" to output.idx when the log grew since the last line."""
        size = os.fstat(self.log_fd).st_size
        if size == self.indexed_size:
            return
        self.indexed_size = size
        try:
            if self.index_fd is None:
                self.index_fd = _open_append(self.index_path)
            os.write(self.index_fd, f"{time.time():.3f} {size}\n".encode())
        except OSError as exc:
            logger.warning("cannot append to %s: %s", self.index_path, exc.strerror)

    def _sample_tree(self) -> None:
        rss = 0
        cpu = 0.0
        try:
            tree = self.me.children(recursive=True)
        except psutil.Error:
            tree = []
        for process in tree:
            try:
                with process.oneshot():
                    rss += _proportional_rss(process)
                    times = process.cpu_times()
            except psutil.Error:
                continue  # exited meanwhile: its times now count in the reaper's children
            cpu += times.user + times.system + times.children_user + times.children_system
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += reaped.ru_utime + reaped.ru_stime
        self.peak_rss = max(self.peak_rss, rss)
        self.cpu_time = max(self.cpu_time, cpu)

    def _status(self) -> RunStatus:
        self._index()
        if self.reason == "exited" and self.job_wait_status is not None:
            # It may have hit a limit and ended before the next look: the status says so.
            breach = self.limits.check_ended(self.job_wait_status)
            if breach is not None:
                self._record_breach(breach)
        # Every descendant is reaped by now (by us or a reaped ancestor), so the children's
        # rusage covers the whole tree. ru_maxrss is the largest single process, in KiB.
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        largest = reaped.ru_maxrss if reaped.ru_maxrss > self.inherited_rss else 0
        exit_code: int | None = None
        sig: int | None = None
        if self.job_wait_status is not None:
            if os.WIFSIGNALED(self.job_wait_status):
                sig = os.WTERMSIG(self.job_wait_status)
            else:
                exit_code = os.WEXITSTATUS(self.job_wait_status)
        return RunStatus(
            exit_code=exit_code,
            signal=sig,
            reason=self.reason,
            error=self.error,
            started_at=self.started_at,
            finished_at=self.job_finished_at or time.time(),
            peak_rss=max(self.peak_rss, largest * 1024),
            cpu_time=round(max(self.cpu_time, reaped.ru_utime + reaped.ru_stime), 6),
            limit=self.limit,
        )


def _proportional_rss(process: psutil.Process) -> int:
    """The process's share of resident memory (PSS): pages it shares with others (a forked
    data loader's copy-on-write heap, shared libraries) count once across the tree, as the
    kernel charges them, not once per process as RSS would. RSS where PSS cannot be read."""
    try:
        return int(process.memory_full_info().pss)
    except (psutil.AccessDenied, AttributeError):
        return int(process.memory_info().rss)


def main(argv: list[str] | None = None) -> int:
    """``python -m fetchml.daemon.supervise.supervisor RUN_DIR``: run one attempt, foreground."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m fetchml.daemon.supervise.supervisor RUN_DIR\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="supervisor: %(levelname)s %(message)s")
    return run_supervisor(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
