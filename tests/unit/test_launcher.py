"""The launcher process and the daemon's SupervisorLauncher client, with real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import fetchml.daemon.supervise.launcher as launcher_module
from fetchml.daemon.supervise.launcher import SupervisorHandle, SupervisorLauncher
from fetchml.daemon.supervise.processes import (
    process_matches,
    signal_supervisor,
    wait_process_exit,
)
from fetchml.daemon.supervise.records import read_status, read_supervisor_info
from fetchml.errors import BadRequest, Unavailable

PACKAGE_ROOT = str(Path(launcher_module.__file__).resolve().parents[2])
JOB_ENV = {"PATH": os.environ.get("PATH", os.defpath)}


def write_spec(run_dir: Path, argv: list[str], **fields: Any) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "env": JOB_ENV, "cwd": str(run_dir), "kill_grace": 1.0, **fields}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return run_dir


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


async def finished(handle: SupervisorHandle, run_dir: Path) -> Any:
    await asyncio.wait_for(wait_process_exit(handle.pid, handle.create_time), 30)
    status = read_status(run_dir)
    assert status is not None
    return status


@pytest.fixture
async def launcher() -> AsyncIterator[SupervisorLauncher]:
    client = SupervisorLauncher()
    await client.start()
    try:
        yield client
    finally:
        await client.close()


class RawLauncher:
    """The launcher process spoken to directly, line by line, as the client does."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fetchml.daemon.supervise.launcher"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
        )
        self.ready = self.read()

    def ask(self, line: bytes) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(line + b"\n")
        self.process.stdin.flush()
        return self.read()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        answer: dict[str, Any] = json.loads(self.process.stdout.readline())
        return answer


@pytest.fixture
def raw_launcher() -> Iterator[RawLauncher]:
    raw = RawLauncher()
    try:
        yield raw
    finally:
        if raw.process.poll() is None:
            raw.process.kill()
        raw.process.wait()
        for stream in (raw.process.stdin, raw.process.stdout):
            if stream is not None:
                stream.close()


async def test_launch_runs_a_job_to_its_status(launcher: SupervisorLauncher,
                                               tmp_path: Path) -> None:
    run_dir = write_spec(tmp_path, ["sh", "-c", "echo hello; exit 4"])
    handle = await launcher.launch(run_dir)
    status = await finished(handle, run_dir)
    assert (status.reason, status.exit_code) == ("exited", 4)
    assert (run_dir / "output.log").read_text() == "hello\n"
    info = read_supervisor_info(run_dir)
    assert info is not None
    assert info.pid == handle.pid
    assert info.create_time == pytest.approx(handle.create_time, abs=1.5)
    assert not (run_dir / "supervisor.log").exists(), "a quiet supervisor leaves no log"


async def test_supervisor_leaves_the_daemons_session(launcher: SupervisorLauncher,
                                                     tmp_path: Path) -> None:
    run_dir = write_spec(tmp_path, ["sleep", "1000"], kill_grace=0.2)
    handle = await launcher.launch(run_dir)
    try:
        # A spare forked a moment ago may not have called setsid() yet.
        wait_for(lambda: os.getsid(handle.pid) == handle.pid)
        assert launcher.pid is not None
        assert os.getsid(launcher.pid) != os.getsid(0)
    finally:
        assert signal_supervisor(handle, None, signal.SIGTERM)
    assert (await finished(handle, run_dir)).reason == "cancelled"


async def test_concurrent_launches(launcher: SupervisorLauncher, tmp_path: Path) -> None:
    run_dirs = [write_spec(tmp_path / f"run{i}", ["sh", "-c", f"exit {i}"]) for i in range(12)]
    handles = await asyncio.gather(*(launcher.launch(run_dir) for run_dir in run_dirs))
    assert len({handle.pid for handle in handles}) == len(handles)
    for i, (handle, run_dir) in enumerate(zip(handles, run_dirs, strict=True)):
        assert (await finished(handle, run_dir)).exit_code == i


async def test_bad_run_directories_are_refused(launcher: SupervisorLauncher,
                                               tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match=r"has no spec\.json"):
        await launcher.launch(tmp_path / "empty")
    with pytest.raises(BadRequest, match="absolute"):
        await launcher.launch(Path("relative/run"))
    run_dir = write_spec(tmp_path / "good", ["true"])
    assert (await finished(await launcher.launch(run_dir), run_dir)).exit_code == 0


async def test_a_killed_launcher_is_restarted(launcher: SupervisorLauncher, tmp_path: Path) -> None:
    first = launcher.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    run_dir = write_spec(tmp_path, ["true"])
    handle = await launcher.launch(run_dir)
    assert launcher.pid not in (None, first)
    assert (await finished(handle, run_dir)).exit_code == 0


async def test_a_killed_spare_is_replaced(launcher: SupervisorLauncher, tmp_path: Path) -> None:
    assert launcher.pid is not None
    wait_for(lambda: psutil.Process(launcher.pid).children())
    spares = psutil.Process(launcher.pid).children()
    for spare in spares:
        spare.kill()
    # Once it is gone (the launcher reaps it), the next launch must not hand work to it.
    wait_for(lambda: all(not process_matches(s.pid, s.create_time()) for s in spares))
    run_dir = write_spec(tmp_path, ["true"])
    assert (await finished(await launcher.launch(run_dir), run_dir)).exit_code == 0


async def test_a_cancel_before_the_start_never_starts_the_job(launcher: SupervisorLauncher,
                                                               tmp_path: Path) -> None:
    assert launcher.pid is not None
    wait_for(lambda: psutil.Process(launcher.pid).children())
    (spare,) = psutil.Process(launcher.pid).children()
    spare.terminate()  # the spare holds SIGTERM back until it knows its job
    run_dir = write_spec(tmp_path, ["sh", "-c", "echo ran > ran"])
    handle = await launcher.launch(run_dir)
    assert handle.pid == spare.pid
    status = await finished(handle, run_dir)
    assert (status.reason, status.exit_code, status.signal) == ("cancelled", None, None)
    assert not (run_dir / "ran").exists()


async def test_a_launcher_that_cannot_start_is_unavailable(tmp_path: Path) -> None:
    client = SupervisorLauncher(python="/bin/false")
    with pytest.raises(Unavailable, match="cannot start"):
        await client.start()
    with pytest.raises(Unavailable):
        await client.launch(write_spec(tmp_path, ["true"]))
    await client.close()


async def test_close_leaves_supervisors_running(tmp_path: Path) -> None:
    client = SupervisorLauncher()
    run_dir = write_spec(tmp_path, ["sleep", "1000"], kill_grace=0.2)
    handle = await client.launch(run_dir)
    launcher_pid = client.pid
    await client.close()
    assert launcher_pid is not None
    assert not psutil.pid_exists(launcher_pid) or psutil.Process(launcher_pid).status() == "zombie"
    assert process_matches(handle.pid, handle.create_time)
    assert signal_supervisor(handle, None, signal.SIGTERM)
    assert (await finished(handle, run_dir)).reason == "cancelled"


def test_protocol_answers_in_order(raw_launcher: RawLauncher, tmp_path: Path) -> None:
    assert raw_launcher.ready == {"ok": True, "ready": True, "pid": raw_launcher.process.pid}
    assert raw_launcher.ask(b"not json") == {
        "ok": False, "code": "bad_request",
        "error": 'a launch request must be {"run_dir": "/absolute/path"}',
    }
    assert raw_launcher.ask(b'{"run_dir": 5}')["code"] == "bad_request"
    run_dir = write_spec(tmp_path, ["true"])
    answer = raw_launcher.ask(json.dumps({"run_dir": str(run_dir)}).encode())
    assert answer["ok"] is True
    assert process_matches(answer["pid"], answer["create_time"]) or read_status(run_dir)
    wait_for(lambda: read_status(run_dir) is not None)


def test_supervisor_survives_the_launcher_being_killed(raw_launcher: RawLauncher,
                                                       tmp_path: Path) -> None:
    # The "daemon crash" case: the job goes on and its status is still written.
    run_dir = write_spec(tmp_path, ["sh", "-c", "echo $$ > started; sleep 0.5; exit 7"])
    answer = raw_launcher.ask(json.dumps({"run_dir": str(run_dir)}).encode())
    wait_for(lambda: (run_dir / "started").exists())
    raw_launcher.process.kill()
    raw_launcher.process.wait()
    assert process_matches(answer["pid"], answer["create_time"])
    wait_for(lambda: read_status(run_dir) is not None)
    status = read_status(run_dir)
    assert status is not None
    assert (status.reason, status.exit_code) == ("exited", 7)


def test_launcher_exits_on_eof_without_killing_supervisors(raw_launcher: RawLauncher,
                                                           tmp_path: Path) -> None:
    run_dir = write_spec(tmp_path, ["sleep", "1000"], kill_grace=0.2)
    answer = raw_launcher.ask(json.dumps({"run_dir": str(run_dir)}).encode())
    assert raw_launcher.process.stdin is not None
    raw_launcher.process.stdin.close()
    assert raw_launcher.process.wait(timeout=10) == 0
    wait_for(lambda: read_supervisor_info(run_dir) is not None)
    assert process_matches(answer["pid"], answer["create_time"])
    assert signal_supervisor(answer["pid"], answer["create_time"], signal.SIGTERM)
    wait_for(lambda: read_status(run_dir) is not None)


def test_launching_one_run_directory_twice_runs_the_job_once(raw_launcher: RawLauncher,
                                                              tmp_path: Path) -> None:
    run_dir = write_spec(tmp_path, ["sh", "-c", "echo run >> runs; sleep 0.3"])
    request = json.dumps({"run_dir": str(run_dir)}).encode()
    first, second = raw_launcher.ask(request), raw_launcher.ask(request)
    assert first["pid"] != second["pid"]
    wait_for(lambda: read_status(run_dir) is not None)
    wait_for(lambda: not any(process_matches(launched["pid"], launched["create_time"])
                             for launched in (first, second)))
    assert (run_dir / "runs").read_text() == "run\n"
    info = read_supervisor_info(run_dir)
    assert info is not None
    # Both supervisors race for the run's lock: usually the first forked wins, but under load
    # the second can; either way exactly one of them ran the job.
    assert info.pid in (first["pid"], second["pid"])


async def test_throughput_of_trivial_jobs(launcher: SupervisorLauncher, tmp_path: Path) -> None:
    """Launches per second through one launcher on 2 slots, launch to status.json written."""
    jobs = 100
    run_dirs = [write_spec(tmp_path / f"run{i}", ["true"]) for i in range(jobs)]
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for run_dir in run_dirs:
        queue.put_nowait(run_dir)
    round_trips: list[float] = []
    latencies: list[float] = []

    async def slot() -> None:
        while not queue.empty():
            run_dir = queue.get_nowait()
            began = time.perf_counter()
            handle = await launcher.launch(run_dir)
            round_trips.append(time.perf_counter() - began)
            await wait_process_exit(handle.pid, handle.create_time)
            latencies.append(time.perf_counter() - began)
            status = read_status(run_dir)
            assert status is not None
            assert status.exit_code == 0

    began = time.perf_counter()
    await asyncio.gather(slot(), slot())
    rate = jobs / (time.perf_counter() - began)
    print(  # shown with pytest -s: the numbers the README's performance table quotes
        f"\n{rate:.0f} trivial jobs/s on 2 slots; launch round trip p50 "
        f"{statistics.median(round_trips) * 1e3:.2f} ms; launch to status p50 "
        f"{statistics.median(latencies) * 1e3:.2f} ms"
    )
    assert rate > 10
