from __future__ import annotations

import os
import stat
import sysconfig
from pathlib import Path

import pytest

import fetchml.cas.materialize as materialize_module
from fetchml.cas.hashing import hash_bytes
from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.cas.materialize import materialize
from fetchml.cas.objects import ObjectStore
from fetchml.cas.scan import scan_tree
from fetchml.errors import BadRequest, Conflict, FetchmlError, IntegrityError
from tests.unit.cas.cas_helpers import ingest, listing, make_tree, scan, unchecked_manifest


def stdlib_listing(stdlib: Path, skip: set[str]) -> dict[str, tuple[str, object, bool]]:
    """The original tree as materialise should reproduce it: everything but __pycache__."""
    pycache = {
        os.path.relpath(os.path.join(dirpath, "__pycache__"), stdlib)
        for dirpath, dirnames, _ in os.walk(stdlib)
        if "__pycache__" in dirnames
        and os.path.relpath(dirpath, stdlib).split(os.sep)[0] not in skip
    }
    return listing(stdlib, skip_dirs=skip | pycache)


def test_the_python_standard_library_round_trips_byte_for_byte(
    store: ObjectStore, tmp_path: Path
) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # Installed packages may live inside the stdlib directory; they are not the stdlib.
    skip = {
        os.path.relpath(sysconfig.get_paths()[key], stdlib).split(os.sep)[0]
        for key in ("purelib", "platlib")
        if Path(sysconfig.get_paths()[key]).is_relative_to(stdlib)
    }
    rules = IgnoreRules.load(stdlib, [f"/{name}/" for name in sorted(skip)])
    result = scan_tree(stdlib, rules=rules, cache=None)
    assert result.manifest.file_count > 500
    ingest(store, result)
    target = tmp_path / "work"
    materialize(SnapshotManifest.decode(result.manifest.encode()), store, target)
    expected = stdlib_listing(stdlib, skip)
    assert listing(target) == expected
    for path, (kind, _, executable) in expected.items():
        if kind == "file":
            mode = stat.S_IMODE((target / path).stat().st_mode)
            assert mode == (0o755 if executable else 0o644), path


def test_links_empty_dirs_and_exec_bits_are_reproduced(
    store: ObjectStore, project: Path, tmp_path: Path
) -> None:
    make_tree(
        project,
        {
            "run.sh": ("exec", b"#!/bin/sh\n"),
            "a/b/data.txt": b"data",
            "a/up": ("link", "../run.sh"),
            "a/dangling": ("link", "nowhere"),
            "empty": None,
            "x/y/z": None,
        },
    )
    result = scan(project)
    ingest(store, result)
    target = tmp_path / "out"
    target.mkdir()  # an existing empty directory is fine
    materialize(result.manifest, store, target)
    assert listing(target) == listing(project)
    assert scan(target).manifest.snapshot_id == result.manifest.snapshot_id
    # Copies, not hard links: writing to the workspace cannot reach the store.
    copied = (target / "a/b/data.txt").stat()
    assert copied.st_ino != store.path(hash_bytes(b"data")).stat().st_ino
    assert copied.st_nlink == 1


def test_a_non_empty_or_linked_target_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    manifest = SnapshotManifest([ManifestEntry.dir("d")])
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "d").symlink_to(outside)
    with pytest.raises(Conflict, match="not an empty directory"):
        materialize(manifest, store, planted)
    (tmp_path / "target-link").symlink_to(outside)
    with pytest.raises(Conflict):
        materialize(manifest, store, tmp_path / "target-link")
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(Conflict):
        materialize(manifest, store, tmp_path / "a-file")
    assert list(outside.iterdir()) == []


def test_a_symlink_planted_after_the_check_is_never_followed(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    oid = store.put_bytes(b"evil")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    real_prepare = materialize_module._prepare_target

    def prepare_then_race(path: Path) -> bool:
        # Another process plants a link between the emptiness check and the writes.
        created = real_prepare(path)
        (path / "d").symlink_to(outside)
        return created

    monkeypatch.setattr(materialize_module, "_prepare_target", prepare_then_race)
    manifest = SnapshotManifest([ManifestEntry.file("d/evil", oid, 4)])
    with pytest.raises(BadRequest, match="not a directory"):
        materialize(manifest, store, target)
    assert list(outside.iterdir()) == []


def bad_entries(sandbox: Path, oid: str) -> dict[str, list[ManifestEntry]]:
    evil = ManifestEntry.file
    return {
        "dotdot": [evil("../evil", oid, 4)],
        "nested-dotdot": [evil("a/../../evil", oid, 4)],
        "absolute": [evil(str(sandbox / "evil"), oid, 4)],
        "nul": [evil("evil\x00x", oid, 4)],
        "backslash": [evil("..\\evil", oid, 4)],
        "long-component": [evil("e" * 256, oid, 4)],
        "empty-component": [evil("a//evil", oid, 4)],
        "dot": [evil("./evil", oid, 4)],
        "non-nfc": [evil("cafe\u0301", oid, 4)],
        "duplicate": [evil("same", oid, 4), evil("same", oid, 4)],
        "escaping-link": [ManifestEntry.link("l", "../evil-link")],
        "absolute-link": [ManifestEntry.link("l", str(sandbox / "evil-link"))],
        "under-a-link": [
            ManifestEntry.link("l", "sub"),
            ManifestEntry.dir("sub"),
            evil("l/evil", oid, 4),
        ],
        "under-a-file": [evil("f", oid, 4), evil("f/evil", oid, 4)],
        "bad-oid": [evil("f", "../" * 21 + "a", 4)],
        "unknown-kind": [ManifestEntry("f", "fifo", False, 0, None, None)],  # type: ignore[arg-type]
        "wrong-size": [evil("f", oid, 3)],
    }


@pytest.mark.parametrize("case", list(bad_entries(Path("/"), "0" * 64)))
def test_a_hostile_manifest_writes_nothing_outside_the_target(
    store: ObjectStore, tmp_path: Path, case: str
) -> None:
    oid = store.put_bytes(b"evil")
    sandbox = tmp_path / "sandbox"
    target = sandbox / "jobs" / "1" / "work"
    target.parent.mkdir(parents=True)
    before = listing(sandbox)
    manifest = unchecked_manifest(bad_entries(sandbox, oid)[case])
    with pytest.raises(FetchmlError):
        materialize(manifest, store, target)
    assert listing(sandbox) == before  # the failed attempt is cleaned up, nothing escaped
    assert not (tmp_path / "evil").exists() and not (tmp_path / "evil-link").exists()


def test_a_corrupt_object_fails_and_leaves_an_existing_target_empty(
    store: ObjectStore, project: Path, tmp_path: Path
) -> None:
    make_tree(project, {"a/ok.txt": b"fine", "z/bad.txt": b"will rot"})
    result = scan(project)
    ingest(store, result)
    rotten = store.path(hash_bytes(b"will rot"))
    rotten.chmod(0o644)
    rotten.write_bytes(b"will rut")
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(IntegrityError, match=hash_bytes(b"will rot")):
        materialize(result.manifest, store, target)
    assert list(target.iterdir()) == []


def test_files_get_exact_modes_whatever_the_umask(store: ObjectStore, tmp_path: Path) -> None:
    oid = store.put_bytes(b"#!/bin/sh\n")
    manifest = SnapshotManifest(
        [ManifestEntry.file("x", oid, 10, executable=True), ManifestEntry.file("y", oid, 10)]
    )
    old = os.umask(0o077)
    try:
        materialize(manifest, store, tmp_path / "t")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t/x").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "t/y").stat().st_mode) == 0o644


def test_deep_trees_keep_a_bounded_number_of_directories_open(
    store: ObjectStore, tmp_path: Path
) -> None:
    oid = store.put_bytes(b"leaf")
    names = [f"d{i}" for i in range(150)]
    paths = [
        "/".join([*names, "leaf"]),
        "/".join([*names[:100], "side"]),  # back up past the closed shallow fds
        "/".join([*names[:3], "top"]),
        "d0.txt",  # sorts between entries of d0/
        "/".join([*names[:120], "mid"]),
    ]
    manifest = SnapshotManifest(ManifestEntry.file(path, oid, 4) for path in paths)
    fds_before = len(os.listdir("/proc/self/fd"))
    materialize(manifest, store, tmp_path / "t")
    assert len(os.listdir("/proc/self/fd")) == fds_before
    for path in paths:
        assert (tmp_path / "t" / path).read_bytes() == b"leaf"
