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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fetchml.client.local_daemon import LocalDaemon, clean_env, throwaway_root

__all__ = ["Daemon", "running_daemon", "throwaway_root"]

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
    return clean_env(**{"FETCHML_GPUS": "", **extra})


def fetchml_command() -> list[str]:
    """The installed ``fetchml`` entry point next to this Python, else ``python -m fetchml``."""
    found = shutil.which("fetchml", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "fetchml"]


# What the benchmarks call a daemon: fetchml's own throwaway-daemon helper.
Daemon = LocalDaemon


@contextlib.contextmanager
def running_daemon(state_dir: Path, *args: str, **env: str) -> Iterator[Daemon]:
    """``fetchml daemon`` on ``state_dir`` with flags ``args`` and settings ``env``, started
    and answering; stopped (SIGTERM) on exit. Its ``env`` points the CLI at it."""
    daemon = LocalDaemon(
        state_dir, bench_env(FETCHML_SOCKET=str(state_dir / "fetchml.sock"), **env), args,
        command=fetchml_command(), start_timeout=DAEMON_START_TIMEOUT_S)
    with daemon:
        yield daemon


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The sample at ``fraction`` of the sorted samples (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


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
