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
