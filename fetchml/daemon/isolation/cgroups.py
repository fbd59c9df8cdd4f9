"""Cgroups for jobs: where the daemon may create them, and one per attempt with its limits.

cgroup v2 is used when the daemon's own cgroup is delegated to it (writable, with the memory or
pids controller available): the daemon moves itself into a leaf (``fetchml-daemon``), since a
v2 cgroup with controllers enabled for its children may hold no process, and creates the jobs'
cgroups beside it under ``fetchml-jobs``. On a v1 (or hybrid) host a controller mounted on its
own hierarchy is used when the daemon may create directories in its cgroup there. Whatever
neither provides falls back to resource limits (see isolation.py).

Each attempt gets ``fetchml-jobs/<tag>-<job>-<attempt>`` in each hierarchy, where tag names
the daemon (several may share a host); the supervisor moves the job in before exec and removes
the directory when the job is gone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from fetchml.errors import Unavailable

log = logging.getLogger(__name__)

CONTROLLERS = frozenset({"memory", "pids"})
DAEMON_LEAF = "fetchml-daemon"
JOBS_DIR = "fetchml-jobs"
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Mount:
    root: str  # the path of the hierarchy that is mounted
    point: str
    fstype: str
    options: frozenset[str]  # super options: the controllers of a v1 hierarchy


@dataclass(frozen=True)
class Hierarchy:
    """A directory the daemon creates job cgroups in, and the controllers it enforces."""

    version: int  # 1 or 2
    base: Path
    controllers: frozenset[str]


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup as {controller: path}; the v2 hierarchy is under the key ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        for name in controllers.split(","):
            if name:
                paths[name] = path
    return paths


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of /proc/PID/mountinfo."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(Mount(root=_unescape(fields[3]), point=_unescape(fields[4]),
                            fstype=rest[0], options=frozenset(rest[2].split(","))))
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def cgroup_dir(mount: Mount, path: str) -> Path | None:
    """Where the cgroup ``path`` (as /proc/self/cgroup names it) is in the filesystem."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None  # our cgroup is outside what is mounted: not reachable
    return Path(mount.point) / path[len(root):].lstrip("/")


class CgroupTree:
    """The hierarchies a daemon creates job cgroups in."""

    def __init__(self, hierarchies: Iterable[Hierarchy], tag: str) -> None:
        self.hierarchies = tuple(hierarchies)
        self.tag = tag

    def enforces(self, controller: str) -> bool:
        return any(controller in h.controllers for h in self.hierarchies)

    def describe(self) -> str:
        return ", ".join(f"{'+'.join(sorted(h.controllers))} (v{h.version} at {h.base})"
                         for h in self.hierarchies) or "nothing"

    def create(self, name: str, memory: int | None, pids: int | None) -> tuple[str, ...]:
        """The job's cgroup directories, made with these limits (None: not limited there)."""
        made: list[str] = []
        try:
            for h in self.hierarchies:
                wants_memory = memory is not None and "memory" in h.controllers
                wants_pids = pids is not None and "pids" in h.controllers
                if not (wants_memory or wants_pids):
                    continue
                path = h.base / f"{self.tag}-{name}"
                try:
                    path.mkdir()
                except FileExistsError:  # left by an attempt that never ran: start afresh
                    path.rmdir()
                    path.mkdir()
                made.append(str(path))
                if wants_memory:
                    assert memory is not None
                    _limit_memory(path, h.version, memory)
                if wants_pids:
                    _write(path / "pids.max", str(pids))
        except OSError as exc:
            for path_text in made:
                with contextlib.suppress(OSError):
                    os.rmdir(path_text)
            raise Unavailable(f"the job's cgroup cannot be set up ({exc.strerror}: "
                              f"{exc.filename}); check the daemon's cgroup delegation") from exc
        return tuple(made)

    def sweep(self) -> int:
        """Remove this daemon's job cgroups that hold no process (their supervisor died)."""
        removed = 0
        for h in self.hierarchies:
            with contextlib.suppress(OSError), os.scandir(h.base) as entries:
                for entry in entries:
                    if entry.name.startswith(f"{self.tag}-") and entry.is_dir():
                        try:
                            os.rmdir(entry.path)
                            removed += 1
                        except OSError:
                            continue  # busy: a job still runs there
        return removed


def _limit_memory(path: Path, version: int, memory: int) -> None:
    if version == 2:
        _write(path / "memory.max", str(memory))
        _write_if_present(path / "memory.swap.max", "0")  # no swapping past the limit
        _write_if_present(path / "memory.oom.group", "1")  # one OOM kill ends the whole job
    else:
        _write(path / "memory.limit_in_bytes", str(memory))
        _write_if_present(path / "memory.memsw.limit_in_bytes", str(memory))


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_if_present(path: Path, text: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _write(path, text)


def detect(tag: str) -> tuple[CgroupTree, list[str]]:
    """Where this daemon can put job cgroups; the list says why some controllers are missing."""
    notes: list[str] = []
    try:
        own = parse_proc_cgroup(PROC_CGROUP.read_text())
        mounts = parse_mountinfo(PROC_MOUNTINFO.read_text())
    except OSError as exc:
        return CgroupTree((), tag), [f"cgroups unreadable: {exc.strerror}"]
    hierarchies: list[Hierarchy] = []
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v2 is not None and "" in own:
        found = _prepare_v2(v2, own[""], notes)
        if found is not None:
            hierarchies.append(found)
    covered = {c for h in hierarchies for c in h.controllers}
    for controller in sorted(CONTROLLERS - covered):
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options),
                     None)
        if mount is None or controller not in own:
            notes.append(f"no cgroup hierarchy offers the {controller} controller")
            continue
        found = _prepare_v1(mount, own[controller], controller, notes)
        if found is not None:
            hierarchies.append(found)
    return CgroupTree(hierarchies, tag), notes


def _prepare_v1(mount: Mount, path: str, controller: str, notes: list[str]) -> Hierarchy | None:
    mine = cgroup_dir(mount, path)
    if mine is None:
        notes.append(f"the daemon's {controller} cgroup {path} is outside the mounted tree")
        return None
    base = mine / JOBS_DIR
    try:
        base.mkdir(exist_ok=True)
    except OSError as exc:
        notes.append(f"cannot create {base} ({exc.strerror})")
        return None
    return Hierarchy(1, base, frozenset({controller}))


def _prepare_v2(mount: Mount, path: str, notes: list[str]) -> Hierarchy | None:
    mine = cgroup_dir(mount, path)
    if mine is None:
        notes.append(f"the daemon's cgroup {path} is outside the mounted cgroup2 tree")
        return None
    if mine.name == DAEMON_LEAF:  # moved there by an earlier start
        mine = mine.parent
    try:
        available = CONTROLLERS & set((mine / "cgroup.controllers").read_text().split())
    except OSError as exc:
        notes.append(f"cannot read {mine}/cgroup.controllers ({exc.strerror})")
        return None
    if not available:
        notes.append(f"cgroup v2 at {mine} offers neither memory nor pids")
        return None
    enable = " ".join(f"+{c}" for c in sorted(available))
    try:
        _enable_for_children(mine, available, enable)
        base = mine / JOBS_DIR
        base.mkdir(exist_ok=True)
        _write(base / "cgroup.subtree_control", enable)
    except _Refused as exc:
        notes.append(str(exc))
        return None
    except OSError as exc:
        notes.append(f"cgroup v2 at {mine} is not delegated to the daemon ({exc.strerror})")
        return None
    return Hierarchy(2, base, frozenset(available))


class _Refused(Exception):
    """The daemon's cgroup holds processes that are not the daemon's: it is not ours."""


def _enable_for_children(mine: Path, available: frozenset[str], enable: str) -> None:
    enabled = set((mine / "cgroup.subtree_control").read_text().split())
    if available <= enabled:
        return
    try:
        _write(mine / "cgroup.subtree_control", enable)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    # EBUSY: processes live in our cgroup. Move them to a leaf, if all of them are ours.
    members = {int(p) for p in (mine / "cgroup.procs").read_text().split()}
    me = psutil.Process()
    ours = {me.pid} | {child.pid for child in me.children(recursive=True)}
    if members - ours:
        raise _Refused(f"cgroup v2 at {mine} also holds other programs' processes; run the "
                       "daemon in a cgroup of its own (systemd: Delegate=yes)")
    leaf = mine / DAEMON_LEAF
    leaf.mkdir(exist_ok=True)
    for pid in sorted(members):
        with contextlib.suppress(ProcessLookupError):
            _write(leaf / "cgroup.procs", str(pid))
    _write(mine / "cgroup.subtree_control", enable)
