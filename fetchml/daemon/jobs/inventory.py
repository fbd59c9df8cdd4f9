"""What this host offers jobs: CPUs, memory and GPUs.

GPUs come from ``FETCHML_GPUS`` when it is set (machines without one, tests), else from NVML
through ``pynvml`` when that is installed, else from ``nvidia-smi``, else there are none.
NVML reports memory in bytes; nvidia-smi's CSV in MiB.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import psutil

from fetchml.errors import ConfigError

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
NVIDIA_SMI_TIMEOUT = 10.0  # seconds; a wedged driver can hang nvidia-smi for minutes
NVIDIA_SMI_QUERY = "index,uuid,name,memory.total,memory.used"
NVIDIA_SMI_ARGS = (f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits")
OVERRIDE_NAME = "override"  # the name of GPUs declared through FETCHML_GPUS
# Placeholders nvidia-smi prints where a value is unknown (MIG, some boards).
UNKNOWN_VALUES = frozenset({"[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", ""})
REQUIRED_COLUMNS = ("index", "uuid", "name", "memory.total")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total: int  # bytes; 0 when unknown
    memory_used: int  # bytes; 0 when unknown


@dataclass(frozen=True)
class HostInventory:
    name: str
    cpus: int
    memory: int  # bytes
    gpus: tuple[GpuInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cpus": self.cpus,
            "memory": self.memory,
            "gpus": [
                {"index": g.index, "uuid": g.uuid, "name": g.name, "memory": g.memory_total}
                for g in self.gpus
            ],
        }


def parse_nvidia_smi_csv(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used`` CSV output.

    Takes both ``--format=csv,noheader,nounits`` and ``--format=csv`` (a header line, values
    with units); extra columns and blank lines are ignored. Without a header the columns must
    come in the order above.
    """
    columns = {name: i for i, name in enumerate(NVIDIA_SMI_QUERY.split(","))}
    gpus: list[GpuInfo] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        names = [_column_name(cell) for cell in cells]
        if "index" in names or "uuid" in names:  # the header of --format=csv
            columns = _header_columns(names, number)
            continue
        gpus.append(_parse_gpu_row(cells, columns, number))
    duplicate = _duplicate([gpu.index for gpu in gpus])
    if duplicate is not None:
        raise ConfigError(f"nvidia-smi output lists GPU index {duplicate} twice")
    return gpus


def parse_gpu_override(value: str) -> list[GpuInfo]:
    """``FETCHML_GPUS``: ``"0,1"`` declares GPUs 0 and 1 (memory unknown); ``""`` declares none."""
    if not value.strip():
        return []
    indices: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ConfigError(
                f"FETCHML_GPUS must list GPU indices such as 0,1 (or be empty for none), "
                f"not {value!r}"
            )
        indices.append(int(part))
    duplicate = _duplicate(indices)
    if duplicate is not None:
        raise ConfigError(f"FETCHML_GPUS names GPU {duplicate} twice; list each once")
    return [
        GpuInfo(index=i, uuid=f"{OVERRIDE_NAME}-{i}", name=OVERRIDE_NAME, memory_total=0,
                memory_used=0)
        for i in indices
    ]


def detect_gpus(override: str | None) -> list[GpuInfo]:
    """The GPUs jobs may use: the override if given, else NVML, else nvidia-smi, else none."""
    if override is not None:
        return parse_gpu_override(override)
    gpus = _gpus_from_nvml()
    if gpus is not None:
        return gpus
    return _gpus_from_nvidia_smi()


def detect_inventory(
    name: str, *, gpus_override: str | None, cpus: int | None, memory: int | None
) -> HostInventory:
    """This host's resources; ``cpus`` and ``memory`` (bytes) override what is detected."""
    if cpus is not None and (isinstance(cpus, bool) or cpus < 1):
        raise ConfigError(f"cpus must be at least 1, not {cpus}")
    if memory is not None and (isinstance(memory, bool) or memory < 1):
        raise ConfigError(f"memory must be a positive number of bytes, not {memory}")
    return HostInventory(
        name=name,
        # The CPUs this process may run on: a cgroup cpuset or taskset can give fewer than
        # the machine has.
        cpus=cpus if cpus is not None else len(os.sched_getaffinity(0)),
        memory=memory if memory is not None else psutil.virtual_memory().total,
        gpus=tuple(detect_gpus(gpus_override)),
    )


def _column_name(cell: str) -> str:
    return cell.split("[")[0].strip().lower()  # "memory.total [MiB]" -> "memory.total"


def _header_columns(names: list[str], number: int) -> dict[str, int]:
    missing = [column for column in REQUIRED_COLUMNS if column not in names]
    if missing:
        raise ConfigError(
            f"nvidia-smi header on line {number} lacks {', '.join(missing)}; query "
            f"--query-gpu={NVIDIA_SMI_QUERY}"
        )
    return {name: i for i, name in enumerate(names)}


def _parse_gpu_row(cells: list[str], columns: dict[str, int], number: int) -> GpuInfo:
    needed = max(columns[c] for c in REQUIRED_COLUMNS) + 1
    if len(cells) < needed:
        raise ConfigError(
            f"nvidia-smi line {number} is not a GPU row: it has {len(cells)} columns where "
            f"--query-gpu={NVIDIA_SMI_QUERY} gives at least {needed}: {','.join(cells)!r}"
        )
    index_text = cells[columns["index"]]
    uuid = cells[columns["uuid"]]
    if not index_text.isdigit() or not uuid.startswith(("GPU-", "MIG-")):
        raise ConfigError(
            f"nvidia-smi line {number} is not a GPU row of --query-gpu={NVIDIA_SMI_QUERY} "
            f"(no index or GPU- uuid): {','.join(cells)!r}"
        )
    used_column = columns.get("memory.used")
    used = cells[used_column] if used_column is not None and used_column < len(cells) else ""
    return GpuInfo(
        index=int(index_text),
        uuid=uuid,
        name=cells[columns["name"]],
        memory_total=_mebibytes(cells[columns["memory.total"]], number),
        memory_used=_mebibytes(used, number),
    )


def _mebibytes(text: str, number: int) -> int:
    """'143771' or '143771 MiB' -> bytes; placeholders for unknown -> 0."""
    if text in UNKNOWN_VALUES:
        return 0
    value = text.removesuffix("MiB").strip()
    if not value.isdigit():
        raise ConfigError(f"nvidia-smi line {number} has {text!r} where MiB of memory belong")
    return int(value) * MiB


def _gpus_from_nvml() -> list[GpuInfo] | None:
    """GPUs through NVML, or None when pynvml is missing or NVML cannot start."""
    try:
        pynvml: Any = importlib.import_module("pynvml")  # optional, not a dependency
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.info("NVML is unavailable (%s); trying nvidia-smi", exc)
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuInfo(
                index=index,
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                memory_total=int(memory.total),
                memory_used=int(memory.used),
            ))
        return gpus
    except pynvml.NVMLError as exc:
        logger.warning("NVML failed while listing GPUs (%s); trying nvidia-smi", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            logger.debug("nvmlShutdown failed: %s", exc)


def _gpus_from_nvidia_smi() -> list[GpuInfo]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        result = subprocess.run(
            [executable, *NVIDIA_SMI_ARGS],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi did not answer (%s); assuming no GPUs", exc)
        return []
    if result.returncode != 0:
        logger.warning("nvidia-smi failed with exit code %d (%s); assuming no GPUs",
                       result.returncode, result.stderr.strip() or result.stdout.strip())
        return []
    try:
        return parse_nvidia_smi_csv(result.stdout)
    except ConfigError as exc:
        logger.warning("cannot read nvidia-smi's output (%s); assuming no GPUs", exc)
        return []


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def _duplicate(values: list[int]) -> int | None:
    seen: set[int] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None
