"""Errors raised for what happened, so that they travel with the code that says it (not as
``internal``, the code of the root FetchmlError): damaged state files are ``internal``,
impossible requests ``bad_request``, things gone ``not_found``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.objects import ObjectStore
from fetchml.cas.scan import scan_tree
from fetchml.daemon.datasets.cache import DatasetCache
from fetchml.daemon.datasets.service import link_into_workspace, stored_ref
from fetchml.daemon.jobs.retention import Pins
from fetchml.daemon.security.audit import AuditLog, audit_key
from fetchml.daemon.security.users import UserRegistry, load_secret
from fetchml.errors import BadRequest, FetchmlError, InternalError, NotFound


def test_a_stored_dataset_reference_without_a_version_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="has no version") as err:
        stored_ref("imgs")
    assert err.value.code == "bad_request"


def test_an_impossible_mount_point_is_a_bad_request(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "taken").write_text("x")
    for mount, words in (("taken", "has that path already"), ("taken/x", "not a directory")):
        with pytest.raises(BadRequest, match=words) as err:
            link_into_workspace(work, mount, tmp_path, "imgs@1")
        assert err.value.code == "bad_request"


def test_dataset_objects_missing_on_this_host_are_not_found(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n")
    manifest = scan_tree(src, rules=IgnoreRules.load(src), cache=None).manifest
    cache = DatasetCache(tmp_path / "datasets", ObjectStore(tmp_path / "objects"))
    cache.open()
    with pytest.raises(NotFound, match="1 objects of dataset imgs@1 are not stored") as err:
        cache.ensure(manifest.snapshot_id, manifest, "imgs@1")
    assert err.value.code == "not_found"


def test_damaged_state_files_are_internal_errors(tmp_path: Path) -> None:
    (tmp_path / "pins.json").write_text("{not json")
    (tmp_path / "secret").write_bytes(b"short")
    failures: list[FetchmlError] = []
    for attempt, words in ((lambda: Pins(tmp_path), "pins.json is unreadable"),
                           (lambda: load_secret(tmp_path), "is damaged")):
        with pytest.raises(InternalError, match=words) as err:
            attempt()
        failures.append(err.value)
    (tmp_path / "secret").write_bytes(os.urandom(32))
    (tmp_path / "users.json").write_text("[")
    with pytest.raises(InternalError, match="is unreadable") as users_err:
        UserRegistry(tmp_path, [], {"admin"})
    failures.append(users_err.value)
    assert {failure.code for failure in failures} == {"internal"}
    assert all(type(failure) is InternalError for failure in failures)


def test_an_audit_log_that_cannot_be_written_is_an_internal_error(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit" / "audit.log", audit_key(b"s" * 32))
    audit.open()
    (tmp_path / "audit").chmod(0o500)
    try:
        if os.access(tmp_path / "audit", os.W_OK):
            (tmp_path / "audit").chmod(0o700)
            (tmp_path / "audit" / "audit.log").mkdir()  # root writes anywhere: make it a dir
        with pytest.raises(InternalError, match="cannot write the audit log") as err:
            audit.record("auth.success", user="alice")
        assert type(err.value) is InternalError and err.value.code == "internal"
    finally:
        (tmp_path / "audit").chmod(0o700)
