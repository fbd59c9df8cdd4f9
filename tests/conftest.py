"""Shared test helpers: daemons on short temporary sockets, in this process or in their own.

``daemon`` serves the daemon's app from a thread of the test process (``InProcessDaemon``): no
interpreter to start, and its jobs still run under the real launcher and supervisor processes.
``daemon_process`` (and ``make_daemon``) is a real ``fetchml daemon`` subprocess, for tests of
what only a process shows: a crash, kill -9, restart, signals, its exit status, its stderr and
log lines, systemd notify, its environment or memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fetchml.client.local_daemon import LocalDaemon, clean_env

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
# Daemon and job plumbing that must not reach in-process daemons from the test's environment.
PROCESS_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def _normalise_environment() -> None:
    """In-process daemons and their jobs see the test process's environment, as subprocess
    daemons see ``base_env()``: no FETCHML_* settings or systemd plumbing, unbuffered Python."""
    for name in [k for k in os.environ if k.startswith("FETCHML_") or k in PROCESS_ENV]:
        del os.environ[name]
    os.environ["PYTHONUNBUFFERED"] = "1"


_normalise_environment()


def base_env(**extra: str) -> dict[str, str]:
    """The environment for daemons and CLI runs in tests: no stray FETCHML_* settings,
    no GPUs unless a test asks, and an isolated HOME so user config files never leak in."""
    return clean_env(**{"FETCHML_GPUS": "", "PYTHONUNBUFFERED": "1", **extra})


class DaemonProcess(LocalDaemon):
    """A real ``fetchml daemon`` process on ``root/state``, logging to ``root/daemon.log``."""

    def __init__(self, root: Path, env: dict[str, str], args: list[str] | None = None) -> None:
        super().__init__(root / "state", env, list(args or ()), log_path=root / "daemon.log",
                         cwd=root, start_timeout=START_TIMEOUT_S)
        self.root = root

    def start(self, wait: bool = True) -> DaemonProcess:
        super().start(wait)
        return self


# The in-process daemon whose work is running: its log lines go to its own daemon.log.
_SERVING: contextvars.ContextVar[InProcessDaemon | None] = contextvars.ContextVar(
    "serving", default=None)


class _ThreadLoop(asyncio.SelectorEventLoop):
    """An event loop for a thread other than the main one: signal handlers are the process's
    (pytest's), so the daemon's are not installed; ``stop()`` ends it instead of SIGTERM."""

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
        pass

    def remove_signal_handler(self, sig: int) -> bool:
        return False


class _DaemonLog(logging.Handler):
    """The daemon's log lines, formatted as its process would write them, into daemon.log."""

    def __init__(self, daemon: InProcessDaemon, level: str) -> None:
        from fetchml.cli.daemon_cmd import JsonLogFormatter
        from fetchml.logctx import ContextFilter

        super().__init__(level.upper())
        self.daemon = daemon
        self.stream = daemon.log_path.open("a", encoding="utf-8")
        self.addFilter(ContextFilter())
        self.setFormatter(JsonLogFormatter())

    def filter(self, record: logging.LogRecord) -> bool:
        return _SERVING.get() is self.daemon and bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.stream.close()
        super().close()


class InProcessDaemon(DaemonProcess):
    """The daemon served by ``fetchml.daemon.server.serve`` on a thread of the test process,
    with its own event loop, on ``root/state``; settings from ``env`` as the process would
    read them. The same interface as ``DaemonProcess`` (CLI runs and the client connect to
    its socket); ``proc`` stays None, and what needs a process (kill, signals) is refused."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        super().__init__(root, env)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, wait: bool = True) -> InProcessDaemon:
        from fetchml.config import load_daemon_settings

        settings = load_daemon_settings(
            env=self.env, flags={"state_dir": str(self.state_dir)}).settings
        fetchml_logger = logging.getLogger("fetchml")
        level = logging.getLevelName(settings.log_level.upper())
        if fetchml_logger.getEffectiveLevel() > level:
            fetchml_logger.setLevel(level)
        handler = _DaemonLog(self, settings.log_level)
        ready = threading.Event()
        self._failure = None
        self._stop = asyncio.Event()

        def serve_here() -> None:
            from fetchml.daemon.server import serve

            _SERVING.set(self)
            logging.getLogger().addHandler(handler)
            try:
                with asyncio.Runner(loop_factory=_ThreadLoop) as runner:
                    self._loop = runner.get_loop()
                    assert self._stop is not None
                    runner.run(serve(settings, on_ready=lambda _: ready.set(), stop=self._stop))
            except BaseException as exc:  # re-raised by start() or stop() in the test
                self._failure = exc
            finally:
                logging.getLogger().removeHandler(handler)
                handler.close()
                ready.set()

        self._thread = threading.Thread(target=serve_here, name=f"daemon {self.root.name}",
                                        daemon=True)
        self._thread.start()
        if wait:
            if not ready.wait(START_TIMEOUT_S):
                raise AssertionError(f"the in-process daemon did not start:\n{self.log()}")
            if self._failure is not None:
                raise AssertionError(f"the in-process daemon failed to start:\n{self.log()}"
                                     ) from self._failure
        return self

    def wait_ready(self) -> None:
        raise AssertionError("start(wait=True) waits for an in-process daemon")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """A graceful stop, as on SIGTERM; 0 once it stopped cleanly."""
        if sig != signal.SIGTERM:
            raise AssertionError("signals need a daemon process: use daemon_process")
        assert self._thread is not None and self._loop is not None and self._stop is not None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError(f"the in-process daemon did not stop:\n{self.log()}")
        if self._failure is not None:
            raise AssertionError(f"the in-process daemon failed:\n{self.log()}"
                                 ) from self._failure
        return 0

    def kill(self) -> None:
        raise AssertionError("kill -9 needs a daemon process: use daemon_process")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fml-", dir="/tmp"))
    path.chmod(0o711)  # as /var/lib: jobs of other users pass through to their run directory
    (path / "home").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_daemon(root: Path, *args: str, **env: str) -> DaemonProcess:
    """A daemon process (not started) on ``root/state`` with these flags and settings."""
    return DaemonProcess(root, base_env(HOME=str(root / "home"), **env), list(args))


def make_inprocess_daemon(root: Path, **env: str) -> InProcessDaemon:
    """An in-process daemon (not started) on ``root/state`` with these settings."""
    return InProcessDaemon(root, base_env(HOME=str(root / "home"), **env))


def stop_if_running(daemon: DaemonProcess) -> None:
    if daemon.running:
        daemon.stop()


@pytest.fixture
def project(short_tmp: Path) -> Path:
    """A one-file project to sync and queue from."""
    root = short_tmp / "project"
    root.mkdir()
    (root / "train.py").write_text("print('training')\n")
    return root


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    """A daemon served in this process, default settings."""
    served = make_inprocess_daemon(short_tmp).start()
    yield served
    stop_if_running(served)


@pytest.fixture
def daemon_process(short_tmp: Path) -> Iterator[DaemonProcess]:
    """A real daemon process, default settings: for kill, restart, signal and log tests."""
    proc = make_daemon(short_tmp).start()
    yield proc
    stop_if_running(proc)


def free_port() -> int:
    import socket as socketlib

    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RedisServer:
    """A real redis-server on a random port, AOF on with fsync always (as deployed)."""

    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start on ``port``; with port 0, on a free port (another if a parallel test worker
        took the one probed first)."""
        if self.port != 0:
            return self._start()
        for _ in range(5):
            self.port = free_port()
            try:
                return self._start()
            except AssertionError:
                if self.proc is None or self.proc.poll() is None:
                    raise
        raise AssertionError("redis-server did not start on any of five free ports")

    def _start(self) -> RedisServer:
        import socket as socketlib

        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.root), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with socketlib.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session (for each test worker: workers are separate
    sessions); tests keep apart with their own key prefixes."""
    if shutil.which("redis-server") is None:
        raise AssertionError("redis-server is not installed: scripts/test installs it")
    server = RedisServer(Path(tempfile.mkdtemp(prefix="fml-redis-", dir="/tmp"))).start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
