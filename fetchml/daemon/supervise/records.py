"""A run directory's records: how to run the attempt and what became of it.

The daemon writes ``spec.json`` (``RunSpec``); the per-job supervisor writes
``supervisor.json`` (``SupervisorInfo``) once the job started and ``status.json``
(``RunStatus``) last of all. ``processes`` checks the processes they name.

This module stays light (no asyncio at import time): the supervisor imports it too, and every
module the launcher carries makes each of its forks dearer.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import resource
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fetchml.daemon.supervise.rundir import DEFAULT_LOG, STATUS_FILE, SUPERVISOR_FILE, RunDir
from fetchml.errors import BadRequest

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")
logger = logging.getLogger(__name__)

DEFAULT_KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL, like systemd's default
DEFAULT_UMASK = 0o022
REASONS = frozenset({"exited", "timeout", "cancelled", "spawn_failed", "limit"})
# Which limit stopped a job whose reason is "limit".
LIMITS = frozenset({"memory", "processes", "log", "output"})
MAX_ID = 2**32 - 2  # uid_t and gid_t are 32 bits, and -1 means "no id"


@dataclass(frozen=True)
class RunSpec:
    """How to run one attempt: the content of spec.json. Validated on construction."""

    argv: tuple[str, ...]
    env: Mapping[str, str]  # the complete environment: nothing is inherited
    cwd: str
    timeout: float | None = None  # seconds of wall clock from the start
    kill_grace: float = DEFAULT_KILL_GRACE
    log: str = DEFAULT_LOG  # a file name inside the run directory
    rlimits: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # name -> (soft, hard)
    cpu_affinity: tuple[int, ...] | None = None
    umask: int = DEFAULT_UMASK
    # Limits the supervisor enforces (None: unlimited). The job joins each cgroup directory
    # before exec; memory and processes are enforced there when a cgroup holds them.
    cgroups: tuple[str, ...] = ()
    memory_limit: int | None = None  # bytes
    max_processes: int | None = None
    max_log_bytes: int | None = None
    max_output_bytes: int | None = None
    output_dir: str | None = None  # absolute: the directory max_output_bytes bounds
    # The first levels of the job's tree that are a sandbox's own processes (bwrap and its
    # pid 1): they die with everything under them, so SIGTERM goes only to what they run.
    wrapper_depth: int = 0
    # Who the job runs as (None: the supervisor's own user). Set only by a root daemon, for a
    # job whose owner is not local root: the job drops to this uid, gid and these groups
    # before exec, so it can touch nothing of the daemon's.
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check(
            bool(self.argv) and all(isinstance(a, str) for a in self.argv),
            "argv must be a non-empty list of strings",
        )
        _check(all("\0" not in a for a in self.argv), "argv must not contain NUL characters")
        _check(
            all(isinstance(k, str) and isinstance(v, str) for k, v in self.env.items())
            and all(k and "=" not in k and "\0" not in k + v for k, v in self.env.items()),
            "env must map variable names (no '=' or NUL) to strings",
        )
        _check(
            isinstance(self.cwd, str) and os.path.isabs(self.cwd), "cwd must be an absolute path"
        )
        _check(
            self.timeout is None or (_is_number(self.timeout) and 0 < self.timeout < math.inf),
            "timeout must be a positive number of seconds or null",
        )
        _check(
            _is_number(self.kill_grace) and 0 <= self.kill_grace < math.inf,
            "kill_grace must be a number of seconds >= 0",
        )
        _check(
            isinstance(self.log, str) and self.log not in ("", ".", "..") and "/" not in self.log,
            "log must be a plain file name inside the run directory",
        )
        for name, (soft, hard) in self.rlimits.items():
            _check(
                name.startswith("RLIMIT_") and isinstance(getattr(resource, name, None), int),
                f"unknown resource limit {name!r}; use names such as RLIMIT_AS or RLIMIT_NPROC",
            )
            _check(
                _is_limit(soft) and _is_limit(hard) and _limit_le(soft, hard),
                f"{name} must be a limit >= 0, or [soft, hard] with soft <= hard",
            )
        _check(
            self.cpu_affinity is None
            or (
                bool(self.cpu_affinity)
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                        for c in self.cpu_affinity)
            ),
            "cpu_affinity must be null or a non-empty list of CPU numbers",
        )
        _check(
            isinstance(self.umask, int) and not isinstance(self.umask, bool)
            and 0 <= self.umask <= 0o777,
            "umask must be an integer between 0 and 0o777",
        )
        _check(all(isinstance(c, str) and os.path.isabs(c) for c in self.cgroups),
               "cgroups must be a list of absolute cgroup directories")
        for key in ("memory_limit", "max_processes", "max_log_bytes", "max_output_bytes"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                     and value > 0), f"{key} must be a positive integer or null")
        _check(self.output_dir is None
               or (isinstance(self.output_dir, str) and os.path.isabs(self.output_dir)),
               "output_dir must be an absolute path or null")
        _check(self.max_output_bytes is None or self.output_dir is not None,
               "max_output_bytes needs output_dir")
        _check(isinstance(self.wrapper_depth, int) and not isinstance(self.wrapper_depth, bool)
               and 0 <= self.wrapper_depth <= 8, "wrapper_depth must be an integer from 0 to 8")
        _check((self.uid is None) == (self.gid is None), "uid and gid go together")
        _check(all(_is_id(i) for i in (self.uid, self.gid) if i is not None)
               and all(_is_id(g) for g in self.groups),
               "uid, gid and groups must be ids from 0 to 4294967294")
        _check(self.uid is not None or not self.groups, "groups need a uid and gid")

    def resource_limits(self) -> list[tuple[int, int, int]]:
        """(resource constant, soft, hard) for ``resource.setrlimit``."""
        return [(getattr(resource, name), soft, hard) for name, (soft, hard) in
                self.rlimits.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": self.cwd,
            "timeout": self.timeout,
            "kill_grace": self.kill_grace,
            "log": self.log,
            "rlimits": {name: list(limits) for name, limits in self.rlimits.items()},
            "cpu_affinity": None if self.cpu_affinity is None else list(self.cpu_affinity),
            "umask": self.umask,
            "cgroups": list(self.cgroups),
            "memory_limit": self.memory_limit,
            "max_processes": self.max_processes,
            "max_log_bytes": self.max_log_bytes,
            "max_output_bytes": self.max_output_bytes,
            "output_dir": self.output_dir,
            "wrapper_depth": self.wrapper_depth,
            "uid": self.uid,
            "gid": self.gid,
            "groups": list(self.groups),
        }

    @classmethod
    def from_dict(cls, data: object) -> RunSpec:
        """Build from parsed spec.json; BadRequest says which field is wrong."""
        _check(isinstance(data, dict), "the spec must be a JSON object")
        assert isinstance(data, dict)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown spec fields {unknown}; remove them")
        _check("argv" in data and "cwd" in data, "the spec needs at least argv and cwd")
        kwargs = dict(data)
        _check(isinstance(kwargs["argv"], list), "argv must be a non-empty list of strings")
        kwargs["argv"] = tuple(kwargs["argv"])
        _check(isinstance(kwargs.get("env", {}), dict), "env must be an object of strings")
        kwargs["env"] = dict(kwargs.get("env", {}))
        if kwargs.get("timeout") is not None:
            _check(_is_number(kwargs["timeout"]), "timeout must be a number of seconds or null")
            kwargs["timeout"] = float(kwargs["timeout"])
        for key in ("kill_grace", "umask", "log", "cgroups", "wrapper_depth"):  # null: default
            if key in kwargs and kwargs[key] is None:
                del kwargs[key]
        rlimits = kwargs.get("rlimits") or {}
        _check(isinstance(rlimits, dict), "rlimits must be an object of limits")
        kwargs["rlimits"] = {name: _soft_hard(name, value) for name, value in rlimits.items()}
        affinity = kwargs.get("cpu_affinity")
        if affinity is not None:
            _check(isinstance(affinity, list), "cpu_affinity must be null or a list of CPUs")
            kwargs["cpu_affinity"] = tuple(affinity)
        if "cgroups" in kwargs:
            _check(isinstance(kwargs["cgroups"], list), "cgroups must be a list of directories")
            kwargs["cgroups"] = tuple(kwargs["cgroups"])
        if kwargs.get("groups") is None:
            kwargs.pop("groups", None)
        else:
            _check(isinstance(kwargs["groups"], list), "groups must be a list of group ids")
            kwargs["groups"] = tuple(kwargs["groups"])
        return cls(**kwargs)


@dataclass(frozen=True)
class SupervisorInfo:
    """supervisor.json: who supervises the job, and the job's own identity."""

    pid: int
    create_time: float
    job_pid: int
    job_pgid: int
    job_create_time: float
    started_at: float

    @classmethod
    def from_dict(cls, data: object) -> SupervisorInfo:
        _check(isinstance(data, dict), f"{SUPERVISOR_FILE} must hold a JSON object")
        assert isinstance(data, dict)
        for key in ("pid", "job_pid", "job_pgid"):
            value = data.get(key)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                   f"{key} must be a positive integer")
        for key in ("create_time", "job_create_time", "started_at"):
            _check(_is_number(data.get(key)), f"{key} must be a number")
        return cls(
            pid=data["pid"],
            create_time=float(data["create_time"]),
            job_pid=data["job_pid"],
            job_pgid=data["job_pgid"],
            job_create_time=float(data["job_create_time"]),
            started_at=float(data["started_at"]),
        )


@dataclass(frozen=True)
class RunStatus:
    """status.json: how the attempt ended. Written last; its presence means the tree is gone."""

    exit_code: int | None
    signal: int | None
    reason: str  # one of REASONS
    error: str | None
    started_at: float
    finished_at: float
    peak_rss: int  # bytes
    cpu_time: float  # seconds, user + system, whole tree
    limit: str | None = None  # one of LIMITS when reason is "limit"; error then says more

    @classmethod
    def from_dict(cls, data: object) -> RunStatus:
        _check(isinstance(data, dict), f"{STATUS_FILE} must hold a JSON object")
        assert isinstance(data, dict)
        for key in ("exit_code", "signal"):
            value = data.get(key)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool)),
                   f"{key} must be an integer or null")
        _check(data.get("reason") in REASONS, f"reason must be one of {sorted(REASONS)}")
        _check(data.get("error") is None or isinstance(data.get("error"), str),
               "error must be a string or null")
        for key in ("started_at", "finished_at", "cpu_time"):
            _check(_is_number(data.get(key)), f"{key} must be a number")
        peak = data.get("peak_rss")
        _check(isinstance(peak, int) and not isinstance(peak, bool), "peak_rss must be an integer")
        _check(data.get("limit") is None or data.get("limit") in LIMITS,
               f"limit must be one of {sorted(LIMITS)} or null")
        return cls(
            exit_code=data["exit_code"],
            signal=data["signal"],
            reason=data["reason"],
            error=data["error"],
            started_at=float(data["started_at"]),
            finished_at=float(data["finished_at"]),
            peak_rss=data["peak_rss"],
            cpu_time=float(data["cpu_time"]),
            limit=data.get("limit"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``.

    No fsync: the rename keeps readers from ever seeing half a file across a daemon or
    supervisor crash, and a host crash ends the job anyway. Mode 0600: a run directory may
    let other users' jobs through, and its records are the daemon's alone.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        os.write(fd, json.dumps(dict(data)).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_status(run_dir: Path) -> RunStatus | None:
    """The attempt's final status, or None while there is none (or it is unreadable)."""
    data = _read_json(RunDir(Path(run_dir)).status)
    return None if data is None else _parse(RunStatus.from_dict, data, run_dir)


def read_supervisor_info(run_dir: Path) -> SupervisorInfo | None:
    """Who supervises the attempt, or None before the job started (or if unreadable)."""
    data = _read_json(RunDir(Path(run_dir)).supervisor)
    return None if data is None else _parse(SupervisorInfo.from_dict, data, run_dir)

def _read_json(path: Path) -> object | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            logger.warning("cannot read %s: %s", path, exc.strerror)
        return None
    try:
        with os.fdopen(fd, "rb") as file:
            data: object = json.loads(file.read())
    except (OSError, ValueError) as exc:
        logger.debug("ignoring unreadable %s: %s", path, exc)
        return None
    return data


def _parse(build: Callable[[object], T], data: object, run_dir: Path) -> T | None:
    try:
        return build(data)
    except BadRequest as exc:
        logger.warning("ignoring a malformed record in %s: %s", run_dir, exc)
        return None


def _soft_hard(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, list) and len(value) == 2:
        return (value[0], value[1])
    _check(_is_limit(value), f"{name} must be a limit >= 0, or [soft, hard]")
    assert isinstance(value, int)
    return (value, value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def _is_limit(value: object) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return value >= 0 or value == resource.RLIM_INFINITY


def _limit_le(soft: int, hard: int) -> bool:
    if hard == resource.RLIM_INFINITY:
        return True
    return soft != resource.RLIM_INFINITY and soft <= hard


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise BadRequest(message)
