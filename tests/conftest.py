"""Shared test helpers: real daemons in subprocesses on short temporary sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fetchml.client import Connection, Target, connect

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0


def base_env(**extra: str) -> dict[str, str]:
    """The environment for daemons and CLI runs in tests: no stray FETCHML_* settings,
    no GPUs unless a test asks, and an isolated HOME so user config files never leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHML_")}
    env.update(FETCHML_GPUS="", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class DaemonProcess:
    root: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "daemon.log"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def socket(self) -> Path:
        return self.state_dir / "fetchml.sock"

    def start(self, wait: bool = True) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fetchml", "daemon", "--state-dir", str(self.state_dir),
                 *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        info = self.state_dir / "daemon.json"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            if info.exists() and self.socket.exists():
                try:
                    if json.loads(info.read_text())["pid"] == self.proc.pid:
                        return
                except (ValueError, KeyError):
                    pass
            time.sleep(0.02)
        raise AssertionError(f"daemon did not start:\n{self.log()}")

    @property
    def runtime_info(self) -> dict[str, object]:
        return json.loads((self.state_dir / "daemon.json").read_text())  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connect(self, **kwargs: object) -> Connection:
        return connect(Target(socket_path=str(self.socket)), **kwargs)  # type: ignore[arg-type]

    def cli(self, *args: str, cwd: Path | None = None, input: str | None = None,
            env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        run_env = dict(self.env, FETCHML_SOCKET=str(self.socket), **(env or {}))
        return subprocess.run([sys.executable, "-m", "fetchml", *args], cwd=cwd or self.root,
                              env=run_env, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored signal {sig}:\n{self.log()}") from None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fml-", dir="/tmp"))
    (path / "home").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_daemon(root: Path, *args: str, **env: str) -> DaemonProcess:
    return DaemonProcess(root, base_env(HOME=str(root / "home"), **env), list(args))


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    proc = make_daemon(short_tmp).start()
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop()


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
        import socket as socketlib

        if self.port == 0:
            with socketlib.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
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
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart with their own key prefixes."""
    if shutil.which("redis-server") is None:
        raise AssertionError("redis-server is not installed: scripts/test installs it")
    server = RedisServer(Path(tempfile.mkdtemp(prefix="fml-redis-", dir="/tmp"))).start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
