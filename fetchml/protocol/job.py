"""A job as it travels: what ``jobs.submit`` takes, and what every job reply and event carries.

One name, one meaning, on both sides: ``gpus`` is the number of whole GPUs asked for and
``gpu_ids`` the indices the job was given; ``retries`` is how many times a failed attempt is
run again (so a job runs at most ``retries + 1`` times). Times are epoch seconds.

Protocol 1 spelled a job differently: ``gpus_requested`` for the count, ``gpus`` for the
indices, ``max_attempts`` for ``retries + 1``. A session that agreed on protocol 1 still gets
jobs in that form (``job_v1``), and the CLI's ``--json`` documents keep it too; ``read_job``
takes a job in either spelling, so a client also reads what an older daemon sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, cast


class JobSubmission(TypedDict, total=False):
    """One job of a ``jobs.submit`` call; only ``argv`` is required."""

    argv: list[str]
    name: str
    env: dict[str, str]
    workdir: str  # inside the snapshot
    priority: int  # 1-10
    cpus: int
    memory: int  # bytes
    gpus: int  # whole GPUs
    timeout: float | None  # seconds per attempt
    retries: int  # runs again after a failure
    after: list[str]  # job ids that must succeed first
    labels: dict[str, str]
    datasets: list[str]  # NAME[@V][:MOUNT]
    isolation: str | None  # none, bwrap, podman; None: the daemon's default
    network: bool  # the network inside a sandbox, where the daemon allows it


SUBMIT_FIELDS: tuple[str, ...] = tuple(JobSubmission.__annotations__)

SUBMIT_FIELDS_DOC = (
    '{"argv": [str] (required), "name", "env": {str: str}, "workdir", "priority" (1-10), '
    '"cpus", "memory" (bytes), "gpus" (how many), "timeout" (s), "retries" (runs again after '
    'a failure), "after": [job id], "labels": {str: str}, "datasets": ["NAME[@V][:MOUNT]"], '
    '"isolation": "none" | "bwrap" | "podman", "network": bool (inside a sandbox)}'
)


class WireJob(TypedDict):
    """A job in replies and events (protocol 2)."""

    id: int
    name: str
    owner: str
    state: str  # held, queued, running, succeeded, failed, cancelled, lost
    priority: int
    snapshot: str  # 64 hex
    argv: list[str]
    env: dict[str, str]
    workdir: str
    cpus: int
    memory: int  # bytes; 0: any
    gpus: int  # whole GPUs asked for
    timeout: float | None
    retries: int  # runs again after a failure
    after: list[int]
    labels: dict[str, str]
    datasets: list[str]  # resolved: NAME@V[:MOUNT]
    isolation: str | None
    network: bool  # asked for the network inside a sandbox
    attempt: int  # 0 until it first starts
    reason: str | None
    created_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    host: str | None
    gpu_ids: list[int]  # indices of the GPUs it was given
    exit_code: int | None
    signal: int | None
    peak_rss: int | None  # bytes
    cpu_time: float | None  # seconds
    outputs: str | None  # snapshot id of its outputs
    outputs_error: str | None  # why outputs it wrote are not stored (they stay on its host)
    warnings: list[str]  # entries left out of its outputs, and why


WIRE_JOB_FIELDS: tuple[str, ...] = tuple(WireJob.__annotations__)

WIRE_JOB_DOC = (
    '{"id", "name", "owner", "state", "priority", "snapshot", "argv", "env", "workdir", "cpus", '
    '"memory", "gpus" (how many), "timeout", "retries", "after", "labels", "datasets", '
    '"isolation", "network", "attempt", "reason", "created_at", "queued_at", "started_at", '
    '"finished_at", "host", "gpu_ids" (indices given), "exit_code", "signal", "peak_rss", '
    '"cpu_time", "outputs", "outputs_error" (why they are not stored), "warnings" (what was '
    'left out of them)}'
)

# The last protocol version whose sessions get jobs spelled as ``job_v1`` spells them.
LAST_V1_PROTOCOL = 1
# Protocol 1's names for the fields whose name or meaning changed in protocol 2.
V1_NAMES = {"gpus": "gpus_requested", "retries": "max_attempts", "gpu_ids": "gpus"}


def job_v1(job: WireJob) -> dict[str, Any]:
    """``job`` as protocol 1 spelled it, in the same key order."""
    fields = cast(Mapping[str, Any], job)
    spelled: dict[str, Any] = {}
    for key in WIRE_JOB_FIELDS:
        value = fields[key]
        if key == "retries":
            value += 1
        spelled[V1_NAMES.get(key, key)] = value
    return spelled


def read_job(data: Mapping[str, Any]) -> WireJob:
    """A job received from a daemon, in protocol 2's spelling whichever the daemon used."""
    if "max_attempts" not in data:
        if "warnings" in data:
            return cast(WireJob, data)
        # a daemon from before outputs said why they were not stored, or what was left out
        return cast(WireJob, {**data, "outputs_error": None, "warnings": []})
    job: dict[str, Any] = {}
    for key in WIRE_JOB_FIELDS:
        value = data.get(V1_NAMES.get(key, key))
        if key == "retries":
            value = max(0, (value or 1) - 1)
        elif key == "network":  # older daemons had no such field: no network asked
            value = bool(value)
        elif key == "warnings":
            value = list(value or ())
        job[key] = value
    return cast(WireJob, job)
