"""A throwaway ``fetchml daemon`` in a subprocess, on a short temporary socket.

The demo, the benchmarks, the scripts and the tests that need a real daemon process all start
one the same way: ``python -m fetchml daemon --state-dir D``, wait until it listens, talk to
it through the client or the CLI, stop it. Only ``subprocess`` and the client are used here:
the CLI never imports ``fetchml.daemon``.

    with throwaway_root() as root, LocalDaemon(root / "state") as daemon:
        daemon.cli("info")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from fetchml.client.connection import Connection, Target, connect
from fetchml.config import SOCKET_NAME
from fetchml.errors import DaemonUnreachable, Unavailable

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.02
# Written by the daemon once it listens (fetchml.daemon.server.RUNTIME_INFO_NAME).
RUNTIME_INFO = "daemon.json"
LOG_TAIL = 4000  # characters of the daemon's log quoted when it fails to start or stop


def clean_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (the process environment by default) without FETCHML_* settings, plus
    ``extra``: a stray setting of the caller's must not configure the throwaway daemon."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("FETCHML_")}
    env.update(extra)
    return env


def fetchml_command() -> list[str]:
    """``python -m fetchml`` with this very interpreter."""
    return [sys.executable, "-m", "fetchml"]


@contextlib.contextmanager
def throwaway_root(prefix: str = "fml-") -> Iterator[Path]:
    """A temp directory with a short path (Unix socket paths are limited to 107 bytes),
    removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class LocalDaemon:
    """``fetchml daemon --state-dir STATE_DIR [ARGS]`` in a subprocess with ``env``.

    ``log_path`` takes its stdout and stderr (discarded when None); ``command`` is how to run
    fetchml (``python -m fetchml`` by default). ``cli()`` runs a CLI command pointed at it.
    """

    state_dir: Path
    env: dict[str, str] = field(default_factory=clean_env)
    args: Sequence[str] = ()
    log_path: Path | None = None
    cwd: Path | None = None
    command: Sequence[str] = field(default_factory=fetchml_command)
    start_timeout: float = START_TIMEOUT_S
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.state_dir / SOCKET_NAME

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def runtime_info(self) -> dict[str, Any]:
        """What the daemon wrote once it listened: pid, socket, and TCP URLs if any."""
        return json.loads((self.state_dir / RUNTIME_INFO).read_text())  # type: ignore[no-any-return]

    def cli_env(self, **extra: str) -> dict[str, str]:
        """The environment of a CLI command that talks to this daemon."""
        return dict(self.env, FETCHML_SOCKET=str(self.socket), **extra)

    def start(self, wait: bool = True) -> LocalDaemon:
        """Start the process; with ``wait``, return once it answers on its socket."""
        if self.log_path is None:
            out: Any = subprocess.DEVNULL
        else:
            out = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*self.command, "daemon", "--state-dir", str(self.state_dir), *self.args],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd)
        finally:
            if self.log_path is not None:
                out.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until this process wrote its runtime info (it listens then); raises
        DaemonUnreachable, with the log's tail, if it exits or takes too long."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonUnreachable(f"the daemon on {self.state_dir} exited with "
                                        f"{self.proc.returncode} during start-up{self._tail()}")
            if self.socket.exists():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if self.runtime_info["pid"] == self.proc.pid:
                        return
            time.sleep(POLL_S)
        raise DaemonUnreachable(f"the daemon on {self.state_dir} did not open {self.socket} "
                                f"within {self.start_timeout:g} s{self._tail()}")

    def connect(self, **kwargs: Any) -> Connection:
        return connect(Target(socket_path=str(self.socket)), **kwargs)

    def cli(self, *args: str, cwd: Path | None = None, input: str | None = None,
            env: Mapping[str, str] | None = None, timeout: float | None = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """``fetchml ARGS`` against this daemon, output captured; with ``check``, a non-zero
        exit raises CalledProcessError."""
        return subprocess.run([*self.command, *args], cwd=cwd or self.cwd,
                              env=self.cli_env(**(env or {})), input=input,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send ``sig`` and wait; returns the exit status. A daemon that outlives ``timeout``
        is killed and Unavailable raised."""
        assert self.proc is not None, "start() first"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Unavailable(f"the daemon on {self.state_dir} ignored signal {sig} for "
                              f"{timeout:g} s and was killed{self._tail()}") from None

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _tail(self) -> str:
        text = self.log()[-LOG_TAIL:]
        return f":\n{text}" if text else ""

    def __enter__(self) -> LocalDaemon:
        if not self.running:
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.running:
            self.stop()
