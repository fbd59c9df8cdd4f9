"""GPU allocation against a real daemon: whole GPUs, distinct CUDA_VISIBLE_DEVICES, waiting.

GPUs are declared with FETCHML_GPUS (no GPU is needed); on a host with nvidia-smi the last
test also checks that detected GPUs reach the job by UUID.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fetchml.errors import BadRequest
from tests.integration.test_jobs import Gate, Jobs, sh, start_daemon


@pytest.fixture
def two_gpus(short_tmp: Path) -> Iterator[Jobs]:
    yield from start_daemon(short_tmp, FETCHML_GPUS="0,1", FETCHML_CPUS="8")


def visible_devices(jobs: Jobs, job_id: int) -> str:
    log = jobs.daemon.state_dir / "runs" / str(job_id) / "1" / "output.log"
    deadline = time.monotonic() + 10
    while not log.exists() or not log.read_text().endswith("\n"):
        assert time.monotonic() < deadline, "the job never printed its devices"
        time.sleep(0.02)
    return log.read_text().strip()


def test_one_gpu_jobs_get_distinct_devices_and_the_third_waits(two_gpus: Jobs,
                                                               short_tmp: Path) -> None:
    gate = Gate(short_tmp / "gate")
    script = f'echo "$CUDA_VISIBLE_DEVICES"; {gate.wait_script()}'
    first, second, third = (two_gpus.one(sh(script), gpus=1, name=f"g{i}") for i in range(3))
    first = two_gpus.wait_state(first, "running")
    second = two_gpus.wait_state(second, "running")
    time.sleep(0.3)
    assert two_gpus.get(third)["state"] == "queued"
    devices = {visible_devices(two_gpus, first["id"]), visible_devices(two_gpus, second["id"])}
    assert devices == {"0", "1"}
    assert {tuple(first["gpu_ids"]), tuple(second["gpu_ids"])} == {(0,), (1,)}
    both = two_gpus.one(sh(f'echo "$CUDA_VISIBLE_DEVICES"; {gate.wait_script()}'), gpus=2,
                        name="both")
    status = two_gpus.daemon.cli("status", str(first["id"]), "--json")
    assert status.returncode == 0, status.stderr
    assert '"gpus": [' in status.stdout
    gate.open()
    first, second, third, both = two_gpus.wait(first, second, third, both)
    assert all(j["state"] == "succeeded" for j in (first, second, third, both))
    assert third["started_at"] >= min(first["finished_at"], second["finished_at"])
    # the 2-GPU job waited until both GPUs were free at once
    last_one_gpu = sorted((first, second, third), key=lambda j: j["finished_at"])
    assert both["started_at"] >= last_one_gpu[1]["finished_at"]
    assert both["gpu_ids"] == [0, 1] and visible_devices(two_gpus, both["id"]) == "0,1"


def test_cpu_jobs_get_no_gpu_and_too_many_gpus_are_refused(two_gpus: Jobs) -> None:
    job = two_gpus.wait(two_gpus.one(sh('echo "[$CUDA_VISIBLE_DEVICES]"')))[0]
    assert job["gpu_ids"] == [] and visible_devices(two_gpus, job["id"]) == "[]"
    with pytest.raises(BadRequest, match="it needs 3 GPUs and this host has 2"):
        two_gpus.one(["true"], gpus=3)


def gpu_uuids() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(not gpu_uuids(), reason="needs a real NVIDIA GPU and nvidia-smi")
def test_detected_gpu_reaches_the_job_by_uuid(short_tmp: Path) -> None:
    uuids = gpu_uuids()
    for jobs in start_daemon(short_tmp, FETCHML_GPUS=None):
        assert len(jobs.conn.hello["host"]["gpus"]) == len(uuids)
        job = jobs.wait(jobs.one(sh('echo "$CUDA_VISIBLE_DEVICES"; nvidia-smi -L'), gpus=1))[0]
        assert job["state"] == "succeeded", job
        lines = (jobs.daemon.state_dir / "runs" / str(job["id"]) / "1" / "output.log"
                 ).read_text().splitlines()
        assert lines[0] in uuids
        assert len([line for line in lines[1:] if line.startswith("GPU ")]) == 1
