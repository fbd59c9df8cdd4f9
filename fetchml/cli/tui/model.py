"""What the dashboard shows, without Textual: the jobs it knows (filtered, sorted, bounded),
the host's GPUs and who holds them, and the spec that re-queues a job as it was."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fetchml.cli.jobs_view import elapsed, gpus_cell, outcome
from fetchml.protocol.job import JobSubmission, WireJob, read_job
from fetchml.units import human_bytes

ACTIVE = frozenset({"held", "queued", "running"})
FINISHED = frozenset({"succeeded", "failed", "cancelled", "lost"})
# The state filter cycles through these (label, states shown; None: every state).
STATE_FILTERS: tuple[tuple[str, frozenset[str] | None], ...] = (
    ("any state", None),
    ("active", ACTIVE),
    ("running", frozenset({"running"})),
    ("waiting", frozenset({"queued", "held"})),
    ("finished", FINISHED),
    ("failed", frozenset({"failed", "lost"})),
)
SORT_KEYS = ("id", "name", "owner", "state", "priority")
# Sorting by state puts what needs attention first.
STATE_ORDER = {s: i for i, s in enumerate(
    ("running", "queued", "held", "failed", "lost", "cancelled", "succeeded"))}
MAX_JOBS = 2000  # jobs kept; past this the oldest finished ones are forgotten


def _sort_value(job: dict[str, Any], key: str) -> Any:
    if key == "state":
        return STATE_ORDER.get(job["state"], len(STATE_ORDER)), -job["id"]
    if key == "name":
        return str(job["name"]).lower(), -job["id"]
    if key in ("owner", "priority"):
        return job[key], -job["id"]
    return job["id"]


@dataclass
class JobBoard:
    """The jobs the dashboard knows, and how the table shows them."""

    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    state_filter: int = 0  # index into STATE_FILTERS
    user: str | None = None  # only this owner's jobs
    sort_key: str = "id"
    descending: bool = True

    def replace(self, jobs: Iterable[Mapping[str, Any]]) -> None:
        self.jobs = {job["id"]: dict(read_job(job)) for job in jobs}
        self._trim()

    def update(self, job: Mapping[str, Any]) -> None:
        self.jobs[job["id"]] = dict(read_job(job))
        self._trim()

    def _trim(self) -> None:
        if len(self.jobs) <= MAX_JOBS:
            return
        finished = sorted(i for i, job in self.jobs.items() if job["state"] in FINISHED)
        for job_id in finished[:len(self.jobs) - MAX_JOBS]:
            del self.jobs[job_id]

    @property
    def state_label(self) -> str:
        return STATE_FILTERS[self.state_filter][0]

    def cycle_state(self) -> str:
        self.state_filter = (self.state_filter + 1) % len(STATE_FILTERS)
        return self.state_label

    def sort_by(self, key: str) -> None:
        """Sort by ``key``; the same key again reverses the order."""
        if key not in SORT_KEYS:
            raise ValueError(f"cannot sort by {key}")
        if key == self.sort_key:
            self.descending = not self.descending
        else:
            self.sort_key, self.descending = key, key in ("id", "priority")

    def cycle_sort(self) -> str:
        self.sort_key = SORT_KEYS[(SORT_KEYS.index(self.sort_key) + 1) % len(SORT_KEYS)]
        self.descending = self.sort_key in ("id", "priority")
        return self.sort_key

    def shown(self, job: dict[str, Any]) -> bool:
        states = STATE_FILTERS[self.state_filter][1]
        return (states is None or job["state"] in states) and (
            not self.user or job["owner"] == self.user)

    def visible(self) -> list[dict[str, Any]]:
        jobs = [job for job in self.jobs.values() if self.shown(job)]
        jobs.sort(key=lambda job: _sort_value(job, self.sort_key), reverse=self.descending)
        return jobs


@dataclass(frozen=True)
class GpuRow:
    index: int
    name: str
    memory: str
    holder: str  # "free", "job 12 (alice)", or "in use" (a job this user cannot see)


def gpu_rows(host: dict[str, Any], free: Iterable[int] | None,
             jobs: Iterable[Mapping[str, Any]]) -> list[GpuRow]:
    """Each GPU of the host and what holds it."""
    holders = {gpu: job for job in map(read_job, jobs) if job["state"] == "running"
               for gpu in job["gpu_ids"]}
    free_set = None if free is None else set(free)
    rows = []
    for gpu in host.get("gpus", []):
        index = gpu["index"]
        job = holders.get(index)
        if job is not None:
            holder = f"job {job['id']} ({job['owner']})"
        elif free_set is None or index in free_set:
            holder = "free"
        else:
            holder = "in use"
        memory = human_bytes(gpu["memory"]) if gpu.get("memory") else "-"
        rows.append(GpuRow(index, str(gpu.get("name", "")), memory, holder))
    return rows


def requeue_spec(raw: Mapping[str, Any]) -> JobSubmission:
    """The ``jobs.submit`` spec that queues ``job`` again with the same options (its
    dependencies aside: those already ran)."""
    job: WireJob = read_job(raw)
    spec: JobSubmission = {
        "argv": list(job["argv"]), "name": job["name"], "env": dict(job.get("env") or {}),
        "workdir": job.get("workdir") or "", "priority": job["priority"], "cpus": job["cpus"],
        "memory": job["memory"], "gpus": job["gpus"], "timeout": job.get("timeout"),
        "retries": job["retries"], "labels": dict(job.get("labels") or {}),
    }
    if job.get("datasets"):
        spec["datasets"] = list(job["datasets"])
    if job.get("isolation"):
        spec["isolation"] = job["isolation"]
    if job.get("network"):
        spec["network"] = True
    return spec


def detail_rows(raw: Mapping[str, Any], last: dict[str, tuple[float, float]]) -> list[str]:
    """The selected job in a narrow pane: what it is, how it runs, and its last metrics."""
    job = read_job(raw)
    state = job["state"] + (f" ({job['reason']})" if job.get("reason") else "")
    rows = [
        f"job {job['id']}  {job['name']}",
        f"state   {state}",
        f"owner   {job['owner']}   priority {job['priority']}",
        f"run     {' '.join(job['argv'])}",
        f"needs   {job['cpus']} CPU, {job['gpus']} GPU"
        + (f", {human_bytes(job['memory'])}" if job.get("memory") else ""),
        f"try     {job['attempt']} of {job['retries'] + 1}"
        + (f" on {job['host']}" if job.get("host") else ""),
        f"gpus    {','.join(str(g) for g in job['gpu_ids']) or '-'}",
        f"time    {elapsed(job)}",
        f"result  {outcome(job)}",
        f"memory  {human_bytes(job.get('peak_rss'))} peak",
        f"outputs {(job.get('outputs') or '-')[:12]}",
    ]
    rows += [f"{name[:12]:<12} {value:.5g}" for name, (_, value) in sorted(last.items())]
    return rows


# The table's columns, most telling first: what scrolls off a narrow screen matters least.
COLUMNS = ("id", "state", "name", "time", "owner", "gpus", "pri", "result")
NAME_WIDTH = 24  # characters of a job's name in the table


def table_cells(job: Mapping[str, Any]) -> list[str]:
    gpus = gpus_cell(job)
    return [str(job["id"]), job["state"], str(job["name"])[:NAME_WIDTH], elapsed(job),
            job["owner"], gpus, str(job["priority"]), outcome(job)]
