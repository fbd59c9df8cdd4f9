"""Shared benchmark helpers: a throwaway daemon in a temp dir, timing commands, the machine."""

from __future__ import annotations

import compileall
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# How long a daemon may take to create its socket before the benchmark gives up.
DAEMON_START_TIMEOUT_S = 30.0


def compile_fetchml() -> None:
    """Write fetchml's bytecode, as `pip install` does: an editable install run with
    PYTHONDONTWRITEBYTECODE would otherwise compile every module on every command."""
    import fetchml

    compileall.compile_dir(Path(fetchml.__file__).parent, quiet=1)


compile_fetchml()  # every benchmark imports this module


def bench_env(**extra: str) -> dict[str, str]:
    """The caller's environment without stray FETCHML_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHML_")}
    env.update(FETCHML_GPUS="")
    env.update(extra)
    return env


def fetchml_command() -> list[str]:
    """The installed ``fetchml`` entry point next to this Python, else ``python -m fetchml``."""
    found = shutil.which("fetchml", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "fetchml"]


@dataclass
class Daemon:
    """A daemon running on a state directory; ``env`` points the CLI at it."""

    state_dir: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str]

    @property
    def socket(self) -> Path:
        return self.state_dir / "fetchml.sock"

    def cli(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*fetchml_command(), *args], cwd=cwd, env=self.env,
                              capture_output=True, text=True, check=True)


@contextlib.contextmanager
def running_daemon(state_dir: Path, *args: str) -> Iterator[Daemon]:
    """Start ``fetchml daemon`` on ``state_dir``; stopped (SIGTERM) on exit."""
    socket = state_dir / "fetchml.sock"
    env = bench_env(FETCHML_SOCKET=str(socket))
    proc = subprocess.Popen(
        [*fetchml_command(), "daemon", "--state-dir", str(state_dir), *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while not (socket.exists() and (state_dir / "daemon.json").exists()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the daemon on {state_dir} did not start")
            time.sleep(0.02)
        yield Daemon(state_dir, proc, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The sample at ``fraction`` of the sorted samples (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


@contextlib.contextmanager
def temp_root(prefix: str = "fml-bench-") -> Iterator[Path]:
    """A short temp directory (Unix socket paths are limited to 107 bytes), removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def time_command(cmd: Sequence[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of one run; a failure stops the benchmark with its stderr."""
    started = time.perf_counter()
    done = subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True,
                          check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return elapsed, done.stdout


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def filesystem_type(path: Path) -> str:
    """The filesystem type holding ``path``, from /proc/mounts (longest matching mount)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            mount = fields[1]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def machine_line(path: Path) -> str:
    """CPU count, kernel release, filesystem of ``path`` and the date: one line."""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (f"machine: {os.cpu_count()} CPUs, kernel {platform.release()}, "
            f"{filesystem_type(path)} at {path}, python {platform.python_version()}, {when}")
