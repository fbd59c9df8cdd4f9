"""The per-job supervisor and the daemon-side process helpers, with real processes."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import fetchml.daemon.supervise.supervisor as supervisor_module
from fetchml.daemon.supervise.processes import (
    kill_orphaned_job,
    process_matches,
    signal_supervisor,
    wait_process_exit,
)
from fetchml.daemon.supervise.records import (
    RunSpec,
    RunStatus,
    SupervisorInfo,
    read_status,
    read_supervisor_info,
)
from fetchml.daemon.supervise.supervisor import EXIT_ALREADY_SUPERVISED
from fetchml.errors import BadRequest

PACKAGE_ROOT = str(Path(supervisor_module.__file__).resolve().parents[2])
JOB_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
MiB = 1024 * 1024

# A job whose tree has a plain background child and a grandchild that escaped with a double
# fork into a session of its own; it writes their pids and then waits for ever.
TREE_JOB = [
    "sh",
    "-c",
    "(setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' &)\n"
    "sleep 1000 & echo $! > background.pid\n"
    "wait",
]


def write_spec(run_dir: Path, argv: list[str], **fields: Any) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "env": JOB_ENV, "cwd": str(run_dir), "kill_grace": 2.0, **fields}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return run_dir


def start_supervisor(run_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    return subprocess.Popen(
        [sys.executable, "-m", "fetchml.daemon.supervise.supervisor", str(run_dir)],
        env=env,
        start_new_session=True,  # as the launcher does: signals to the test never reach it
        stdin=subprocess.DEVNULL,
    )


def supervise(run_dir: Path) -> RunStatus:
    process = start_supervisor(run_dir)
    assert process.wait(timeout=60) == 0
    status = read_status(run_dir)
    assert status is not None
    return status


def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def read_pid(path: Path) -> psutil.Process:
    wait_for(lambda: path.exists() and path.read_text().strip())
    return psutil.Process(int(path.read_text()))


def gone(process: psutil.Process) -> bool:
    return not process_matches(process.pid, process.create_time())


RunningTree = tuple[subprocess.Popen[bytes], list[psutil.Process]]


@pytest.fixture
def running_tree(tmp_path: Path) -> Iterator[Callable[..., RunningTree]]:
    """Start TREE_JOB under a supervisor; give the supervisor and the job's three processes."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**fields: Any) -> RunningTree:
        run_dir = write_spec(tmp_path / "run", TREE_JOB, **fields)
        process = start_supervisor(run_dir)
        started.append(process)
        wait_for(lambda: read_supervisor_info(run_dir) is not None)
        info = read_supervisor_info(run_dir)
        assert info is not None
        job = psutil.Process(info.job_pid)
        escaped = read_pid(run_dir / "escaped.pid")
        background = read_pid(run_dir / "background.pid")
        # The escapee really left the job's session and was adopted by the supervisor.
        assert os.getsid(escaped.pid) != info.job_pgid
        wait_for(lambda: escaped.ppid() == process.pid)
        return process, [job, escaped, background]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- exit codes, signals, spawn failures -------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_is_recorded(tmp_path: Path, code: int) -> None:
    status = supervise(write_spec(tmp_path, ["sh", "-c", f"exit {code}"]))
    assert (status.reason, status.exit_code, status.signal, status.error) == (
        "exited", code, None, None)
    assert status.started_at <= status.finished_at <= time.time()


def test_death_by_signal_is_recorded(tmp_path: Path) -> None:
    status = supervise(write_spec(tmp_path, ["sh", "-c", "kill -USR1 $$"]))
    assert (status.reason, status.exit_code, status.signal) == ("exited", None, signal.SIGUSR1)


def test_missing_command_is_spawn_failed(tmp_path: Path) -> None:
    status = supervise(write_spec(tmp_path, ["fetchml-no-such-command", "--flag"]))
    assert (status.reason, status.exit_code, status.signal) == ("spawn_failed", 127, None)
    assert status.error is not None
    assert status.error.startswith("command not found: fetchml-no-such-command")
    assert not (tmp_path / "supervisor.json").exists()


def test_command_not_executable_is_spawn_failed(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    status = supervise(write_spec(tmp_path / "run", [str(script)]))
    assert (status.reason, status.exit_code) == ("spawn_failed", 126)
    assert status.error is not None
    assert status.error.startswith(f"command cannot be executed: {script}")


def test_missing_working_directory_is_spawn_failed(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    status = supervise(write_spec(tmp_path / "run", ["true"], cwd=str(missing)))
    assert status.reason == "spawn_failed"
    assert status.error is not None
    assert str(missing) in status.error


@pytest.mark.parametrize(
    ("spec_text", "message"),
    [
        ("{not json", "spec.json cannot be used"),
        (json.dumps({"argv": [], "env": {}, "cwd": "/"}), "argv must be a non-empty list"),
        (json.dumps({"argv": ["true"], "env": {}, "cwd": "/", "bogus": 1}), "unknown spec fields"),
    ],
)
def test_unusable_spec_is_spawn_failed(tmp_path: Path, spec_text: str, message: str) -> None:
    (tmp_path / "spec.json").write_text(spec_text)
    status = supervise(tmp_path)
    assert status.reason == "spawn_failed"
    assert status.error is not None
    assert message in status.error


def test_missing_spec_exits_without_status(tmp_path: Path) -> None:
    assert start_supervisor(tmp_path).wait(timeout=60) == 1
    assert read_status(tmp_path) is None


# --- what the job sees -------------------------------------------------------------------------


def test_env_is_exactly_the_spec(tmp_path: Path) -> None:
    env = {"PATH": JOB_ENV["PATH"], "FOO": "bar baz", "EMPTY": "", "UNICODE": "é"}
    status = supervise(write_spec(tmp_path, ["env"], env=env))
    assert status.exit_code == 0
    printed = (tmp_path / "output.log").read_text().splitlines()
    assert sorted(printed) == sorted(f"{k}={v}" for k, v in env.items())


def test_cwd_umask_stdin_and_signals_are_as_specified(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = (
        "pwd; umask; readlink /proc/self/fd/0; "
        "grep -E '^Sig(Blk|Ign)' /proc/self/status; grep Cpus_allowed_list /proc/self/status"
    )
    run_dir = write_spec(
        tmp_path / "run", ["sh", "-c", script], cwd=str(work), umask=0o027, cpu_affinity=[0]
    )
    assert supervise(run_dir).exit_code == 0
    lines = (run_dir / "output.log").read_text().split("\n")
    assert lines[0] == os.path.realpath(work)
    assert lines[1] == "0027"
    assert lines[2] == "/dev/null"
    # No standard signal blocked or ignored: the supervisor's set-up does not leak into the job.
    # (glibc's posix_spawn leaves its two internal signals, 32 and 33, ignored.)
    standard = (1 << 31) - 1
    assert lines[3].startswith("SigBlk:")
    assert int(lines[3].split()[1], 16) == 0
    assert lines[4].startswith("SigIgn:")
    assert int(lines[4].split()[1], 16) & standard == 0
    assert lines[5].split() == ["Cpus_allowed_list:", "0"]


def test_unknown_cpu_is_spawn_failed(tmp_path: Path) -> None:
    status = supervise(write_spec(tmp_path, ["true"], cpu_affinity=[4095]))
    assert status.reason == "spawn_failed"
    assert status.error is not None
    assert "CPU affinity [4095]" in status.error


def test_rlimits_are_visible_inside_the_job(tmp_path: Path) -> None:
    limits = {"RLIMIT_NPROC": 4321, "RLIMIT_AS": [2 * 1024 * MiB, 4 * 1024 * MiB]}
    run_dir = write_spec(tmp_path, ["cat", "/proc/self/limits"], rlimits=limits)
    assert supervise(run_dir).exit_code == 0
    rows = {
        line[:26].strip(): line[26:].split()[:2]
        for line in (tmp_path / "output.log").read_text().splitlines()[1:]
    }
    assert rows["Max processes"] == ["4321", "4321"]
    assert rows["Max address space"] == [str(2 * 1024 * MiB), str(4 * 1024 * MiB)]


def test_rlimit_as_stops_a_big_allocation(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "x = bytearray(1024 * 1024 * 1024)"]
    status = supervise(write_spec(tmp_path, argv, rlimits={"RLIMIT_AS": 512 * MiB}))
    assert status.exit_code == 1
    assert "MemoryError" in (tmp_path / "output.log").read_text()


def test_missing_command_with_rlimits_is_spawn_failed(tmp_path: Path) -> None:
    status = supervise(write_spec(tmp_path, ["fetchml-no-such-command"],
                                  rlimits={"RLIMIT_NOFILE": 64}))
    assert (status.reason, status.exit_code) == ("spawn_failed", 127)


# --- output.log and output.idx -----------------------------------------------------------------


def test_log_interleaves_stdout_and_stderr(tmp_path: Path) -> None:
    script = "echo out1; echo err1 >&2; echo out2; echo err2 >&2"
    assert supervise(write_spec(tmp_path, ["sh", "-c", script])).exit_code == 0
    assert (tmp_path / "output.log").read_text() == "out1\nerr1\nout2\nerr2\n"


def test_index_grows_with_the_log(tmp_path: Path) -> None:
    script = "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.1; done"
    status = supervise(write_spec(tmp_path, ["sh", "-c", script]))
    lines = (tmp_path / "output.idx").read_text().splitlines()
    entries = [(float(stamp), int(offset)) for stamp, offset in (line.split() for line in lines)]
    assert len(entries) >= 2
    offsets = [offset for _, offset in entries]
    assert offsets == sorted(set(offsets)), "an entry only when the log grew"
    assert offsets[-1] == (tmp_path / "output.log").stat().st_size
    stamps = [stamp for stamp, _ in entries]
    assert stamps == sorted(stamps)
    assert status.started_at - 1 <= stamps[0] and stamps[-1] <= status.finished_at + 1


def test_silent_job_leaves_no_index(tmp_path: Path) -> None:
    assert supervise(write_spec(tmp_path, ["true"])).exit_code == 0
    assert (tmp_path / "output.log").read_bytes() == b""
    assert not (tmp_path / "output.idx").exists()


# --- timeout, cancel, leftovers ---------------------------------------------------------------


def test_timeout_kills_the_whole_tree(running_tree: Any, tmp_path: Path) -> None:
    supervisor, tree = running_tree(timeout=1.0, kill_grace=1.0)
    assert supervisor.wait(timeout=30) == 0
    status = read_status(tmp_path / "run")
    assert status is not None
    assert (status.reason, status.exit_code, status.signal) == ("timeout", None, signal.SIGTERM)
    assert 1.0 <= status.finished_at - status.started_at < 3.0
    assert all(gone(process) for process in tree)


def test_cancel_kills_the_whole_tree_within_the_grace(running_tree: Any, tmp_path: Path) -> None:
    supervisor, tree = running_tree(kill_grace=2.0)
    began = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert time.monotonic() - began < 2.0 + 1.0
    status = read_status(tmp_path / "run")
    assert status is not None
    assert (status.reason, status.signal) == ("cancelled", signal.SIGTERM)
    assert all(gone(process) for process in tree)


def test_job_ignoring_sigterm_gets_sigkill_after_the_grace(tmp_path: Path) -> None:
    run_dir = write_spec(
        tmp_path, ["sh", "-c", "trap '' TERM; echo $$ > ready; sleep 1000"], kill_grace=0.5
    )
    supervisor = start_supervisor(run_dir)
    job = read_pid(run_dir / "ready")
    began = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert 0.5 <= time.monotonic() - began < 0.5 + 1.5
    status = read_status(run_dir)
    assert status is not None
    assert (status.reason, status.signal) == ("cancelled", signal.SIGKILL)
    assert gone(job)


def test_leftovers_die_when_the_main_process_ends(tmp_path: Path) -> None:
    script = (
        "(setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' &)\n"
        "sleep 1000 & echo $! > background.pid\n"
        "while [ ! -s escaped.pid ]; do sleep 0.01; done"
    )
    status = supervise(write_spec(tmp_path, ["sh", "-c", script]))
    assert (status.reason, status.exit_code) == ("exited", 0)
    for name in ("escaped.pid", "background.pid"):
        assert not psutil.pid_exists(int((tmp_path / name).read_text())) or gone(
            psutil.Process(int((tmp_path / name).read_text()))
        )


def test_a_second_supervisor_for_one_run_directory_refuses(tmp_path: Path) -> None:
    run_dir = write_spec(tmp_path, ["sh", "-c", "echo run >> runs; sleep 1000"], kill_grace=0.5)
    first = start_supervisor(run_dir)
    wait_for(lambda: read_supervisor_info(run_dir) is not None)
    assert start_supervisor(run_dir).wait(timeout=60) == EXIT_ALREADY_SUPERVISED
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert (run_dir / "runs").read_text() == "run\n"
    status = read_status(run_dir)
    assert status is not None
    assert status.reason == "cancelled"


# --- resource accounting ----------------------------------------------------------------------


def test_peak_rss_of_a_100_mb_job(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "x = b'a' * (100 * 1024 * 1024); import time; time.sleep(0.2)"]
    status = supervise(write_spec(tmp_path, argv))
    assert status.exit_code == 0
    assert status.peak_rss >= 90 * MiB


def test_peak_rss_of_a_tiny_job_is_not_the_supervisors(tmp_path: Path) -> None:
    status = supervise(write_spec(tmp_path, ["true"]))
    assert status.peak_rss < 10 * MiB


def test_cpu_time_counts_grandchildren(tmp_path: Path) -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    script = f"{sys.executable} -c '{burn}' & wait"
    status = supervise(write_spec(tmp_path, ["sh", "-c", script]))
    assert status.exit_code == 0
    assert 0.3 <= status.cpu_time < 5.0


# --- supervisor.json and the daemon-side helpers -----------------------------------------------


def test_supervisor_info_names_the_supervisor_and_the_job(tmp_path: Path) -> None:
    run_dir = write_spec(tmp_path, ["sh", "-c", "echo $$ > ready; sleep 1000"], kill_grace=0.5)
    supervisor = start_supervisor(run_dir)
    job = read_pid(run_dir / "ready")
    wait_for(lambda: read_supervisor_info(run_dir) is not None)  # written once the job runs
    info = read_supervisor_info(run_dir)
    assert info is not None
    assert (info.pid, info.job_pid, info.job_pgid) == (supervisor.pid, job.pid, job.pid)
    assert process_matches(info.pid, info.create_time)
    assert process_matches(info.job_pid, info.job_create_time)
    assert os.getpgid(job.pid) == os.getsid(job.pid) == job.pid
    assert signal_supervisor(info, None, signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert not signal_supervisor(info, None, signal.SIGTERM)


def test_kill_orphaned_job_after_the_supervisor_was_killed(tmp_path: Path) -> None:
    run_dir = write_spec(tmp_path, ["sh", "-c", "sleep 1000 & echo $! > background.pid; wait"])
    supervisor = start_supervisor(run_dir)
    background = read_pid(run_dir / "background.pid")
    wait_for(lambda: read_supervisor_info(run_dir) is not None)
    info = read_supervisor_info(run_dir)
    assert info is not None
    job = psutil.Process(info.job_pid)
    assert not kill_orphaned_job(info), "the supervisor is alive: it is not an orphan"
    assert not gone(job)
    supervisor.kill()
    supervisor.wait()
    assert read_status(run_dir) is None
    assert not gone(job), "jobs outlive their supervisor"
    assert kill_orphaned_job(info)
    wait_for(lambda: gone(job) and gone(background))
    assert not kill_orphaned_job(info)


def test_kill_orphaned_job_leaves_a_reused_pid_alone() -> None:
    with subprocess.Popen(["sleep", "1000"], start_new_session=True) as stranger:
        started = psutil.Process(stranger.pid).create_time()
        info = SupervisorInfo(
            pid=stranger.pid, create_time=started - 100, job_pid=stranger.pid,
            job_pgid=stranger.pid, job_create_time=started - 100, started_at=started - 100,
        )
        assert not kill_orphaned_job(info)
        assert stranger.poll() is None
        stranger.kill()


async def test_wait_process_exit_returns_promptly_for_a_non_child() -> None:
    # The shell exits at once, so the sleep is reparented: it is not our child.
    began = time.monotonic()
    out = subprocess.run(
        ["sh", "-c", "sleep 0.5 </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    ).stdout
    sleeper = psutil.Process(int(out))
    assert sleeper.ppid() != os.getpid()
    await asyncio.wait_for(wait_process_exit(sleeper.pid, sleeper.create_time()), 5)
    assert gone(sleeper)
    assert 0.45 <= time.monotonic() - began < 0.5 + 0.5


async def test_wait_process_exit_for_gone_or_reused_pids() -> None:
    with subprocess.Popen(["sleep", "1000"]) as child:
        started = psutil.Process(child.pid).create_time()
        # A different create time: a reused pid is not the process we wait for.
        await asyncio.wait_for(wait_process_exit(child.pid, started - 100), 1)
        waiter = asyncio.ensure_future(wait_process_exit(child.pid, started))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        child.kill()
        child.wait()
        await asyncio.wait_for(waiter, 1)
        await asyncio.wait_for(wait_process_exit(child.pid, started), 1)


async def test_wait_process_exit_polls_without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open is not available")

    # The one fake here: kernels without pidfd_open cannot be had on this machine.
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    with subprocess.Popen(["sleep", "0.2"]) as child:
        started = psutil.Process(child.pid).create_time()
        reaper = asyncio.get_running_loop().run_in_executor(None, child.wait)
        await asyncio.wait_for(wait_process_exit(child.pid, started), 5)
        await reaper


def test_signal_supervisor_checks_identity() -> None:
    with subprocess.Popen(["sleep", "1000"]) as child:
        started = psutil.Process(child.pid).create_time()
        assert not signal_supervisor(child.pid, started - 100, signal.SIGTERM)
        assert child.poll() is None
        with pytest.raises(BadRequest):
            signal_supervisor(child.pid, None, signal.SIGTERM)
        assert signal_supervisor(child.pid, started, signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
        assert not signal_supervisor(child.pid, started, signal.SIGTERM)


# --- records ----------------------------------------------------------------------------------


STATUS = {
    "exit_code": 0, "signal": None, "reason": "exited", "error": None,
    "started_at": 1.0, "finished_at": 2.0, "peak_rss": 10, "cpu_time": 0.5,
}
INFO = {"pid": 10, "create_time": 1.0, "job_pid": 11, "job_pgid": 11,
        "job_create_time": 1.5, "started_at": 1.2}


def test_records_read_back(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps(STATUS))
    (tmp_path / "supervisor.json").write_text(json.dumps(INFO))
    assert read_status(tmp_path) == RunStatus(**STATUS)  # type: ignore[arg-type]
    assert read_supervisor_info(tmp_path) == SupervisorInfo(**INFO)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", "null", json.dumps({**STATUS, "reason": "bored"}),
     json.dumps({**STATUS, "exit_code": "0"}), json.dumps({**STATUS, "peak_rss": True}),
     json.dumps({k: v for k, v in STATUS.items() if k != "cpu_time"})],
)
def test_bad_status_reads_as_none(tmp_path: Path, content: str) -> None:
    (tmp_path / "status.json").write_text(content)
    assert read_status(tmp_path) is None


@pytest.mark.parametrize(
    "content",
    ["{\"pid\": 1", json.dumps({**INFO, "pid": 0}), json.dumps({**INFO, "job_create_time": None})],
)
def test_bad_supervisor_info_reads_as_none(tmp_path: Path, content: str) -> None:
    (tmp_path / "supervisor.json").write_text(content)
    assert read_supervisor_info(tmp_path) is None


def test_missing_or_symlinked_records_read_as_none(tmp_path: Path) -> None:
    assert read_status(tmp_path) is None
    assert read_supervisor_info(tmp_path) is None
    (tmp_path / "elsewhere.json").write_text(json.dumps(STATUS))
    (tmp_path / "status.json").symlink_to(tmp_path / "elsewhere.json")
    assert read_status(tmp_path) is None


def test_job_spec_round_trips() -> None:
    spec = RunSpec.from_dict({
        "argv": ["python", "train.py"], "env": {"A": "1"}, "cwd": "/work", "timeout": 5,
        "kill_grace": 1, "log": "output.log", "rlimits": {"RLIMIT_AS": 10, "RLIMIT_NOFILE": [1, 2]},
        "cpu_affinity": [0, 1], "umask": 0o077,
    })
    assert spec.rlimits == {"RLIMIT_AS": (10, 10), "RLIMIT_NOFILE": (1, 2)}
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    defaults = RunSpec.from_dict({"argv": ["true"], "cwd": "/", "kill_grace": None})
    assert (defaults.env, defaults.timeout, defaults.kill_grace) == ({}, None, 10.0)
    assert defaults.umask == 0o022


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"argv": []}, "argv"),
        ({"argv": "ls -l"}, "argv"),
        ({"argv": ["a\0b"]}, "NUL"),
        ({"env": {"A=B": "1"}}, "env"),
        ({"env": {"A": 1}}, "env"),
        ({"env": ["A"]}, "env"),
        ({"cwd": "relative"}, "cwd"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "10"}, "timeout"),
        ({"kill_grace": -0.5}, "kill_grace"),
        ({"kill_grace": True}, "kill_grace"),
        ({"log": "../escape.log"}, "log"),
        ({"rlimits": {"RLIMIT_BOGUS": 1}}, "RLIMIT_BOGUS"),
        ({"rlimits": {"RLIMIT_AS": [10, 5]}}, "RLIMIT_AS"),
        ({"rlimits": {"RLIMIT_AS": -5}}, "RLIMIT_AS"),
        ({"rlimits": [1]}, "rlimits"),
        ({"cpu_affinity": []}, "cpu_affinity"),
        ({"cpu_affinity": [-1]}, "cpu_affinity"),
        ({"umask": 0o1000}, "umask"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_job_spec_rejects_bad_fields(change: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        RunSpec.from_dict({"argv": ["true"], "env": {}, "cwd": "/", **change})
