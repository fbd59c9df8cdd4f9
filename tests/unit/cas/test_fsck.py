from __future__ import annotations

from pathlib import Path

import pytest

from fetchml.cas.fsck import FsckProblem, fsck
from fetchml.cas.hashing import hash_bytes
from fetchml.cas.objects import TEMP_PREFIX, ObjectStore
from tests.unit.cas.cas_helpers import encode_rows, ingest, make_tree, scan


@pytest.fixture
def pushed(store: ObjectStore, snapshots: ObjectStore, project: Path) -> str:
    """A project pushed the way the daemon does it: objects, flush, then the manifest."""
    make_tree(
        project,
        {"a.py": b"alpha", "b/b.py": b"beta" * 1000, "l": ("link", "a.py"), "e": None},
    )
    result = scan(project)
    ingest(store, result)
    store.flush()
    return snapshots.put_bytes(result.manifest.encode())


def kinds(problems: list[FsckProblem]) -> list[tuple[str, str]]:
    return sorted((problem.kind, problem.oid) for problem in problems)


@pytest.mark.parametrize("read_data", [False, True])
def test_a_clean_store_has_no_problems(
    store: ObjectStore, snapshots: ObjectStore, pushed: str, read_data: bool
) -> None:
    assert fsck(store, snapshots, read_data=read_data) == []


def test_a_flipped_byte_is_found_when_reading_data(
    store: ObjectStore, snapshots: ObjectStore, pushed: str
) -> None:
    oid = hash_bytes(b"beta" * 1000)
    path = store.path(oid)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    path.chmod(0o444)
    assert fsck(store, snapshots, read_data=False) == []  # same name, same size
    problems = fsck(store, snapshots, read_data=True)
    assert kinds(problems) == [("corrupt_object", oid)]
    assert str(path) in problems[0].message


def test_a_missing_object_named_by_a_manifest_is_found(
    store: ObjectStore, snapshots: ObjectStore, pushed: str
) -> None:
    oid = hash_bytes(b"alpha")
    store.delete(oid)
    problems = fsck(store, snapshots, read_data=False)
    assert kinds(problems) == [("missing_object", oid)]
    assert "'a.py'" in problems[0].message and pushed[:12] in problems[0].message


def test_sizes_temp_files_strays_and_modes_without_reading_data(
    store: ObjectStore, snapshots: ObjectStore, pushed: str
) -> None:
    oid = hash_bytes(b"alpha")
    path = store.path(oid)
    path.chmod(0o644)
    path.write_bytes(b"alphabet")
    (store.root / f"{TEMP_PREFIX}left").write_bytes(b"")
    (store.root / "README").write_bytes(b"")
    (path.parent / "not-an-oid").write_bytes(b"")
    problems = fsck(store, snapshots, read_data=False)
    assert kinds(problems) == [
        ("size_mismatch", oid),
        ("stray_file", ""),
        ("stray_file", ""),
        ("temp_file", ""),
        ("writable_object", oid),
    ]


def test_snapshots_that_do_not_decode_or_hash_are_found(
    store: ObjectStore, snapshots: ObjectStore, pushed: str
) -> None:
    bad = snapshots.put_bytes(encode_rows([["../evil", "dir", False, 0, None, None]]))
    garbage = snapshots.put_bytes(b"not a manifest")
    rotten_path = snapshots.path(pushed)
    rotten_path.chmod(0o644)
    rotten_path.write_bytes(rotten_path.read_bytes()[:-1] + b"\x00")
    rotten_path.chmod(0o444)
    problems = fsck(store, snapshots, read_data=False)
    assert kinds(problems) == sorted(
        [("bad_snapshot", bad), ("bad_snapshot", garbage), ("corrupt_snapshot", pushed)]
    )
    assert any("'../evil'" in problem.message for problem in problems)
