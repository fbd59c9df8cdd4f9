"""Isolated runs and per-job limits: how each attempt's RunSpec is rewritten before it starts.

Modes: ``none`` (a plain process), ``bwrap`` (bubblewrap: see sandbox.py) and ``podman`` (a
rootless container). The daemon's ``isolation`` setting is the default; a job may ask for it
or one of ``isolation_choices``.

Limits, in every mode: memory (the job's ``--memory``) and processes (``job_max_processes``)
in a cgroup of the job's own where the daemon has one (cgroups.py), else RLIMIT_AS and
RLIMIT_NPROC, which are weaker (logged once at start); CPUs by affinity to as many CPUs as the
job asked for, the least used first; log and output sizes, measured by the supervisor. Under
podman the container engine enforces memory, processes and CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from fetchml.config import DaemonSettings
from fetchml.daemon.isolation import cgroups
from fetchml.daemon.isolation.sandbox import (
    BWRAP_WRAPPER_DEPTH,
    SYSTEM_PATHS,
    Layout,
    PodmanOptions,
    bwrap_argv,
    command_visible,
    podman_argv,
    podman_env_file,
)
from fetchml.daemon.jobs.model import Job, JobState
from fetchml.daemon.security.job_identity import JobCredentials, resolve_job_user
from fetchml.daemon.supervise.records import RunSpec
from fetchml.daemon.supervise.rundir import RunDir
from fetchml.errors import BadRequest, ConfigError

log = logging.getLogger(__name__)

MODES = ("none", "bwrap", "podman")
PROBE_TIMEOUT_S = 10.0  # a bwrap or podman that cannot run `true` in this long is broken
PODMAN_REMOVE_TIMEOUT_S = 30.0  # `podman rm -f` of a container left by a killed podman run
# No program starts in less memory than this: a smaller --memory only counts against the
# host's offer (an accounting unit, as with FETCHML_MEMORY=100) and is not enforced.
MIN_ENFORCED_MEMORY = 1 << 20


def allowed_modes(settings: DaemonSettings) -> tuple[str, ...]:
    """The modes jobs on this daemon may ask for: the default and the admin's choices."""
    return tuple(dict.fromkeys([settings.isolation, *settings.isolation_choices]))


def job_isolation(settings: DaemonSettings, value: object) -> str | None:
    """A job's ``isolation`` field, checked against what this daemon allows (None: default)."""
    if value is None:
        return None
    allowed = allowed_modes(settings)
    if not isinstance(value, str) or value not in allowed:
        raise BadRequest(f"isolation {value!r} is not offered here; choose one of "
                         f"{', '.join(allowed)} (the daemon's isolation_choices)")
    return value


class CpuPool:
    """Which CPUs each running attempt is pinned to; a new one gets the least used."""

    def __init__(self, cpus: Iterable[int]) -> None:
        self.cpus = sorted(cpus)
        self._users = dict.fromkeys(self.cpus, 0)
        self._held: dict[tuple[int, int], tuple[int, ...]] = {}
        self._lock = threading.Lock()  # taken from the runner's preparing threads and the loop

    def take(self, job_id: int, attempt: int, count: int) -> tuple[int, ...] | None:
        """``count`` CPUs for this attempt; None when it may use them all."""
        if count >= len(self.cpus):
            return None
        with self._lock:
            self._release((job_id, attempt))
            chosen = tuple(sorted(sorted(self.cpus, key=lambda c: self._users[c])[:count]))
            self._hold((job_id, attempt), chosen)
            return chosen

    def hold(self, job_id: int, attempt: int, cpus: Iterable[int]) -> None:
        """Count CPUs an attempt already runs on (one re-adopted after a restart)."""
        with self._lock:
            self._release((job_id, attempt))
            self._hold((job_id, attempt), tuple(c for c in cpus if c in self._users))

    def release_except(self, job_id: int, running_attempt: int | None) -> None:
        """Free the CPUs of this job's attempts other than the one still running."""
        with self._lock:
            for key in [k for k in self._held if k[0] == job_id and k[1] != running_attempt]:
                self._release(key)

    def in_use(self) -> dict[int, int]:
        with self._lock:
            return dict(self._users)

    def _hold(self, key: tuple[int, int], cpus: tuple[int, ...]) -> None:
        for cpu in cpus:
            self._users[cpu] += 1
        self._held[key] = cpus

    def _release(self, key: tuple[int, int]) -> None:
        for cpu in self._held.pop(key, ()):
            self._users[cpu] -= 1


class Isolation:
    """The runner's ``spec`` hook: limits for every job, and the sandbox of its mode."""

    def __init__(self, settings: DaemonSettings, *, base_env: dict[str, str],
                 tree: cgroups.CgroupTree, cpus: CpuPool, bwrap: str | None,
                 podman: str | None) -> None:
        self.settings, self.base_env, self.tree, self.cpus = settings, base_env, tree, cpus
        self.bwrap, self.podman = bwrap, podman
        self.state_dir = settings.state_dir.absolute()
        self.containers: dict[int, str] = {}  # job id -> container of its running attempt
        self._tasks: set[asyncio.Task[None]] = set()

    def mode_of(self, job: Job) -> str:
        return job.isolation or self.settings.isolation

    def rewrite(self, spec: RunSpec, job: Job, run_dir: Path) -> RunSpec:
        """The spec hook (runs in a worker thread while the attempt is prepared)."""
        mode = self.mode_of(job)
        if mode not in allowed_modes(self.settings):  # the settings changed since it queued
            raise BadRequest(f"isolation {mode!r} is no longer offered by this daemon; queue "
                             f"the job again with one of {', '.join(allowed_modes(self.settings))}")
        s = self.settings
        memory = job.resources.memory or None
        if memory is not None and memory < MIN_ENFORCED_MEMORY:
            log.warning("job %d: memory %d bytes is too small to enforce; not limited",
                        job.id, memory)
            memory = None
        outputs = str(RunDir(run_dir).outputs)
        cpus = self.cpus.take(job.id, job.attempt, job.resources.cpus)
        spec = replace(spec, max_log_bytes=s.job_max_log_bytes, cpu_affinity=cpus,
                       max_output_bytes=s.job_max_output_bytes, output_dir=outputs)
        layout = Layout(run_dir=run_dir, cwd=spec.cwd, state_dir=self.state_dir)
        if mode == "podman":
            return self._podman(spec, job, layout, memory, cpus)
        if mode == "bwrap" and not command_visible(spec.argv[0], spec.env,
                                                   [*SYSTEM_PATHS, str(layout.work)], spec.cwd):
            raise BadRequest(f"command not found inside the bwrap sandbox: {spec.argv[0]} (it "
                             "sees only /usr, /bin, /opt and the like, and the job's workspace)")
        wrapper = BWRAP_WRAPPER_DEPTH if mode == "bwrap" else 0
        spec = self._limits(spec, job, memory, wrapper)
        if mode == "bwrap":
            assert self.bwrap is not None
            argv = bwrap_argv(self.bwrap, layout, spec.argv, network=s.job_network and job.network,
                              gpu_ids=job.gpu_ids)
            spec = replace(spec, argv=tuple(argv), wrapper_depth=wrapper)
        return spec

    def _limits(self, spec: RunSpec, job: Job, memory: int | None, wrapper: int) -> RunSpec:
        """Memory and processes: a cgroup where there is one, else resource limits."""
        processes = self.settings.job_max_processes
        in_cgroup_memory = memory if self.tree.enforces("memory") else None
        # The sandbox's own processes count against pids.max too.
        in_cgroup_pids = processes + wrapper if processes and self.tree.enforces("pids") else None
        paths: tuple[str, ...] = ()
        if in_cgroup_memory is not None or in_cgroup_pids is not None:
            paths = self.tree.create(f"{job.id}-{job.attempt}", in_cgroup_memory, in_cgroup_pids)
        rlimits = dict(spec.rlimits)
        if memory is not None and in_cgroup_memory is None:
            if job.gpu_ids:  # CUDA reserves far more address space than it uses
                log.warning("job %d: no memory cgroup, and RLIMIT_AS would break CUDA: its "
                            "memory is not limited", job.id)
            else:
                rlimits["RLIMIT_AS"] = (memory, memory)
        if processes and in_cgroup_pids is None:
            # RLIMIT_NPROC counts every process of the job's user (the daemon's, unless the job
            # runs as its owner): allow those it has now.
            running = _processes_of_user(os.getuid() if spec.uid is None else spec.uid)
            limit = min(running + processes + wrapper, _hard_nproc())
            rlimits["RLIMIT_NPROC"] = (limit, limit)
        return replace(spec, cgroups=paths, memory_limit=memory,
                       max_processes=processes, rlimits=rlimits)

    def _podman(self, spec: RunSpec, job: Job, layout: Layout, memory: int | None,
                cpus: tuple[int, ...] | None) -> RunSpec:
        assert self.podman is not None
        name = f"fetchml-{self.tree.tag}-{job.id}-{job.attempt}"
        env_file = RunDir(layout.run_dir).podman_env
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(podman_env_file(spec.env))
        options = PodmanOptions(podman=self.podman, image=self.settings.podman_image, name=name,
                                network=self.settings.job_network and job.network,
                                rootless=os.geteuid() != 0,
                                memory=memory, pids=self.settings.job_max_processes, cpus=cpus,
                                user=None if spec.uid is None or spec.gid is None
                                else (spec.uid, spec.gid, spec.groups))
        self.containers[job.id] = name
        # podman itself gets the daemon's environment only: a job's variables must not
        # configure the container engine (CONTAINERS_CONF and the like). It runs as the
        # daemon's user (rootful podman as root); the container runs as the job's (--user).
        return replace(spec, argv=tuple(podman_argv(options, layout, spec.argv, job.gpu_ids)),
                       env=dict(self.base_env), memory_limit=memory,
                       max_processes=self.settings.job_max_processes, uid=None, gid=None,
                       groups=())

    def job_changed(self, job: Job) -> None:
        """Free what an attempt held once it is over: CPUs, and a container left behind."""
        running = job.attempt if job.state == JobState.RUNNING else None
        self.cpus.release_except(job.id, running)
        if running is None and job.id in self.containers and self.podman is not None:
            name = self.containers.pop(job.id)
            with contextlib.suppress(RuntimeError):  # no loop: the daemon is stopping
                task = asyncio.get_running_loop().create_task(self._remove_container(name))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _remove_container(self, name: str) -> None:
        """A podman run killed by SIGKILL (timeout, grace over) leaves its container running."""
        assert self.podman is not None
        process = await asyncio.create_subprocess_exec(
            self.podman, "rm", "--force", "--ignore", "--time=0", name,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await asyncio.wait_for(process.wait(), PODMAN_REMOVE_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            log.warning("podman rm of container %s took too long", name)

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _affinity_of(run_dir: Path) -> tuple[int, ...] | None:
    """The CPUs a running attempt was pinned to, from its spec.json."""
    try:
        spec = RunSpec.from_dict(json.loads(RunDir(run_dir).spec.read_bytes()))
    except (OSError, ValueError, BadRequest):
        return None
    return spec.cpu_affinity


def _processes_of_user(uid: int) -> int:
    count = 0
    for process in psutil.process_iter(["uids"]):
        uids: Any = process.info.get("uids")
        if uids is not None and uids.real == uid:
            count += 1
    return count


def _hard_nproc() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 22


def daemon_tag(state_dir: Path) -> str:
    """A short name for this daemon, unique per state directory, for its cgroups and
    containers (several daemons may share a host)."""
    return hashlib.blake2b(str(state_dir.absolute()).encode(), digest_size=5).hexdigest()


def _probe(argv: list[str], what: str, user: JobCredentials | None = None) -> None:
    """Run ``argv`` (as ``user`` when given: jobs start the tool as their own user)."""
    as_user: dict[str, Any] = {} if user is None else {
        "user": user.uid, "group": user.gid, "extra_groups": list(user.groups), "cwd": "/"}
    try:
        done = subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False,
                              **as_user)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{what} cannot run here ({exc}); fix it or choose another "
                          "isolation") from exc
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"{what} cannot run here ({detail[0]}); fix it or choose another "
                          "isolation")


def find_tools(settings: DaemonSettings) -> tuple[str | None, str | None]:
    """bwrap and podman when the allowed modes need them, checked to work; ConfigError else."""
    unknown = [m for m in allowed_modes(settings) if m not in MODES]
    if unknown:
        raise ConfigError(f"isolation_choices has {unknown[0]!r}; use none, bwrap or podman")
    modes = allowed_modes(settings)
    bwrap = podman = None
    if "bwrap" in modes:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise ConfigError("isolation bwrap needs bubblewrap; install it (apt install "
                              "bubblewrap) or choose another isolation")
        probe = [bwrap, "--unshare-user", "--disable-userns", "--unshare-pid", "--cap-drop",
                 "ALL", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", "true"]
        _probe(probe, "bubblewrap")
        if os.geteuid() == 0:  # jobs of other users start bwrap as themselves, unprivileged
            job_user = resolve_job_user(settings.job_user)
            _probe(probe, f"bubblewrap as uid {job_user.uid} (unprivileged user namespaces)",
                   job_user)
    if "podman" in modes:
        podman = shutil.which("podman")
        if podman is None:
            raise ConfigError("isolation podman needs podman; install it or choose another "
                              "isolation")
        _probe([podman, "--version"], "podman")
    return bwrap, podman


async def open_isolation(settings: DaemonSettings, *, base_env: dict[str, str],
                         running: Iterable[Job], run_dir_of: Callable[[int, int], Path]
                         ) -> Isolation:
    """Find the tools the allowed modes need, the job cgroups, and the CPUs that ``running``
    attempts (found in ``run_dir_of(job id, attempt)``) are pinned to; ConfigError when a
    mode cannot work here. The caller registers ``rewrite`` and ``job_changed``."""
    bwrap, podman = await asyncio.to_thread(find_tools, settings)
    tag = daemon_tag(settings.state_dir)
    tree, notes = await asyncio.to_thread(cgroups.detect, tag)
    swept = await asyncio.to_thread(tree.sweep)
    log.info("job cgroups: %s%s", tree.describe(), f" (removed {swept} left over)" if swept
             else "")
    for note in notes:
        log.info("cgroups: %s", note)
    if not tree.enforces("memory"):
        log.warning("no writable memory cgroup: job memory limits fall back to RLIMIT_AS, which "
                    "bounds each process's address space rather than the job's memory")
    if settings.job_max_processes and not tree.enforces("pids"):
        log.warning("no writable pids cgroup: job_max_processes falls back to RLIMIT_NPROC, "
                    "counted over all processes of the daemon's user (root ignores it)")
    pool = CpuPool(os.sched_getaffinity(0))
    for job in running:  # the runner re-adopts them next
        affinity = await asyncio.to_thread(_affinity_of, run_dir_of(job.id, job.attempt))
        if affinity:
            pool.hold(job.id, job.attempt, affinity)
    log.info("isolation %s (jobs may choose: %s)", settings.isolation,
             ", ".join(allowed_modes(settings)))
    return Isolation(settings, base_env=base_env, tree=tree, cpus=pool, bwrap=bwrap,
                     podman=podman)
