"""Processes named by pid *and* create time, so that a reused pid never passes for a job or a
supervisor that is gone: checking, waiting for and signalling them, and killing the job of a
supervisor that vanished. The daemon's side: the supervisor and the launcher never import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING, Protocol

import psutil

from fetchml.errors import BadRequest

if TYPE_CHECKING:
    from fetchml.daemon.supervise.records import SupervisorInfo

logger = logging.getLogger(__name__)

# psutil adds the boot time, read in whole seconds from /proc/stat, to a process's start tick;
# that boot time moves by a second when the wall clock is stepped or slewed across a second,
# so two readings of one process may differ by 1 s. No pid is reused within 1.5 s anyway.
CREATE_TIME_TOLERANCE = 1.5
EXIT_POLL_INTERVAL = 0.05  # seconds between two looks where pidfd_open is unavailable


class ProcessRef(Protocol):
    """Anything naming one exact process: a launcher's handle, a SupervisorInfo."""

    @property
    def pid(self) -> int: ...

    @property
    def create_time(self) -> float: ...


def process_matches(pid: int, create_time: float) -> bool:
    """Whether that exact process (not a later one with its pid) is alive; zombies are not."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            started = process.create_time()
            zombie = process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
    return not zombie and abs(started - create_time) < CREATE_TIME_TOLERANCE


async def wait_process_exit(pid: int, create_time: float) -> None:
    """Return once that exact process is gone; it need not be a child of this process."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (old kernel, seccomp): poll
        while True:
            if not process_matches(pid, create_time):
                return
            await asyncio.sleep(EXIT_POLL_INTERVAL)
    try:
        # Checked after opening: the fd pins this process, so a match cannot go stale.
        if not process_matches(pid, create_time):
            return
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(pidfd, _resolve, gone)
        try:
            await gone
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def signal_supervisor(target: ProcessRef | int, create_time: float | None, sig: int) -> bool:
    """Send ``sig`` to that exact process; return False (and do nothing) if it is gone."""
    if isinstance(target, int):
        if create_time is None:
            raise BadRequest("signalling a bare pid needs its create time; pass the handle")
        pid = target
    else:
        pid, create_time = target.pid, target.create_time
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd: a small window for pid reuse remains
        if not process_matches(pid, create_time):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
        return False
    try:
        if not process_matches(pid, create_time):
            return False
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
    return True


def kill_orphaned_job(info: SupervisorInfo) -> bool:
    """SIGKILL the job's process group after its supervisor vanished without a status.

    Returns whether a living process was killed. Does nothing while the supervisor itself is
    alive: it ends the job and writes the status itself.
    """
    if process_matches(info.pid, info.create_time):
        return False
    # The job leads its group (job_pgid == job_pid). A zombie leader still holds the number;
    # a different process with that pid means the group is gone, since Linux does not hand
    # out a number still used as a group id.
    leader_started = _create_time_of(info.job_pgid)
    if leader_started is not None and abs(leader_started - info.job_create_time) >= (
        CREATE_TIME_TOLERANCE
    ):
        return False
    if not _group_has_living_members(info.job_pgid):
        return False
    try:
        os.killpg(info.job_pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        logger.warning("cannot kill process group %d: %s", info.job_pgid, exc.strerror)
        return False
    logger.info("killed process group %d of an orphaned job", info.job_pgid)
    return True


def _create_time_of(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _group_has_living_members(pgid: int) -> bool:
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
