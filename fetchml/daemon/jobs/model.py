"""The job model: states, a job's request (``JobSpec``, ``Resources``), a recorded ``Job``,
an attempt's result and a claim. The stores persist these (``store/contract.py``).

The values here are frozen dataclasses that check themselves on construction and raise
``BadRequest`` with one actionable sentence, so a bad job from the wire never reaches a store.
``to_dict``/``from_dict`` turn them into plain JSON/msgpack-able types and back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Any, Self

from fetchml.errors import BadRequest


class JobState(StrEnum):
    HELD = "held"  # waiting for its ``after`` jobs to succeed
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # its host or supervisor vanished and it may not be retried


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.LOST}
)
ACTIVE_STATES: frozenset[JobState] = frozenset({JobState.HELD, JobState.QUEUED, JobState.RUNNING})

MIN_PRIORITY = 1
MAX_PRIORITY = 10
DEFAULT_PRIORITY = 5
_SNAPSHOT_ID = re.compile(r"[0-9a-f]{64}")
_JOB_ID_TEXT = re.compile(r"[0-9]{1,18}")  # 18 digits stay inside SQLite's signed 64-bit ids


# --- checks shared by the dataclasses below -------------------------------------------------


def _int(value: object, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        wanted = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise BadRequest(f"{name} must be an integer {wanted}, not {value}")
    return value


def _float(value: object, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number of seconds, not {value!r}")
    if value < 0 or (positive and value == 0):
        raise BadRequest(f"{name} must be {'above' if positive else 'at least'} zero, not {value}")
    return float(value)


def _str(value: object, name: str, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not {value!r}")
    if nonempty and not value:
        raise BadRequest(f"{name} must not be empty")
    if "\0" in value:
        raise BadRequest(f"{name} must not contain a NUL character")
    return value


def _optional(check: Any, value: object, name: str, **kwargs: Any) -> Any:
    return None if value is None else check(value, name, **kwargs)


def _str_tuple(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise BadRequest(f"{name} must be a list of strings, not {value!r}")
    return tuple(_str(item, f"each item of {name}") for item in value)


def _int_tuple(value: object, name: str, low: int) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise BadRequest(f"{name} must be a list of integers, not {value!r}")
    return tuple(_int(item, f"each item of {name}", low) for item in value)


def _str_map(value: object, name: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise BadRequest(f"{name} must be a mapping of strings to strings, not {value!r}")
    return {
        _str(key, f"each key of {name}", nonempty=True): _str(item, f"{name}[{key!r}]")
        for key, item in value.items()
    }


def _plain(value: object) -> Any:
    """One field as a JSON/msgpack-able value."""
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Resources):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _kwargs_from(cls: type[Any], data: object, *, strict: bool) -> dict[str, Any]:
    """The constructor arguments of dataclass ``cls`` read from ``data``."""
    if not isinstance(data, Mapping):
        raise BadRequest(f"a {cls.__name__} must be a mapping, not {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(str(key) for key in data if key not in names)
    if strict and unknown:
        raise BadRequest(f"unknown {cls.__name__} field {unknown[0]!r}; check its spelling")
    missing = [
        f.name
        for f in fields(cls)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data
    ]
    if missing:
        raise BadRequest(f"a {cls.__name__} needs the field {missing[0]!r}")
    return {name: data[name] for name in names if name in data}


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What a job needs on a host: CPU slots, memory in bytes (0 = not stated), whole GPUs."""

    cpus: int = 1
    memory: int = 0
    gpus: int = 0

    def __post_init__(self) -> None:
        _int(self.cpus, "cpus", 1)
        _int(self.memory, "memory", 0)
        _int(self.gpus, "gpus", 0)

    def to_dict(self) -> dict[str, int]:
        return {"cpus": self.cpus, "memory": self.memory, "gpus": self.gpus}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Resources:
        return cls(**_kwargs_from(cls, data, strict=True))


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a submit carries: everything about a job that the user chooses."""

    name: str
    owner: str
    snapshot: str  # 64-hex snapshot id of the tree the job runs on
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # additions to the job's environment
    workdir: str = ""  # relative to the snapshot root; "" is the root itself
    priority: int = DEFAULT_PRIORITY
    resources: Resources = field(default_factory=Resources)
    timeout: float | None = None  # seconds of wall time per attempt
    max_attempts: int = 1  # retries + 1
    after: tuple[int, ...] = ()  # ids of jobs that must succeed first
    labels: Mapping[str, str] = field(default_factory=dict)  # free-form tags
    # Dataset versions the job reads, resolved at submit: "NAME@VERSION" or
    # "NAME@VERSION:MOUNT" (MOUNT a path inside the workspace).
    datasets: tuple[str, ...] = ()
    isolation: str | None = None  # "none", "bwrap", "podman"; None: the daemon's default
    network: bool = False  # asks for the network inside a sandbox (if the daemon allows it)

    def __post_init__(self) -> None:
        _str(self.name, "name")
        _str(self.owner, "owner", nonempty=True)
        if not isinstance(self.snapshot, str) or not _SNAPSHOT_ID.fullmatch(self.snapshot):
            raise BadRequest(f"snapshot must be a 64-hex snapshot id, not {self.snapshot!r}")
        _set(self, "argv", _str_tuple(self.argv, "argv"))
        if not self.argv or not self.argv[0]:
            raise BadRequest("argv must name a command to run")
        _set(self, "env", _str_map(self.env, "env"))
        if any("=" in key for key in self.env):
            raise BadRequest("an env variable name must not contain '='")
        _str(self.workdir, "workdir")
        _int(self.priority, "priority", MIN_PRIORITY, MAX_PRIORITY)
        if not isinstance(self.resources, Resources):
            raise BadRequest(f"resources must be a Resources value, not {self.resources!r}")
        _set(self, "timeout", _optional(_float, self.timeout, "timeout", positive=True))
        _int(self.max_attempts, "max_attempts", 1)
        _set(self, "after", _int_tuple(self.after, "after", 1))
        _set(self, "labels", _str_map(self.labels, "labels"))
        _set(self, "datasets", _str_tuple(self.datasets, "datasets"))
        _optional(_str, self.isolation, "isolation")
        if not isinstance(self.network, bool):
            raise BadRequest(f"network must be true or false, not {self.network!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON/msgpack-able types."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The value ``to_dict`` made; unknown keys are refused (they are likely typos)."""
        return cls._build(data, strict=True)

    @classmethod
    def _build(cls, data: Mapping[str, Any], *, strict: bool) -> Self:
        kwargs = _kwargs_from(cls, data, strict=strict)
        if "resources" in kwargs and not isinstance(kwargs["resources"], Resources):
            kwargs["resources"] = Resources.from_dict(kwargs["resources"])
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class Job(JobSpec):
    """A stored job: its spec plus what the store and the runners recorded about it."""

    id: int  # assigned by the store: increasing, never reused
    state: JobState
    attempt: int = 0  # 0 until first claimed; each claim adds 1
    reason: str | None = None  # why it was cancelled, failed, retried or lost
    created_at: float
    queued_at: float | None = None  # when it last entered the queue; the scheduler ages from it
    started_at: float | None = None
    finished_at: float | None = None
    host: str | None = None
    gpu_ids: tuple[int, ...] = ()
    exit_code: int | None = None
    signal: int | None = None
    peak_rss: int | None = None  # bytes
    cpu_time: float | None = None  # seconds, user + system
    outputs: str | None = None  # snapshot id of the ingested outputs
    # Why outputs the attempt wrote are not stored (they stay in its run directory), or None.
    outputs_error: str | None = None
    # What the job should know about its outputs: entries left out of them, and why.
    warnings: tuple[str, ...] = ()
    cancel_requested: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _int(self.id, "id", 1)
        try:
            _set(self, "state", JobState(self.state))
        except ValueError as exc:
            raise BadRequest(f"state must be one of {', '.join(JobState)}") from exc
        _int(self.attempt, "attempt", 0)
        _optional(_str, self.reason, "reason")
        for name in ("created_at", "queued_at", "started_at", "finished_at", "cpu_time"):
            value = getattr(self, name)
            if name == "created_at" or value is not None:
                _set(self, name, _float(value, name))
        _optional(_str, self.host, "host")
        _set(self, "gpu_ids", _int_tuple(self.gpu_ids, "gpu_ids", 0))
        _optional(_int, self.exit_code, "exit_code")
        _optional(_int, self.signal, "signal", low=1)
        _optional(_int, self.peak_rss, "peak_rss", low=0)
        _optional(_str, self.outputs, "outputs")
        _optional(_str, self.outputs_error, "outputs_error")
        _set(self, "warnings", _str_tuple(self.warnings, "warnings"))
        if not isinstance(self.cancel_requested, bool):
            raise BadRequest(
                f"cancel_requested must be true or false, not {self.cancel_requested!r}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The value ``to_dict`` made; unknown keys are ignored so newer peers can add some."""
        return cls._build(data, strict=False)

    @property
    def spec(self) -> JobSpec:
        """The spec this job was submitted with (to resubmit it, for example)."""
        return JobSpec(**{f.name: getattr(self, f.name) for f in fields(JobSpec)})


@dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended, as its runner reports it to ``JobStore.finish``."""

    state: JobState  # succeeded, failed, cancelled or lost
    exit_code: int | None = None
    signal: int | None = None
    peak_rss: int | None = None
    cpu_time: float | None = None
    outputs: str | None = None
    reason: str | None = None
    outputs_error: str | None = None  # why outputs it wrote are not stored
    warnings: tuple[str, ...] = ()  # entries left out of the outputs, and why

    def __post_init__(self) -> None:
        if self.state not in TERMINAL_STATES:
            raise BadRequest(
                f"an attempt ends succeeded, failed, cancelled or lost, not {self.state}"
            )
        _optional(_int, self.exit_code, "exit_code")
        _optional(_int, self.signal, "signal", low=1)
        _optional(_int, self.peak_rss, "peak_rss", low=0)
        _set(self, "cpu_time", _optional(_float, self.cpu_time, "cpu_time"))
        _optional(_str, self.outputs, "outputs")
        _optional(_str, self.reason, "reason")
        _optional(_str, self.outputs_error, "outputs_error")
        _set(self, "warnings", _str_tuple(self.warnings, "warnings"))


@dataclass(frozen=True)
class Claim:
    """A scheduler's request to start ``job_id``, valid only while it is queued at ``attempt``."""

    job_id: int
    attempt: int  # the attempt number the caller saw on the queued job
    host: str
    gpu_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _int(self.job_id, "job_id", 1)
        _int(self.attempt, "attempt", 0)
        _str(self.host, "host", nonempty=True)
        _set(self, "gpu_ids", _int_tuple(self.gpu_ids, "gpu_ids", 0))


# --- the contract ----------------------------------------------------------------------------
