"""Starting a job's command for the supervisor: a session of its own, default signals, its
cgroups and resource limits, its user, stdio on the log; or one sentence saying why it did not
start.

A spec with a uid (a root daemon's job of anyone but local root) drops to that uid, its gid
and groups in the child, after joining its cgroups and setting its limits (which need the
supervisor's privileges) and before exec: nothing the job runs keeps any of root's powers.

The standard library only (and the limits module): the launcher forks supervisors from a
small interpreter, and every module imported here makes each fork dearer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from fetchml.daemon.supervise.job_limits import join_cgroups
from fetchml.daemon.supervise.records import RunSpec

EXIT_NOT_EXECUTABLE = 126  # the shell's code for "found but cannot be executed"
EXIT_COMMAND_NOT_FOUND = 127  # the shell's code for "command not found"
# Dispositions the job must start with: Python ignores SIGPIPE and SIGXFSZ, the launcher ignores
# SIGINT, and ignored signals stay ignored across exec.
JOB_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                       signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)


@dataclass(frozen=True)
class SpawnFailure:
    """Why the job's command never ran, and the exit code a shell would have given."""

    error: str
    exit_code: int | None


def read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def spawn_job(spec: RunSpec, log_fd: int) -> int | SpawnFailure:
    """Start the job in a session of its own; return its pid, or why it did not start.

    cwd, umask and CPU affinity are set on this process around the spawn and inherited, so
    the common case can use posix_spawn (vfork: a quarter of a fork's cost here). Resource
    limits, cgroups and another user must be set in the child alone: they take the fork path.
    """
    if spec.cpu_affinity is not None:  # kept afterwards: the supervisor may share the job's CPUs
        try:
            os.sched_setaffinity(0, spec.cpu_affinity)
        except OSError as exc:
            return SpawnFailure(f"CPU affinity {list(spec.cpu_affinity)} cannot be applied "
                                f"({exc.strerror}); name CPUs this host has", None)
    try:
        os.chdir(spec.cwd)
    except OSError as exc:
        return SpawnFailure(f"working directory cannot be entered: {spec.cwd} "
                            f"({exc.strerror})", None)
    old_umask = os.umask(spec.umask)
    try:
        executable = find_executable(spec.argv[0], spec.env)
        if spec.rlimits or spec.cgroups or spec.uid is not None:
            return _fork_exec(spec, executable, log_fd)
        return os.posix_spawn(
            executable,
            list(spec.argv),
            spec.env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
            setsigmask=(),
            setsigdef=JOB_DEFAULT_SIGNALS,
        )
    except OSError as exc:
        return exec_failure(spec.argv[0], exc.errno or 0, exc.strerror or str(exc))
    finally:
        os.umask(old_umask)
        os.chdir("/")


def find_executable(command: str, env: Mapping[str, str]) -> str:
    """Search the job's PATH like execvp: the first executable file, else the first file."""
    if "/" in command:
        return command
    found: str | None = None
    for directory in os.get_exec_path(dict(env)):
        candidate = os.path.join(directory, command)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            found = found or candidate
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)
    return found  # exec fails with EACCES, as a shell would report


def _fork_exec(spec: RunSpec, executable: str, log_fd: int) -> int | SpawnFailure:
    report_r, report_w = os.pipe()  # close-on-exec: EOF without data means exec succeeded
    try:
        pid = os.fork()
    except OSError:
        os.close(report_r)
        os.close(report_w)
        raise
    if pid == 0:
        os.close(report_r)
        _exec_limited(spec, executable, log_fd, report_w)
    os.close(report_w)
    report = read_to_end(report_r)
    os.close(report_r)
    if not report:
        return pid
    os.waitpid(pid, 0)
    stage, code_text, detail = [*report.decode(errors="replace").split("\0", 2), "", ""][:3]
    code = int(code_text) if code_text.isdigit() else 0
    if stage == "cgroup":
        return SpawnFailure(f"the job's cgroup cannot be joined ({detail}); check that the "
                            "daemon's cgroup is delegated to it", None)
    if stage == "rlimit":
        return SpawnFailure(f"resource limits cannot be applied ({detail}); keep them within "
                            "the daemon's own hard limits", None)
    if stage == "user":
        return SpawnFailure(f"the job cannot switch to uid {spec.uid} ({detail}); the daemon "
                            "must run as root with CAP_SETUID and CAP_SETGID to run jobs as "
                            "their owners", None)
    return exec_failure(spec.argv[0], code, os.strerror(code) if code else detail)


def _exec_limited(spec: RunSpec, executable: str, log_fd: int, report_fd: int) -> NoReturn:
    """In the forked child: new session, default signals, limits, stdio, exec; or report."""
    stage = "setup"
    try:
        os.setsid()
        for sig in JOB_DEFAULT_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        stage = "cgroup"
        join_cgroups(spec.cgroups)  # before anything else runs: its children inherit it
        stage = "rlimit"
        for limit, soft, hard in spec.resource_limits():
            resource.setrlimit(limit, (soft, hard))
        if spec.uid is not None and spec.gid is not None:
            stage = "user"
            drop_privileges(spec.uid, spec.gid, spec.groups)
            stage = "exec"
            # The job's PATH searched as the job's user: a directory it may not enter (root's
            # own interpreters under /root) is passed over, as its own shell would.
            executable = find_executable(spec.argv[0], spec.env)
        stage = "exec"
        stdin_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.execve(executable, list(spec.argv), spec.env)  # noqa: S606 -- argv, never a shell
    except BaseException as exc:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
        with contextlib.suppress(OSError):
            os.write(report_fd, f"{stage}\0{code}\0{exc}".encode(errors="replace"))
    os._exit(EXIT_COMMAND_NOT_FOUND)


def drop_privileges(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Become ``uid`` with ``gid`` and exactly ``groups``, for good (real, effective and saved
    ids): groups first, while still allowed to set them. Checked: no way back to root."""
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0 and (os.geteuid() == 0 or os.getuid() == 0):
        raise PermissionError(errno.EPERM, "the process kept root's ids")


def exec_failure(command: str, code: int, reason: str) -> SpawnFailure:
    if code in (errno.EAGAIN, errno.ENOMEM):
        return SpawnFailure(f"the job could not be started ({reason}); the host is short of "
                            "processes or memory", None)
    if code in (errno.ENOENT, errno.ENOTDIR):
        where = "" if "/" in command else " (searched the PATH of the job's environment)"
        return SpawnFailure(f"command not found: {command}{where}", EXIT_COMMAND_NOT_FOUND)
    return SpawnFailure(f"command cannot be executed: {command} ({reason})", EXIT_NOT_EXECUTABLE)
