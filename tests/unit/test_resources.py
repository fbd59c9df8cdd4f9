"""Host inventory: nvidia-smi and NVML parsing on real H200 outputs, FETCHML_GPUS, detection."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import fetchml.daemon.jobs.inventory as resources
from fetchml.daemon.jobs.inventory import (
    GpuInfo,
    HostInventory,
    detect_gpus,
    detect_inventory,
    parse_gpu_override,
    parse_nvidia_smi_csv,
)
from fetchml.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gpu"
MiB = 1024 * 1024
H200_UUID = "GPU-c4346335-f8f3-1501-8db0-cbb384fc9178"
H200 = GpuInfo(index=0, uuid=H200_UUID, name="NVIDIA H200", memory_total=143771 * MiB,
               memory_used=0)


def nvidia_smi_outputs() -> dict[str, str]:
    """nvidia-smi-queries.txt's blocks, keyed by the command line after each '###'."""
    blocks: dict[str, str] = {}
    command = ""
    for line in (FIXTURES / "nvidia-smi-queries.txt").read_text().splitlines(keepends=True):
        if line.startswith("### "):
            command = line[4:].strip()
            blocks[command] = ""
        else:
            blocks[command] += line
    return blocks


OUTPUTS = nvidia_smi_outputs()
NOHEADER = next(text for command, text in OUTPUTS.items() if "noheader,nounits" in command)
WITH_HEADER = next(text for command, text in OUTPUTS.items() if command.endswith("--format=csv"))
LIST = next(text for command, text in OUTPUTS.items() if command.endswith("nvidia-smi -L"))
IDLE_APPS = next(text for command, text in OUTPUTS.items() if "compute-apps" in command)


# --- parse_nvidia_smi_csv ---------------------------------------------------------------------


def test_parses_the_noheader_form_with_extra_columns() -> None:
    assert len(NOHEADER.split("\n")[0].split(",")) > 5
    assert parse_nvidia_smi_csv(NOHEADER) == [H200]


def test_parses_the_header_and_units_form() -> None:
    assert WITH_HEADER.startswith("index, uuid")
    assert parse_nvidia_smi_csv(WITH_HEADER) == [H200]


def test_parses_several_gpus_and_blank_lines() -> None:
    second = NOHEADER.replace("0, GPU-c4346335", "1, GPU-d4346335")
    second = second.replace(", 0, 143156", ", 2426, 0")
    gpus = parse_nvidia_smi_csv("\n" + NOHEADER + "\n\n" + second + "\n")
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[1].uuid.startswith("GPU-d4346335")
    assert gpus[1].memory_used == 2426 * MiB


def test_header_columns_may_come_in_any_order() -> None:
    text = "name, memory.total [MiB], index, uuid\nNVIDIA H200, 143771 MiB, 3, MIG-abc\n"
    assert parse_nvidia_smi_csv(text) == [
        GpuInfo(index=3, uuid="MIG-abc", name="NVIDIA H200", memory_total=143771 * MiB,
                memory_used=0)
    ]


def test_unknown_memory_reads_as_zero() -> None:
    text = f"0, {H200_UUID}, NVIDIA H200, [N/A], [N/A]\n"
    assert parse_nvidia_smi_csv(text)[0].memory_total == 0


def test_empty_output_is_no_gpus() -> None:
    assert IDLE_APPS.strip() == ""
    assert parse_nvidia_smi_csv(IDLE_APPS) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LIST, "is not a GPU row"),
        ("0, GPU-x, NVIDIA H200\n", "has 3 columns"),
        (f"x, {H200_UUID}, NVIDIA H200, 1, 0\n", "no index"),
        ("0, c4346335, NVIDIA H200, 1, 0\n", "no index or GPU- uuid"),
        (f"0, {H200_UUID}, NVIDIA H200, lots, 0\n", "'lots' where MiB"),
        (NOHEADER + NOHEADER, "index 0 twice"),
        ("index, name, memory.total [MiB]\n", "lacks uuid"),
        ("<html>502 Bad Gateway</html>\n", "not a GPU row"),
    ],
)
def test_garbage_is_rejected_clearly(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_nvidia_smi_csv(text)


# --- FETCHML_GPUS -----------------------------------------------------------------------------


def test_override_declares_gpus_by_index() -> None:
    assert parse_gpu_override("0,1") == [
        GpuInfo(index=0, uuid="override-0", name="override", memory_total=0, memory_used=0),
        GpuInfo(index=1, uuid="override-1", name="override", memory_total=0, memory_used=0),
    ]
    assert [g.index for g in parse_gpu_override(" 2 , 5 ")] == [2, 5]


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_override_is_no_gpus(value: str) -> None:
    assert parse_gpu_override(value) == []


@pytest.mark.parametrize("value", ["a", "0,,1", "-1", "1.5", "0,0", "GPU-c4346335", "0;1"])
def test_bad_override_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="FETCHML_GPUS"):
        parse_gpu_override(value)


# --- detect_gpus: a stub nvidia-smi first on PATH, a fake pynvml on sys.path ----------------------


@pytest.fixture
def stub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only the stubs the test writes; and no pynvml to import."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", str(directory))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    return directory


def write_nvidia_smi(directory: Path, body: str) -> None:
    stub = directory / "nvidia-smi"
    stub.write_text(f'#!/bin/sh\necho "$@" > "{directory}/args"\n{body}\n')
    stub.chmod(0o755)


def test_detect_gpus_runs_nvidia_smi(stub_dir: Path) -> None:
    output = stub_dir / "output.csv"
    output.write_text(NOHEADER)
    write_nvidia_smi(stub_dir, f"exec /bin/cat {output}")
    assert detect_gpus(None) == [H200]
    assert (stub_dir / "args").read_text().split() == [
        "--query-gpu=index,uuid,name,memory.total,memory.used", "--format=csv,noheader,nounits"
    ]


def test_override_wins_over_detection(stub_dir: Path) -> None:
    write_nvidia_smi(stub_dir, "exit 1")
    assert [g.name for g in detect_gpus("3")] == ["override"]
    assert detect_gpus("") == []
    assert not (stub_dir / "args").exists()


@pytest.mark.parametrize(
    ("body", "logged"),
    [
        ("echo 'NVIDIA-SMI has failed' >&2; exit 9", "exit code 9"),
        ("echo 'No devices were found, or garbage'", "cannot read nvidia-smi"),
    ],
)
def test_failing_nvidia_smi_means_no_gpus(
    stub_dir: Path, caplog: pytest.LogCaptureFixture, body: str, logged: str
) -> None:
    write_nvidia_smi(stub_dir, body)
    with caplog.at_level(logging.WARNING, logger=resources.__name__):
        assert detect_gpus(None) == []
    assert logged in caplog.text


def test_hanging_nvidia_smi_times_out(stub_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(resources, "NVIDIA_SMI_TIMEOUT", 0.3)
    write_nvidia_smi(stub_dir, "exec /bin/sleep 30")
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=resources.__name__):
        assert detect_gpus(None) == []
    assert time.monotonic() - began < 5
    assert "did not answer" in caplog.text


def test_no_nvidia_smi_means_no_gpus(stub_dir: Path) -> None:
    assert detect_gpus(None) == []


def nvml_probe() -> tuple[str, str, str, int, int]:
    """(index, name, uuid, total, used) of the device line in nvml-probe.txt."""
    line = (FIXTURES / "nvml-probe.txt").read_text().splitlines()[1]
    index, rest = line.split(" ", 1)
    name, after_name = rest.split(" GPU-", 1)
    uuid, total, used = ("GPU-" + after_name).split()[:3]
    return index, name, uuid, int(total), int(used)


FAKE_PYNVML = '''
class NVMLError(Exception):
    pass

FAIL_INIT = {fail_init}
calls = []

class _Memory:
    total = {total}
    used = {used}
    free = {total} - {used}

def nvmlInit():
    calls.append("init")
    if FAIL_INIT:
        raise NVMLError("Driver Not Loaded")

def nvmlShutdown():
    calls.append("shutdown")

def nvmlDeviceGetCount():
    return 1

def nvmlDeviceGetHandleByIndex(index):
    return ("handle", index)

def nvmlDeviceGetName(handle):
    return {name!r}.encode()  # older pynvml releases return bytes

def nvmlDeviceGetUUID(handle):
    return {uuid!r}

def nvmlDeviceGetMemoryInfo(handle):
    return _Memory()
'''


@pytest.fixture
def fake_pynvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory to write pynvml.py into, put first on sys.path for the test only."""
    directory = tmp_path / "site"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    sys.modules.pop("pynvml", None)
    yield directory
    sys.modules.pop("pynvml", None)


def test_detect_gpus_through_nvml(fake_pynvml: Path, monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path) -> None:
    index, name, uuid, total, used = nvml_probe()
    fake_pynvml.joinpath("pynvml.py").write_text(FAKE_PYNVML.format(
        fail_init=False, name=name, uuid=uuid, total=total, used=used))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: NVML alone must answer
    assert detect_gpus(None) == [
        GpuInfo(index=int(index), uuid=uuid, name="NVIDIA H200", memory_total=150754820096,
                memory_used=3198025728)
    ]
    assert sys.modules["pynvml"].calls == ["init", "shutdown"]


def test_nvml_failure_falls_back_to_nvidia_smi(fake_pynvml: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, name, uuid, total, used = nvml_probe()
    fake_pynvml.joinpath("pynvml.py").write_text(FAKE_PYNVML.format(
        fail_init=True, name=name, uuid=uuid, total=total, used=used))
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "output.csv").write_text(WITH_HEADER)
    write_nvidia_smi(stubs, f"exec /bin/cat {stubs / 'output.csv'}")
    monkeypatch.setenv("PATH", str(stubs))
    assert detect_gpus(None) == [H200]


# --- detect_inventory -------------------------------------------------------------------------


def test_inventory_detects_cpus_and_memory() -> None:
    inventory = detect_inventory("box", gpus_override="", cpus=None, memory=None)
    assert inventory == HostInventory(
        name="box", cpus=len(os.sched_getaffinity(0)), memory=psutil.virtual_memory().total,
        gpus=(),
    )


def test_inventory_overrides_and_dict() -> None:
    inventory = detect_inventory("gpu1", gpus_override="0,1", cpus=8, memory=64 * 1024 * MiB)
    assert inventory.to_dict() == {
        "name": "gpu1",
        "cpus": 8,
        "memory": 64 * 1024 * MiB,
        "gpus": [
            {"index": 0, "uuid": "override-0", "name": "override", "memory": 0},
            {"index": 1, "uuid": "override-1", "name": "override", "memory": 0},
        ],
    }


def test_inventory_dict_reports_total_gpu_memory() -> None:
    inventory = HostInventory(name="h200", cpus=16, memory=1, gpus=(H200,))
    assert inventory.to_dict()["gpus"] == [
        {"index": 0, "uuid": H200_UUID, "name": "NVIDIA H200", "memory": 143771 * MiB}
    ]


@pytest.mark.parametrize(("cpus", "memory"), [(0, None), (None, 0), (-2, None)])
def test_inventory_rejects_impossible_overrides(cpus: int | None, memory: int | None) -> None:
    with pytest.raises(ConfigError):
        detect_inventory("box", gpus_override="", cpus=cpus, memory=memory)
