"""The job store's values: checks on construction and the to_dict/from_dict round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import msgpack
import pytest

from fetchml.daemon.store import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    AttemptResult,
    Claim,
    Job,
    JobSpec,
    JobState,
    Resources,
)
from fetchml.errors import BadRequest

SNAPSHOT = "ab" * 32


def spec_fields(**overrides: Any) -> dict[str, Any]:
    return {"name": "n", "owner": "o", "snapshot": SNAPSHOT, "argv": ("true",)} | overrides


def full_job() -> Job:
    return Job(
        **spec_fields(
            env={"CUDA_CACHE": "/tmp/c"},
            workdir="src/app",
            priority=10,
            resources=Resources(cpus=8, memory=16 * 2**30, gpus=2),
            timeout=90.5,
            max_attempts=4,
            after=(3, 5),
            labels={"watch": "abc"},
        ),
        id=7,
        state=JobState.SUCCEEDED,
        attempt=2,
        reason="attempt 1 failed: exit 3",
        created_at=1.5,
        queued_at=2.0,
        started_at=3.0,
        finished_at=4.25,
        host="box",
        gpu_ids=(0, 1),
        exit_code=0,
        signal=None,
        peak_rss=2**33,
        cpu_time=12.5,
        outputs="cd" * 32,
        cancel_requested=True,
    )


def test_states_split_into_active_and_terminal() -> None:
    assert set(JobState) == ACTIVE_STATES | TERMINAL_STATES
    assert not ACTIVE_STATES & TERMINAL_STATES


def test_a_job_round_trips_through_json_and_msgpack() -> None:
    job = full_job()
    plain = job.to_dict()
    assert plain["state"] == "succeeded"
    assert plain["resources"] == {"cpus": 8, "memory": 16 * 2**30, "gpus": 2}
    assert plain["argv"] == ["true"]
    assert Job.from_dict(json.loads(json.dumps(plain))) == job
    assert Job.from_dict(msgpack.unpackb(msgpack.packb(plain))) == job
    assert Job.from_dict(msgpack.unpackb(msgpack.packb(plain), use_list=False)) == job


def test_a_spec_round_trips_and_a_job_gives_back_its_spec() -> None:
    spec = JobSpec(**spec_fields(after=(1,), timeout=5))
    assert spec.timeout == 5.0
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    job = Job(**spec_fields(after=(1,), timeout=5.0), id=1, state="held", created_at=0)  # type: ignore[arg-type]
    assert job.state is JobState.HELD
    assert job.spec == spec


def test_from_dict_refuses_unknown_spec_fields_but_ignores_unknown_job_fields() -> None:
    with pytest.raises(BadRequest, match="'priorty'"):
        JobSpec.from_dict(spec_fields(priorty=3))
    plain = full_job().to_dict() | {"added_by_a_newer_daemon": 1}
    assert Job.from_dict(plain) == full_job()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not a mapping", "must be a mapping"),
        ({"name": "n"}, "needs the field 'owner'"),
        (spec_fields(resources={"cpus": 1, "gpu": 1}), "'gpu'"),
        (spec_fields(resources=[1]), "mapping"),
        (spec_fields(argv="python train.py"), "argv must be a list"),
    ],
)
def test_from_dict_refuses_malformed_data(data: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        JobSpec.from_dict(data)


def test_job_from_dict_needs_the_stored_fields() -> None:
    plain = full_job().to_dict()
    del plain["created_at"]
    with pytest.raises(BadRequest, match="created_at"):
        Job.from_dict(plain)
    with pytest.raises(BadRequest, match="state must be one of"):
        Job.from_dict(full_job().to_dict() | {"state": "sleeping"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"snapshot": "abc"}, "64-hex"),
        ({"snapshot": "AB" * 32}, "64-hex"),
        ({"owner": ""}, "owner must not be empty"),
        ({"argv": ()}, "name a command"),
        ({"argv": ("",)}, "name a command"),
        ({"argv": ("a\0b",)}, "NUL"),
        ({"argv": ("python", 3)}, "must be a string"),
        ({"env": {"A=B": "1"}}, "'='"),
        ({"env": {"": "1"}}, "must not be empty"),
        ({"env": {"A": 1}}, "must be a string"),
        ({"env": ["A"]}, "mapping"),
        ({"priority": 0}, "from 1 to 10"),
        ({"priority": 11}, "from 1 to 10"),
        ({"priority": True}, "integer"),
        ({"priority": 5.0}, "integer"),
        ({"timeout": 0}, "above zero"),
        ({"timeout": float("inf")}, "finite"),
        ({"timeout": "1h"}, "finite number"),
        ({"max_attempts": 0}, "at least 1"),
        ({"after": (0,)}, "at least 1"),
        ({"after": "12"}, "list of integers"),
        ({"labels": {"k": None}}, "must be a string"),
        ({"resources": {"cpus": 1}}, "Resources value"),
    ],
)
def test_a_bad_spec_is_refused_with_a_reason(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        JobSpec(**spec_fields(**overrides))


@pytest.mark.parametrize(
    "resources",
    [{"cpus": 0}, {"memory": -1}, {"gpus": -2}, {"cpus": "2"}],
)
def test_bad_resources_are_refused(resources: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        Resources(**resources)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"id": 0}, "id must be an integer of at least 1"),
        ({"attempt": -1}, "attempt"),
        ({"created_at": -1.0}, "created_at"),
        ({"gpu_ids": (-1,)}, "gpu_ids"),
        ({"signal": 0}, "signal"),
        ({"peak_rss": -5}, "peak_rss"),
        ({"cancel_requested": 1}, "true or false"),
    ],
)
def test_a_bad_job_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        replace(full_job(), **overrides)


def test_attempt_results_and_claims_are_checked() -> None:
    with pytest.raises(BadRequest, match="succeeded, failed, cancelled or lost"):
        AttemptResult(JobState.RUNNING)
    with pytest.raises(BadRequest, match="cpu_time"):
        AttemptResult(JobState.FAILED, cpu_time=-1.0)
    with pytest.raises(BadRequest, match="host must not be empty"):
        Claim(1, 0, "")
    with pytest.raises(BadRequest, match="job_id"):
        Claim(0, 0, "h")
    assert Claim(1, 0, "h", [2, 3]).gpu_ids == (2, 3)  # type: ignore[arg-type]


def test_values_are_frozen_copies() -> None:
    env = {"A": "1"}
    spec = JobSpec(**spec_fields(env=env, argv=["python", "x.py"]))
    env["A"] = "changed"
    assert spec.env == {"A": "1"}
    assert spec.argv == ("python", "x.py")
    with pytest.raises(AttributeError):
        spec.priority = 3  # type: ignore[misc]
