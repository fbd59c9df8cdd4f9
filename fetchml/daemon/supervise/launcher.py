"""One long-lived process that forks a supervisor per job, and the daemon's client for it.

Starting ``python -m fetchml.daemon.supervise.supervisor`` per job costs tens of milliseconds of
interpreter start-up; forking a small interpreter that already imported everything a
supervisor needs costs about one. So the daemon starts one launcher and asks it, one JSON line
per job, for a supervisor:

    request  {"run_dir": "/abs/runs/<job>/<attempt>"}
    answer   {"ok": true, "pid": int, "create_time": float}
             {"ok": false, "error": "one sentence", "code": "bad_request" | "unavailable"}

Answers come in request order; the first line the launcher writes is
``{"ok": true, "ready": true, "pid": <launcher pid>}``. The launcher keeps one spare
supervisor forked ahead (in its own session, warmed up, waiting on a pipe for its run
directory), so a launch only hands over a path; the next spare is forked after the answer.
Supervisors never get the daemon's Ctrl-C or stop, and the launcher exits when its stdin
closes (the daemon went away) without touching one.

The launcher starts with the daemon's environment minus the daemon's own settings (every
``FETCHML_*`` variable: API keys, the cluster secret): supervisors are its forks, a job can be
their child, and a process's initial environment stays readable in ``/proc/<pid>/environ``.

This module's top level imports only what the launcher process needs: asyncio is imported
inside the client's methods, in the daemon, and would make every fork dearer.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import psutil

from fetchml.daemon.supervise.rundir import SPEC_FILE, RunDir
from fetchml.daemon.supervise.supervisor import WAKE_SIGNALS, read_to_end, run_supervisor, warm_up
from fetchml.errors import BadRequest, FetchmlError, Unavailable, error_from_wire

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger(__name__)

LAUNCHER_MODULE = "fetchml.daemon.supervise.launcher"
REQUEST_TIMEOUT = 30.0  # seconds for one answer; a fork takes milliseconds even under load
CLOSE_TIMEOUT = 5.0  # seconds for the launcher to exit after its stdin closed
WARM_UP_AFTER = 0.05  # seconds a spare waits for work before it warms up
# Where `fetchml` is importable from, so the launcher finds it whatever the daemon's cwd.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
PRIVATE_PREFIX = "FETCHML_"  # the daemon's settings and secrets: never in the launcher's env


def launcher_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the daemon's settings, plus what the launcher needs to import us."""
    env = {k: v for k, v in environ.items() if not k.startswith(PRIVATE_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
    )
    return env


@dataclass(frozen=True)
class SupervisorHandle:
    """The supervisor of one attempt: pid and create time name exactly one process."""

    pid: int
    create_time: float


# --- the launcher process --------------------------------------------------------------------


@dataclass
class _Spare:
    """A supervisor forked ahead of time, blocked reading its run directory from a pipe."""

    pid: int
    create_time: float
    pipe: int  # write end; closing it without a run directory makes the spare exit


def main() -> int:
    """``python -m fetchml.daemon.supervise.launcher``: answer fork requests until stdin closes."""
    logging.basicConfig(level=logging.INFO, format="fetchml-launcher: %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon ends us by closing stdin
    signal.signal(signal.SIGCHLD, _reap_supervisors)
    gc.freeze()  # the collector then never walks (and copies) the pages children share with us
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # A spare is forked while the daemon has nothing to ask, so a launch only hands it a path.
    spare = _fork_spare_or_none()
    try:
        _write_line(stdout, {"ok": True, "ready": True, "pid": os.getpid()})
        for line in iter(stdin.readline, b""):
            if spare is not None and not _alive(spare):
                os.close(spare.pipe)
                spare = None
            try:
                run_dir = _parse_request(line)
                spare = spare or _fork_spare()
            except FetchmlError as exc:
                _write_line(stdout, {"ok": False, "error": exc.message, "code": exc.code})
                continue
            # Answer first: once handed its path, the spare may take the CPU for milliseconds.
            _write_line(stdout, {"ok": True, "pid": spare.pid, "create_time": spare.create_time})
            _hand_over(spare, run_dir)
            spare = _fork_spare_or_none()
    except BrokenPipeError:  # the daemon is gone: so are its questions
        pass
    finally:
        if spare is not None:
            os.close(spare.pipe)  # the spare reads EOF and exits
    return 0


def _write_line(stream: Any, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


def _reap_supervisors(_signum: int, _frame: FrameType | None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _parse_request(line: bytes) -> str:
    try:
        request = json.loads(line)
        run_dir = request["run_dir"]
    except (ValueError, TypeError, KeyError):
        run_dir = None
    if not isinstance(run_dir, str) or not os.path.isabs(run_dir):
        raise BadRequest('a launch request must be {"run_dir": "/absolute/path"}')
    if not RunDir(Path(run_dir)).spec.is_file():
        raise BadRequest(f"{run_dir} has no {SPEC_FILE}; write it before launching")
    return run_dir


def _alive(spare: _Spare) -> bool:
    """Whether the spare still waits (it is our child: unreaped means alive)."""
    try:
        pid, _ = os.waitpid(spare.pid, os.WNOHANG)
    except ChildProcessError:  # already reaped
        pid = spare.pid
    return pid == 0


def _hand_over(spare: _Spare, run_dir: str) -> None:
    try:
        os.write(spare.pipe, run_dir.encode())
    except BrokenPipeError:  # died within the last microseconds: as if it crashed at start
        logger.error("supervisor %d died before it got %s", spare.pid, run_dir)
    finally:
        os.close(spare.pipe)


def _fork_spare_or_none() -> _Spare | None:
    try:
        return _fork_spare()
    except Unavailable as exc:
        logger.warning("%s", exc)
        return None


def _fork_spare() -> _Spare:
    """Fork a supervisor that waits for its run directory on a pipe."""
    read_end, write_end = os.pipe()
    # Signals stay blocked across the fork: the child must not run our SIGCHLD handler, nor die
    # of a SIGTERM before it can treat it as a cancel; and we must not reap it before reading
    # its create time.
    signal.pthread_sigmask(signal.SIG_BLOCK, WAKE_SIGNALS)
    try:
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            raise Unavailable(f"cannot fork a supervisor ({exc.strerror}); the host is short "
                              "of processes or memory") from exc
        if pid == 0:
            os.close(write_end)
            _become_supervisor(read_end)
        os.close(read_end)
        create_time = psutil.Process(pid).create_time()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WAKE_SIGNALS)
    return _Spare(pid=pid, create_time=create_time, pipe=write_end)


def _become_supervisor(run_dir_pipe: int) -> NoReturn:
    """In the forked child: leave the daemon's session and stdio, wait for work, supervise."""
    code = 1
    try:
        os.setsid()
        os.umask(0o077)  # its records and diagnostics are the daemon's; the job has its own
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the daemon's pipes: holding them would hide the launcher's death
            os.dup2(devnull, fd)
        os.close(devnull)
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        # With idle CPUs, warm up at once: it then costs the next launch nothing. On a busy
        # host, only when no work comes soon: in a burst of launches the warm-up would add its
        # own cost (it saves less than it spends) to CPUs the running jobs need.
        idle = os.getloadavg()[0] < (os.cpu_count() or 1) - 1
        if idle or not select.select([run_dir_pipe], [], [], WARM_UP_AFTER)[0]:
            warm_up()
        run_dir = read_to_end(run_dir_pipe).decode()
        if run_dir:  # else the launcher exited without work for us
            # delay=True: a supervisor with nothing to say leaves no file behind.
            diagnostics = logging.FileHandler(RunDir(Path(run_dir)).supervisor_log, delay=True)
            diagnostics.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            root.addHandler(diagnostics)
            code = run_supervisor(Path(run_dir))
        else:
            code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            logger.exception("the supervisor failed")
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(code)


# --- the daemon's client ---------------------------------------------------------------------


class SupervisorLauncher:
    """The daemon's side: starts the launcher process and asks it for supervisors.

    ``launch`` calls may overlap; they are serialised, so answers match requests. A launcher
    that died is restarted once per ``launch`` before Unavailable is raised. Should a run
    directory ever get two supervisors, the second finds it locked and exits at once, and
    supervisor.json names the one that runs the job.
    """

    def __init__(self, *, python: str | None = None, request_timeout: float = REQUEST_TIMEOUT,
                 environ: Mapping[str, str] | None = None):
        """``environ``: the environment to start the launcher with (default the daemon's);
        its ``FETCHML_*`` variables are dropped either way."""
        self._python = python or sys.executable
        self._environ = environ
        self._request_timeout = request_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def pid(self) -> int | None:
        """The launcher process's pid while one runs."""
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        """Start the launcher and wait until it is ready; Unavailable if it cannot start."""
        async with self._get_lock():
            if not self._alive():
                await self._spawn()

    async def launch(self, run_dir: Path) -> SupervisorHandle:
        """Fork a supervisor for ``run_dir`` (absolute, holding spec.json); return its handle."""
        if not Path(run_dir).is_absolute():
            raise BadRequest(f"the run directory {run_dir} must be an absolute path")
        request = json.dumps({"run_dir": str(run_dir)}).encode() + b"\n"
        async with self._get_lock():
            last_error: Exception | None = None
            for _ in range(2):  # the launcher may have died since the last request: once more
                try:
                    if not self._alive():
                        await self._spawn()
                    answer = await self._ask(request)
                except (OSError, EOFError, TimeoutError, ValueError) as exc:
                    last_error = exc
                    logger.warning("the supervisor launcher failed (%s); restarting it", exc)
                    await self._discard()
                    continue
                return _handle_from_answer(answer)
        raise Unavailable(
            "the supervisor launcher keeps failing; check the daemon's log for its errors"
        ) from last_error

    async def close(self) -> None:
        """Stop the launcher (closing its stdin); supervisors and their jobs keep running."""
        async with self._get_lock():
            await self._discard()

    def _get_lock(self) -> asyncio.Lock:
        import asyncio  # here: the launcher process imports this module without asyncio

        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def _spawn(self) -> None:
        import asyncio  # here: the launcher process imports this module without asyncio

        env = launcher_environment(os.environ if self._environ is None else self._environ)
        try:
            self._process = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                LAUNCHER_MODULE,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                cwd="/",  # pins no directory: supervisors inherit it
                start_new_session=True,  # a Ctrl-C in the daemon's terminal does not reach it
            )
            ready = await self._read_answer()
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            await self._discard()
            raise Unavailable(
                f"the supervisor launcher cannot start ({exc}); check that {self._python} "
                "can import fetchml and psutil"
            ) from exc
        if not ready.get("ready"):
            await self._discard()
            raise Unavailable("the supervisor launcher answered nonsense; check the daemon's log")
        logger.info("supervisor launcher started (pid %d)", self.pid)

    async def _ask(self, request: bytes) -> dict[str, Any]:
        assert self._process is not None
        assert self._process.stdin is not None
        self._process.stdin.write(request)
        await self._process.stdin.drain()
        return await self._read_answer()

    async def _read_answer(self) -> dict[str, Any]:
        import asyncio  # here: the launcher process imports this module without asyncio

        assert self._process is not None
        assert self._process.stdout is not None
        async with asyncio.timeout(self._request_timeout):
            line = await self._process.stdout.readline()
        if not line:
            raise EOFError("the launcher closed its output")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError(f"unexpected launcher answer {line!r}")
        return answer

    async def _discard(self) -> None:
        import asyncio  # here: the launcher process imports this module without asyncio

        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
            with contextlib.suppress(OSError):
                await process.stdin.wait_closed()
        try:
            await asyncio.wait_for(process.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()  # the launcher only; supervisors live in their own sessions
            await process.wait()


def _handle_from_answer(answer: dict[str, Any]) -> SupervisorHandle:
    if answer.get("ok") is True:
        pid, create_time = answer.get("pid"), answer.get("create_time")
        if isinstance(pid, int) and isinstance(create_time, int | float):
            return SupervisorHandle(pid=pid, create_time=float(create_time))
        raise Unavailable("the supervisor launcher answered without a pid; check the daemon's log")
    message = str(answer.get("error") or "the supervisor launcher refused the job")
    raise error_from_wire(str(answer.get("code", "internal")), message, None)


if __name__ == "__main__":
    sys.exit(main())
