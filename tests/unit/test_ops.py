"""Each op is declared once, with its policy: every op has a handler and the policy it had
before it was declared; argument types match the arguments; callers name ops by their spec."""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from fetchml.cli.jobs_view import detail_lines, job_json, table_row
from fetchml.daemon.handlers import HANDLERS, load_all
from fetchml.daemon.handlers.jobs import job_to_wire
from fetchml.daemon.jobs.model import Job, JobState, Resources
from fetchml.protocol.job import (
    SUBMIT_FIELDS,
    WIRE_JOB_FIELDS,
    JobSubmission,
    WireJob,
    job_v1,
    read_job,
)
from fetchml.protocol.ops import CATALOGUE, CONNECTION_OPS, describe

ROOT = Path(__file__).resolve().parents[2]

# The policy each op had when permissions were checked in handlers and the audited, rate-limited
# and ordered ops were sets of names: (permissions, audited, rate limited, in arrival order).
POLICY: dict[str, tuple[tuple[str, ...], bool, bool, bool]] = {
    "hello": ((), False, False, False),
    "stream.cancel": ((), False, False, False),
    "host.info": (("host:read",), False, False, False),
    "host.ping": ((), False, False, False),
    "host.monitor": (("host:read",), False, False, False),
    "cas.missing": (("cas:write",), False, False, False),
    "cas.put": (("cas:write",), False, False, True),
    "cas.get": (("cas:read",), False, False, False),
    "snapshot.put": (("cas:write",), False, False, False),
    "snapshot.get": (("cas:read",), False, False, False),
    "snapshot.pin": (("cas:write",), False, False, False),
    "snapshot.unpin": (("cas:write",), False, False, False),
    "snapshot.pins": (("cas:read",), False, False, False),
    "jobs.submit": (("jobs:create",), True, True, False),
    "jobs.list": (("jobs:read",), False, False, False),
    "jobs.get": (("jobs:read",), False, False, False),
    "jobs.cancel": (("jobs:cancel",), True, False, False),
    "jobs.wait": (("jobs:read",), False, False, False),
    "jobs.logs": (("jobs:read",), False, False, False),
    "jobs.events": (("jobs:read",), False, False, False),
    "outputs.store": (("jobs:read", "cas:write"), True, False, False),
    "jobs.metrics": (("jobs:read",), False, False, False),
    "admin.fsck": (("admin:fsck",), False, False, False),
    "admin.users.add": (("admin:users",), True, False, False),
    "admin.users.list": (("admin:users",), False, False, False),
    "admin.users.revoke": (("admin:users",), True, False, False),
    "admin.audit": (("admin:audit",), False, False, False),
    "admin.prune": (("jobs:prune",), True, False, False),
    "cluster.hosts": (("host:read",), False, False, False),
    "cluster.outputs": (("jobs:read", "cas:read"), False, False, False),
    "datasets.push": (("datasets:write",), True, False, False),
    "datasets.list": (("datasets:read",), False, False, False),
    "datasets.info": (("datasets:read",), False, False, False),
    "datasets.rm": (("datasets:write",), True, False, False),
}


def test_every_op_has_a_handler_and_its_declared_policy() -> None:
    handlers = load_all()
    assert handlers is HANDLERS
    assert set(handlers) == set(CATALOGUE) - CONNECTION_OPS
    assert {"hello", "stream.cancel"} == CONNECTION_OPS
    declared = {name: (spec.permissions, spec.audited, spec.rate_limited, spec.ordered)
                for name, spec in CATALOGUE.items()}
    assert declared == POLICY


def test_argument_types_name_exactly_the_arguments() -> None:
    for name, spec in CATALOGUE.items():
        hints = get_type_hints(spec.params)
        assert list(hints) == [arg.name for arg in spec.args], name
        assert spec.params.__required_keys__ == set(hints), name  # defaults filled in


def test_describe_shows_each_op_policy() -> None:
    text = describe()
    for spec in CATALOGUE.values():
        assert f"policy: {spec.policy()}" in text
    assert "policy: requires jobs:create; audited; rate limited" in text
    assert "policy: requires cas:write; in arrival order" in text
    assert "policy: requires jobs:read and cas:read" in text
    assert "host.ping: Answers at once; for latency checks.\n    policy: any authenticated user" \
        in text


def string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@pytest.mark.parametrize("folder", ["fetchml/cli", "fetchml/client", "fetchml/daemon/cluster"])
def test_callers_name_ops_by_their_declaration(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    for path in files:
        literal = string_literals(path) & set(CATALOGUE)
        assert not literal, f"{path.relative_to(ROOT)} names {sorted(literal)} by a string"


# A job as protocol 1 spelled it, key for key: what old clients and `status --json` show.
V1_KEYS = ["id", "name", "owner", "state", "priority", "snapshot", "argv", "env", "workdir",
           "cpus", "memory", "gpus_requested", "timeout", "max_attempts", "after", "labels",
           "datasets", "isolation", "network", "attempt", "reason", "created_at", "queued_at",
           "started_at", "finished_at", "host", "gpus", "exit_code", "signal", "peak_rss",
           "cpu_time", "outputs", "outputs_error", "warnings"]


def stored_job(**more: Any) -> Job:
    fields: dict[str, Any] = {
        "name": "n", "owner": "o", "snapshot": "ab" * 32, "argv": ("true",),
        "resources": Resources(cpus=2, memory=2**30, gpus=2), "max_attempts": 3, "id": 7,
        "state": JobState.RUNNING, "attempt": 1, "created_at": time.time(), "host": "h",
        "gpu_ids": (0, 1)}
    return Job(**(fields | more))


def test_a_job_travels_with_one_meaning_per_name() -> None:
    wire = job_to_wire(stored_job())
    assert tuple(wire) == WIRE_JOB_FIELDS == tuple(get_type_hints(WireJob))
    assert wire["gpus"] == 2 and wire["gpu_ids"] == [0, 1] and wire["retries"] == 2
    assert set(SUBMIT_FIELDS) == set(get_type_hints(JobSubmission))
    assert {"gpus", "retries"} <= set(SUBMIT_FIELDS) and "gpu_ids" not in SUBMIT_FIELDS
    # protocol 1's spelling, as old clients and the CLI's --json documents have it
    old = job_v1(wire)
    assert list(old) == V1_KEYS
    assert old["gpus"] == [0, 1] and old["gpus_requested"] == 2 and old["max_attempts"] == 3
    assert "retries" not in old and "gpu_ids" not in old
    assert read_job(old) == wire and read_job(wire) is wire


def test_the_cli_shows_a_job_as_before_from_either_spelling() -> None:
    wire = job_to_wire(stored_job())
    document = job_json(wire)
    assert list(document) == V1_KEYS and document["gpus"] == [0, 1]
    assert document["created_at"].endswith("Z") and document["max_attempts"] == 3
    assert job_json(job_v1(wire)) == document  # from a protocol 1 daemon
    assert table_row(wire) == table_row(job_v1(wire)) and table_row(wire)[5] == "0,1"
    assert detail_lines(wire) == detail_lines(job_v1(wire))
    assert "attempt      1 of 3" in detail_lines(wire)
    assert "resources    2 CPUs, 1.0 GiB memory, 2 GPUs" in detail_lines(wire)
