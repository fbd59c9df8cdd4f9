from __future__ import annotations

import os
import stat
import threading
import tracemalloc
from pathlib import Path

import pytest

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.objects import TEMP_PREFIX, ObjectStore
from fetchml.errors import BadRequest, Conflict, IntegrityError, NotFound

MiB = 1 << 20


def flip_byte(store: ObjectStore, oid: str, offset: int = 0) -> None:
    path = store.path(oid)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    path.chmod(0o444)


def temp_files(store: ObjectStore) -> list[Path]:
    return sorted(store.root.rglob(f"{TEMP_PREFIX}*"))


def test_layout_and_read_only_objects(store: ObjectStore) -> None:
    oid = store.put_bytes(b"hello")
    assert oid == hash_bytes(b"hello")
    assert store.path(oid) == store.root / oid[:2] / oid[2:]
    assert stat.S_IMODE(store.path(oid).stat().st_mode) == 0o444
    assert store.contains(oid)
    assert store.size(oid) == 5
    assert store.read_bytes(oid) == b"hello"
    assert store.verify(oid)
    assert list(store.iter_oids()) == [oid]
    assert store.stats() == (1, 5)
    assert temp_files(store) == []


def test_bad_oids_are_refused(store: ObjectStore) -> None:
    for bad in ["", "ab", "A" * 64, "../" + "a" * 61, "g" * 64]:
        with pytest.raises(BadRequest, match="not an object id"):
            store.path(bad)
        with pytest.raises(BadRequest):
            store.begin(bad, 1)


def test_missing_keeps_order_and_lists_duplicates_once(store: ObjectStore) -> None:
    present = store.put_bytes(b"present")
    a, b = hash_bytes(b"a"), hash_bytes(b"b")
    assert store.missing([b, present, a, b, a]) == [b, a]
    assert store.missing([]) == []
    assert not store.contains(a)


def test_size_and_reads_of_an_absent_object_are_not_found(store: ObjectStore) -> None:
    oid = hash_bytes(b"absent")
    with pytest.raises(NotFound, match=oid):
        store.size(oid)
    with pytest.raises(NotFound):
        store.read_bytes(oid)
    with pytest.raises(NotFound):
        store.iter_chunks(oid)
    assert not store.verify(oid)


def test_upload_through_begin_write_commit(store: ObjectStore) -> None:
    data = b"x" * 1000
    oid = hash_bytes(data)
    pending = store.begin(oid, len(data))
    assert pending.temp_path.parent == store.path(oid).parent
    assert pending.temp_path.name.startswith(TEMP_PREFIX)
    pending.write(data[:400])
    assert (pending.received, pending.complete) == (400, False)
    pending.write(data[400:])
    assert pending.complete
    store.commit([pending])
    store.flush()
    assert store.read_bytes(oid) == data
    assert temp_files(store) == []
    with pytest.raises(Conflict):
        pending.write(b"more")


def test_writing_past_the_declared_size_is_refused(store: ObjectStore) -> None:
    pending = store.begin(hash_bytes(b"abc"), 3)
    pending.write(b"ab")
    with pytest.raises(BadRequest, match="declared as 3 bytes"):
        pending.write(b"cd")
    pending.discard()
    assert temp_files(store) == []


def test_commit_of_an_incomplete_upload_is_refused(store: ObjectStore) -> None:
    oid = hash_bytes(b"abc")
    pending = store.begin(oid, 3)
    pending.write(b"ab")
    with pytest.raises(BadRequest, match="received 2 of 3 bytes"):
        store.commit([pending])
    assert not store.contains(oid)
    assert temp_files(store) == []


def test_commit_with_a_wrong_digest_is_refused_and_the_rest_committed(store: ObjectStore) -> None:
    good_oid = hash_bytes(b"good")
    claimed = hash_bytes(b"what the client claims")
    also_good = hash_bytes(b"")  # empty objects are objects too
    uploads = [store.begin(good_oid, 4), store.begin(claimed, 4), store.begin(also_good, 0)]
    uploads[0].write(b"good")
    uploads[1].write(b"evil")
    with pytest.raises(IntegrityError, match=claimed) as caught:
        store.commit(uploads)
    assert caught.value.details["failed"] == [claimed]
    store.flush()
    assert store.read_bytes(good_oid) == b"good"
    assert store.read_bytes(also_good) == b""
    assert not store.contains(claimed)
    assert temp_files(store) == []


def test_committing_an_existing_object_keeps_the_original(store: ObjectStore) -> None:
    oid = store.put_bytes(b"same")
    inode = store.path(oid).stat().st_ino
    pending = store.begin(oid, 4)
    pending.write(b"same")
    store.commit([pending])
    assert store.path(oid).stat().st_ino == inode
    assert store.put_bytes(b"same") == oid
    assert temp_files(store) == []


def test_pending_object_as_context_manager_discards(store: ObjectStore) -> None:
    with store.begin(hash_bytes(b"abc"), 3) as pending:
        pending.write(b"a")
        assert temp_files(store) == [pending.temp_path]
    assert temp_files(store) == []


def test_a_flipped_byte_fails_every_read_path(store: ObjectStore, tmp_path: Path) -> None:
    small = store.put_bytes(b"small object " * 100)
    large = store.put_bytes(os.urandom(3 * MiB))  # copy_to takes the kernel-copy path
    out = tmp_path / "out"
    out.mkdir()
    dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for oid in (small, large):
            flip_byte(store, oid, offset=store.size(oid) - 1)
            with pytest.raises(IntegrityError, match=oid):
                store.read_bytes(oid)
            chunks = store.iter_chunks(oid, chunk_size=MiB)
            with pytest.raises(IntegrityError, match=oid):
                list(chunks)
            with pytest.raises(IntegrityError, match=oid):
                store.copy_to(oid, dir_fd, "copy", 0o644)
            assert not (out / "copy").exists()
            assert store.verify(oid) is False
    finally:
        os.close(dir_fd)


def test_iter_chunks_withholds_the_last_chunk_until_verified(store: ObjectStore) -> None:
    data = b"a" * 10
    oid = store.put_bytes(data)
    assert list(store.iter_chunks(oid, chunk_size=4)) == [b"aaaa", b"aaaa", b"aa"]
    flip_byte(store, oid, offset=9)
    received: list[bytes] = []
    with pytest.raises(IntegrityError):
        received.extend(store.iter_chunks(oid, chunk_size=4))
    assert received == [b"aaaa", b"aaaa"]  # the corrupt tail never left the store
    with pytest.raises(BadRequest):
        store.iter_chunks(oid, chunk_size=0)


def test_copy_to_creates_a_new_file_with_the_mode_and_never_follows_links(
    store: ObjectStore, tmp_path: Path
) -> None:
    oid = store.put_bytes(b"#!/bin/sh\n")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (out / "planted").symlink_to(victim)
    dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    old_umask = os.umask(0o077)
    try:
        store.copy_to(oid, dir_fd, "run.sh", 0o755)
        with pytest.raises(Conflict, match="already exists"):
            store.copy_to(oid, dir_fd, "run.sh", 0o644)
        with pytest.raises(Conflict):
            store.copy_to(oid, dir_fd, "planted", 0o644)
    finally:
        os.umask(old_umask)
        os.close(dir_fd)
    assert (out / "run.sh").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755
    assert victim.read_bytes() == b"untouched"
    # A copy, not a link: changing it leaves the stored object alone.
    (out / "run.sh").write_bytes(b"changed")
    assert store.read_bytes(oid) == b"#!/bin/sh\n"


def test_remove_temp_files(store: ObjectStore) -> None:
    abandoned = store.begin(hash_bytes(b"abandoned"), 9)
    abandoned.write(b"aban")
    stray_temp = store.root / f"{TEMP_PREFIX}crashed"
    stray_temp.write_bytes(b"partial")
    old = 1_000_000_000
    os.utime(stray_temp, (old, old))
    kept = store.put_bytes(b"kept")
    assert store.remove_temp_files(older_than_s=3600) == 1
    assert temp_files(store) == [abandoned.temp_path]
    assert store.remove_temp_files() == 1
    assert temp_files(store) == []
    assert store.read_bytes(kept) == b"kept"


def test_delete_iter_oids_and_stats(store: ObjectStore) -> None:
    oids = {store.put_bytes(bytes([i]) * (i + 1)) for i in range(20)}
    assert set(store.iter_oids()) == oids
    assert store.stats() == (20, sum(range(1, 21)))
    victim = sorted(oids)[0]
    store.delete(victim)
    store.delete(victim)  # already gone: not an error
    assert not store.contains(victim)
    assert store.stats()[0] == 19


def test_put_file_ingests_a_copy_and_refuses_links(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    data = os.urandom(2 * MiB + 3)
    source.write_bytes(data)
    assert store.put_file(source) == (hash_bytes(data), len(data))
    assert store.read_bytes(hash_bytes(data)) == data
    source.write_bytes(b"changed later")
    assert store.read_bytes(hash_bytes(data)) == data
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(BadRequest):
        store.put_file(tmp_path / "link")
    with pytest.raises(NotFound):
        store.put_file(tmp_path / "missing")
    with pytest.raises(BadRequest, match="not a regular file"):
        store.put_file(tmp_path)
    assert temp_files(store) == []


def test_put_files_batch(store: ObjectStore, tmp_path: Path) -> None:
    paths = []
    for i in range(50):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"%d" % (i % 10))
        paths.append(path)
    results = store.put_files(paths)
    assert [oid for oid, _ in results] == [hash_bytes(p.read_bytes()) for p in paths]
    assert store.stats()[0] == 10
    assert temp_files(store) == []


def test_a_20_mib_upload_in_4_mib_chunks_keeps_memory_bounded(
    store: ObjectStore, tmp_path: Path
) -> None:
    chunk = os.urandom(4 * MiB)
    count = 5
    oid = hash_bytes(chunk * count)
    tracemalloc.start()
    try:
        pending = store.begin(oid, count * len(chunk))
        for _ in range(count):
            pending.write(chunk)
        store.commit([pending])
        store.flush()
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = sum(len(part) for part in store.iter_chunks(oid, chunk_size=MiB))
        _, iter_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = tmp_path / "out"
        out.mkdir()
        dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            store.copy_to(oid, dir_fd, "copy", 0o644)
        finally:
            os.close(dir_fd)
        assert store.verify(oid)
        _, copy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 20 * MiB
    assert (out / "copy").stat().st_size == 20 * MiB
    # No full-object buffer anywhere: a few chunk-sized buffers at most (the upload's chunks
    # belong to the caller; the store adds nothing of that size).
    assert upload_peak < 2 * MiB
    assert iter_peak < 4 * MiB  # the chunk being read, the one held back, the caller's one
    assert copy_peak < 6 * MiB  # one 4 MiB read buffer


def test_concurrent_writers_of_the_same_object(store: ObjectStore) -> None:
    data = os.urandom(100_000)
    results: list[str] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            results.append(store.put_bytes(data))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(results) == {hash_bytes(data)}
    assert store.read_bytes(hash_bytes(data)) == data
    assert temp_files(store) == []
