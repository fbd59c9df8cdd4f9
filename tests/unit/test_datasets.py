"""Datasets without a daemon: references, the registry (SQLite and a real Redis), the cache."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from fetchml.cas.fsck import fsck
from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.cas.scan import scan_tree
from fetchml.daemon.datasets.cache import DatasetCache, fingerprint
from fetchml.daemon.datasets.registry import (
    READY,
    REMOVED,
    REMOVING,
    DatasetRegistry,
    DatasetVersion,
    SqliteDatasetRegistry,
    owner_of,
)
from fetchml.daemon.datasets.registry_redis import RedisDatasetRegistry
from fetchml.daemon.datasets.service import DatasetService, link_into_workspace, pick_version
from fetchml.daemon.store import JobSpec, MemoryJobStore
from fetchml.errors import BadRequest, Conflict, FetchmlError, NotFound
from fetchml.protocol.ops_datasets import DatasetRef, parse_ref
from tests.conftest import RedisServer

SNAP = [f"{i:02x}" * 32 for i in range(40)]


def draft(name: str = "imgs", snapshot: str = SNAP[0], by: str = "rita") -> DatasetVersion:
    return DatasetVersion(name=name, version=0, snapshot=snapshot, files=3, bytes=30,
                          pushed_by=by, pushed_at=1.0, description="d")


# -- references ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("imgs", DatasetRef("imgs")),
    ("imgs@3", DatasetRef("imgs", 3)),
    ("imgs:data/train", DatasetRef("imgs", None, "data/train")),
    ("my.data-set_2@12:d/", DatasetRef("my.data-set_2", 12, "d")),
])
def test_references_parse(text: str, expected: DatasetRef) -> None:
    assert parse_ref(text) == expected


@pytest.mark.parametrize("text", ["", "@1", ".hidden", "a/b", "imgs@", "imgs@0", "imgs@-1",
                                  "imgs@x", "imgs@1:", "imgs:/", "imgs:/d", "a b",
                                  "x" * 101])
def test_bad_references_are_refused_in_one_sentence(text: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_ref(text)
    assert err.value.message.count(". ") == 0 and len(err.value.message) < 300


def test_a_mount_is_refused_where_only_a_version_is_wanted() -> None:
    with pytest.raises(BadRequest, match="mount point"):
        parse_ref("imgs@1:d", allow_mount=False)
    assert DatasetRef("imgs", 2, "d").resolved(2) == "imgs@2:d"


def test_pick_version_takes_the_latest_ready_and_refuses_the_rest() -> None:
    versions = [replace(draft(), version=1), replace(draft(), version=2, state=REMOVING),
                replace(draft(), version=3, state=REMOVED)]
    assert pick_version(versions, DatasetRef("imgs")).version == 1
    assert pick_version(versions, DatasetRef("imgs", 1)).version == 1
    with pytest.raises(Conflict, match="being removed"):
        pick_version(versions, DatasetRef("imgs", 2))
    with pytest.raises(NotFound, match="no version 3"):
        pick_version(versions, DatasetRef("imgs", 3))
    with pytest.raises(NotFound, match="no version 9"):
        pick_version(versions, DatasetRef("imgs", 9))
    with pytest.raises(NotFound, match="no dataset imgs"):
        pick_version(versions[2:], DatasetRef("imgs"))
    with pytest.raises(Conflict, match="every version"):
        pick_version(versions[1:], DatasetRef("imgs"))


# -- registry contract -----------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "redis"])
async def registry(request: pytest.FixtureRequest, tmp_path: Path
                   ) -> AsyncIterator[Callable[[], DatasetRegistry]]:
    """A factory of registries over the same storage (to test reopening)."""
    if request.param == "sqlite":
        def make() -> DatasetRegistry:
            return SqliteDatasetRegistry(tmp_path / "datasets.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"test:{tmp_path.name}:"

        def make() -> DatasetRegistry:
            return RedisDatasetRegistry(server.url, prefix=prefix)
    opened: list[DatasetRegistry] = []

    def factory() -> DatasetRegistry:
        opened.append(make())
        return opened[-1]

    yield factory
    for reg in opened:
        await reg.close()


async def test_versions_number_up_and_an_unchanged_push_records_nothing(
        registry: Callable[[], DatasetRegistry]) -> None:
    reg = registry()
    await reg.open()
    first, created = await reg.record(draft())
    assert (first.version, first.state, created) == (1, READY, True)
    again, created = await reg.record(replace(draft(), pushed_by="ravi"))
    assert (again, created) == (first, False)
    second, created = await reg.record(draft(snapshot=SNAP[1]))
    assert (second.version, created) == (2, True)
    back, created = await reg.record(draft(snapshot=SNAP[0]))  # a revert is a new version
    assert (back.version, created) == (3, True)
    await reg.record(draft(name="other"))
    assert [v.version for v in await reg.versions("imgs")] == [1, 2, 3]
    assert [v.ref for v in await reg.all_versions()] == ["imgs@1", "imgs@2", "imgs@3",
                                                         "other@1"]
    assert await reg.versions("nothing") == []
    reopened = registry()
    await reopened.open()
    assert await reopened.versions("imgs") == await reg.versions("imgs")


async def test_states_change_by_compare_and_set_and_numbers_are_never_reused(
        registry: Callable[[], DatasetRegistry]) -> None:
    reg = registry()
    await reg.open()
    await reg.record(draft())
    await reg.record(draft(snapshot=SNAP[1]))
    before = await reg.generation()
    marked = await reg.set_state("imgs", 2, REMOVING, expect=(READY,))
    assert marked.state == REMOVING and marked.snapshot == SNAP[1]
    with pytest.raises(Conflict, match="imgs@2 is removing"):
        await reg.set_state("imgs", 2, REMOVING, expect=(READY,))
    with pytest.raises(NotFound, match="imgs@7 does not exist"):
        await reg.set_state("imgs", 7, REMOVED, expect=(READY,))
    await reg.set_state("imgs", 2, REMOVED, expect=(REMOVING,))
    await reg.set_state("imgs", 1, REMOVED, expect=(READY,))
    if reg.shared:
        assert await reg.generation() > before
    again, created = await reg.record(draft(snapshot=SNAP[1]))
    assert (again.version, created) == (3, True)  # imgs@1 and @2 keep meaning what they meant
    assert owner_of(await reg.versions("imgs")) == "rita"
    assert owner_of([replace(draft(), state=REMOVED)]) is None


async def test_concurrent_pushes_get_distinct_numbers(
        registry: Callable[[], DatasetRegistry]) -> None:
    regs = [registry() for _ in range(3)]  # as three daemons would
    for reg in regs:
        await reg.open()
    results = await asyncio.gather(*(regs[i % 3].record(draft(snapshot=SNAP[i]))
                                     for i in range(24)))
    assert all(created for _, created in results)
    assert sorted(v.version for v, _ in results) == list(range(1, 25))
    by_number = {v.version: v.snapshot for v in await regs[0].versions("imgs")}
    assert by_number == {v.version: v.snapshot for v, _ in results}


async def test_an_unreachable_redis_is_unavailable_in_one_sentence() -> None:
    reg = RedisDatasetRegistry("redis://127.0.0.1:1/0")
    with pytest.raises(FetchmlError, match="try again once Redis is back") as err:
        await reg.open()
    assert err.value.code == "unavailable"


def test_redis_keys_live_under_the_datasets_prefix(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url.replace("/0", "/3")) as cleaner:
        cleaner.flushdb()  # keys other tests left in this database

    async def push() -> None:
        reg = RedisDatasetRegistry(redis_server.url.replace("/0", "/3"))
        await reg.open()
        await reg.record(draft())
        await reg.close()

    asyncio.run(push())
    client = redis.Redis.from_url(redis_server.url.replace("/0", "/3"), decode_responses=True)
    try:
        keys = sorted(client.keys("*"))
        assert keys == ["fetchml:datasets:generation", "fetchml:datasets:names",
                        "fetchml:datasets:versions:imgs"]
    finally:
        client.flushdb()
        client.close()


# -- cache ---------------------------------------------------------------------------------

def store_tree(root: Path, objects: ObjectStore) -> tuple[str, SnapshotManifest]:
    scan = scan_tree(root, rules=IgnoreRules.load(root), cache=None)
    objects.put_files(scan.sources.values())
    return scan.manifest.snapshot_id, scan.manifest


@pytest.fixture
def stored(tmp_path: Path) -> tuple[ObjectStore, str, SnapshotManifest, Path]:
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (src / "sub" / "deep" / "run.sh").write_text("#!/bin/sh\n")
    (src / "sub" / "deep" / "run.sh").chmod(0o755)
    (src / "empty").mkdir()
    (src / "link").symlink_to("sub/b.bin")
    objects = ObjectStore(tmp_path / "objects")
    snapshot, manifest = store_tree(src, objects)
    return objects, snapshot, manifest, src


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def test_ten_concurrent_users_cause_one_read_only_copy(
        tmp_path: Path, stored: tuple[ObjectStore, str, SnapshotManifest, Path]) -> None:
    objects, snapshot, manifest, src = stored
    cache = DatasetCache(tmp_path / "datasets", objects)
    cache.open()
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(
        cache.ensure(snapshot, manifest, "imgs@1"))) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.materialisations == 1 and len(set(paths)) == 1
    root = paths[0]
    assert tree_bytes(root) == tree_bytes(src)
    assert os.readlink(root / "link") == "sub/b.bin" and (root / "empty").is_dir()
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            assert stat.S_IMODE(st.st_mode) == 0o555, path
        elif stat.S_ISREG(st.st_mode):
            expected = 0o555 if path.name == "run.sh" else 0o444
            assert stat.S_IMODE(st.st_mode) == expected, path
            stored_file = objects.path(next(e.oid for e in manifest.entries if e.oid
                                            and e.path == str(path.relative_to(root))))
            assert st.st_nlink == 1 and st.st_ino != os.stat(stored_file).st_ino  # a copy
    assert cache.is_cached(snapshot) and cache.snapshots() == [snapshot]


@pytest.mark.parametrize("tamper", ["write", "chmod", "delete", "add", "rename"])
def test_an_altered_cache_is_replaced_and_stored_objects_never_change(
        tmp_path: Path, stored: tuple[ObjectStore, str, SnapshotManifest, Path],
        tamper: str) -> None:
    objects, snapshot, manifest, src = stored
    cache = DatasetCache(tmp_path / "datasets", objects)
    cache.open()
    root = cache.ensure(snapshot, manifest, "imgs@1")
    target = root / "sub" / "b.bin"
    (root / "sub").chmod(0o755)  # what a job running as the daemon's user could do
    if tamper == "write":
        target.chmod(0o644)
        target.write_bytes(b"evil")
    elif tamper == "chmod":
        target.chmod(0o666)
    elif tamper == "delete":
        target.unlink()
    elif tamper == "add":
        (root / "sub" / "new").write_text("x")
    else:
        target.rename(root / "sub" / "c.bin")
    (root / "sub").chmod(0o555)
    assert cache.ensure(snapshot, manifest, "imgs@1") == root
    assert cache.materialisations == 2
    assert tree_bytes(root) == tree_bytes(src)
    assert stat.S_IMODE(os.stat(root / "sub" / "b.bin").st_mode) == 0o444
    assert fsck(objects, ObjectStore(tmp_path / "snapshots"), read_data=True) == []


def test_reading_does_not_break_the_seal(
        tmp_path: Path, stored: tuple[ObjectStore, str, SnapshotManifest, Path]) -> None:
    objects, snapshot, manifest, _ = stored
    cache = DatasetCache(tmp_path / "datasets", objects)
    cache.open()
    root = cache.ensure(snapshot, manifest, "imgs@1")
    seal = fingerprint(root)
    tree_bytes(root)
    os.listdir(root / "sub")
    assert fingerprint(root) == seal
    cache.ensure(snapshot, manifest, "imgs@1")
    assert cache.materialisations == 1


def test_a_crash_leaves_no_half_cache_and_missing_objects_are_named(
        tmp_path: Path, stored: tuple[ObjectStore, str, SnapshotManifest, Path]) -> None:
    objects, snapshot, manifest, _ = stored
    cache = DatasetCache(tmp_path / "datasets", objects)
    cache.open()
    half = cache.cache_dir / f".tmp-{snapshot[:16]}-dead"
    (half / "sub").mkdir(parents=True)
    (half / "sub").chmod(0o555)
    unsealed = cache.path(snapshot)  # renamed but not sealed: treated as altered
    unsealed.mkdir()
    DatasetCache(tmp_path / "datasets", objects).open()
    assert not half.exists()
    assert cache.ensure(snapshot, manifest, "imgs@1") == unsealed
    assert cache.materialisations == 1
    victim = next(e.oid for e in manifest.entries if e.path == "a.txt")
    assert victim is not None
    objects.delete(victim)
    cache.remove(snapshot)
    with pytest.raises(FetchmlError, match="1 objects of dataset imgs@1 are not stored"):
        cache.ensure(snapshot, manifest, "imgs@1")
    assert cache.snapshots() == []


def test_sweep_keeps_only_what_is_asked(
        tmp_path: Path, stored: tuple[ObjectStore, str, SnapshotManifest, Path]) -> None:
    objects, snapshot, manifest, src = stored
    (src / "a.txt").write_text("beta\n")
    other, other_manifest = store_tree(src, objects)
    cache = DatasetCache(tmp_path / "datasets", objects)
    cache.open()
    cache.ensure(snapshot, manifest, "imgs@1")
    cache.ensure(other, other_manifest, "imgs@2")
    assert cache.sweep({other}) == [snapshot]
    assert cache.snapshots() == [other] and not cache.is_cached(snapshot)
    assert sorted(p.name for p in cache.seal_dir.iterdir()) == [other]


def test_mounts_create_parents_but_never_replace_or_follow(tmp_path: Path) -> None:
    work, target = tmp_path / "work", tmp_path / "cache"
    (work / "code").mkdir(parents=True)
    (work / "taken").write_text("x")
    (work / "escape").symlink_to(tmp_path)
    target.mkdir()
    link_into_workspace(work, "data/train", target, "imgs@1")
    assert os.readlink(work / "data" / "train") == str(target)
    link_into_workspace(work, "code/imgs", target, "imgs@1")
    with pytest.raises(FetchmlError, match="has that path already"):
        link_into_workspace(work, "taken", target, "imgs@1")
    with pytest.raises(FetchmlError, match="escape is not a directory"):
        link_into_workspace(work, "escape/x", target, "imgs@1")
    with pytest.raises(FetchmlError, match="taken is not a directory"):
        link_into_workspace(work, "taken/x", target, "imgs@1")
    with pytest.raises(BadRequest):
        link_into_workspace(work, "../out", target, "imgs@1")
    assert not (tmp_path / "x").exists()


# -- the service, on real stores (no daemon) -------------------------------------------------

async def test_the_service_materialises_once_and_lists_what_a_host_must_fetch(
        tmp_path: Path, stored: tuple[ObjectStore, str, SnapshotManifest, Path]) -> None:
    objects, snapshot, manifest, src = stored
    snapshots = ObjectStore(tmp_path / "snapshots")
    snapshots.put_bytes(manifest.encode())
    jobs = MemoryJobStore()
    await jobs.open()
    registry = SqliteDatasetRegistry(tmp_path / "datasets.db")
    await registry.open()
    cache = DatasetCache(tmp_path / "datasets", objects)
    cache.open()
    fetched: list[str] = []

    async def fetch(snapshot: str) -> None:  # in a cluster: from a host that has it
        fetched.append(snapshot)

    svc = DatasetService(jobs, objects, snapshots, "h", registry, cache, fetch)
    try:
        version, _ = await svc.record(draft(snapshot=snapshot))
        assert svc.roots() == [snapshot]
        assert await svc.resolve(["imgs:in/d", "imgs@1"]) == ("imgs@1:in/d", "imgs@1")
        [job] = await jobs.submit([JobSpec(name="t", owner="rita", snapshot=SNAP[9],
                                           argv=("true",), datasets=("imgs@1",))], 1.0)
        assert await svc.snapshots_for(job) == [snapshot]
        assert await svc.objects_for(job) == []
        await asyncio.gather(*(svc.before_prepare(job) for _ in range(10)))
        assert cache.materialisations == 1
        assert fetched == [snapshot] * 10
        run_dir = tmp_path / "run"
        (run_dir / "work").mkdir(parents=True)
        svc.workspace(job, run_dir)
        assert tree_bytes(run_dir / "data" / "imgs") == tree_bytes(src)
        assert svc.environment(job, run_dir) == {"FETCHML_DATA_DIR": str(run_dir / "data")}
        assert await svc.users({"imgs@1"}) == [job]
        assert await svc.remove([version]) == [job]  # in use: refused, still ready
        assert [v.state for v in await registry.versions("imgs")] == [READY]
        lost = next(e.oid for e in manifest.entries if e.path == "a.txt")
        assert lost is not None
        objects.delete(lost)
        assert await svc.objects_for(job) == [lost]
        await jobs.cancel(job.id, reason="test", now=2.0)
        assert await svc.remove([version]) == []
        assert svc.roots() == [] and cache.snapshots() == []
        with pytest.raises(FetchmlError, match="was removed after the job was queued"):
            await svc.before_prepare(job)
    finally:
        await registry.close()
        await jobs.close()
