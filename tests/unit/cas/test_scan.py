from __future__ import annotations

import logging
import os
import socket
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import ManifestEntry
from fetchml.cas.scan import StatCache
from fetchml.cas.statcache import CACHE_DIR, CACHE_FILE
from fetchml.errors import BadRequest, TooLarge
from tests.unit.cas.cas_helpers import OLD_NS, age_tree, make_tree, scan, snapshot_id

SPEC = {
    "train.py": b"print('train')\n",
    "run.sh": ("exec", b"#!/bin/sh\npython train.py\n"),
    "pkg/__init__.py": b"",
    "pkg/model/net.py": b"class Net: ...\n",
    "configs/base.yaml": b"lr: 0.1\n",
    "latest": ("link", "configs/base.yaml"),
    "pkg/up": ("link", "../train.py"),
    "outputs": None,
    "empty/nested": None,
    "caf\u00e9.txt": b"accent\n",
}


def test_same_tree_gives_the_same_id_anywhere(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "one", SPEC)
    second = make_tree(tmp_path / "a-differently-named-dir", dict(reversed(SPEC.items())))
    id_first = snapshot_id(first)
    assert snapshot_id(second) == id_first
    for dirpath, dirnames, filenames in os.walk(second):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (1, 1), follow_symlinks=False)
    assert snapshot_id(second) == id_first


def test_exec_bit_and_link_target_changes_change_the_id(project: Path) -> None:
    make_tree(project, SPEC)
    original = snapshot_id(project)
    (project / "train.py").chmod(0o755)
    executable = snapshot_id(project)
    assert executable != original
    (project / "train.py").chmod(0o644)
    assert snapshot_id(project) == original
    (project / "latest").unlink()
    (project / "latest").symlink_to("train.py")
    assert snapshot_id(project) not in (original, executable)


def test_manifest_contents(project: Path) -> None:
    make_tree(project, SPEC)
    (project / "group-exec-only").write_bytes(b"x")
    (project / "group-exec-only").chmod(0o654)
    (project / "owner-exec").write_bytes(b"x")
    (project / "owner-exec").chmod(0o744)
    make_tree(project, {"only-ignored/x.pyc": b"", "escape": ("link", "../../etc/passwd")})
    result = scan(project)
    entries = {entry.path: entry for entry in result.manifest.entries}
    assert entries["run.sh"].executable and entries["owner-exec"].executable
    assert not entries["train.py"].executable and not entries["group-exec-only"].executable
    assert entries["latest"] == ManifestEntry.link("latest", "configs/base.yaml")
    assert entries["escape"] == ManifestEntry.link("escape", "../../etc/passwd")  # recorded
    assert entries["outputs"] == ManifestEntry.dir("outputs")
    assert entries["empty/nested"] == ManifestEntry.dir("empty/nested")
    assert entries["only-ignored"] == ManifestEntry.dir("only-ignored")
    assert "empty" not in entries and "pkg" not in entries  # implied by their contents
    assert entries["pkg/model/net.py"].oid == hash_bytes(b"class Net: ...\n")
    for oid, source in result.sources.items():
        assert hash_bytes(source.read_bytes()) == oid
    assert result.hashed_files == result.manifest.file_count


def test_names_are_nfc_normalised(project: Path) -> None:
    decomposed = unicodedata.normalize("NFD", "café.txt")
    (project / decomposed).write_bytes(b"x")
    (project / "link").symlink_to(decomposed)
    entries = {e.path: e for e in scan(project).manifest.entries}
    assert set(entries) == {"café.txt", "link"}
    assert entries["link"].target == "café.txt"
    (project / "café.txt").write_bytes(b"y")  # the composed twin
    with pytest.raises(BadRequest, match="normalisations"):
        scan(project)


def test_ignore_rules_inside_a_decomposed_directory_name_still_apply(project: Path) -> None:
    decomposed = unicodedata.normalize("NFD", "café")
    make_tree(
        project,
        {
            f"{decomposed}/.gitignore": b"*.tmp\n",
            f"{decomposed}/x.tmp": b"",
            f"{decomposed}/keep.py": b"",
        },
    )
    paths = {e.path for e in scan(project).manifest.entries}
    assert paths == {"café/.gitignore", "café/keep.py"}


def test_names_that_are_not_valid_utf8_are_refused_unless_ignored(project: Path) -> None:
    (project / os.fsdecode(b"data-\xff.bin")).write_bytes(b"x")
    with pytest.raises(BadRequest, match=r"data-\\xff.bin.*rename it or ignore it"):
        scan(project)
    (project / ".fetchmlignore").write_bytes(b"*.bin\n")
    assert {e.path for e in scan(project).manifest.entries} == {".fetchmlignore"}


def test_names_with_a_backslash_are_refused(project: Path) -> None:
    (project / "a\\b").write_bytes(b"x")
    with pytest.raises(BadRequest, match="backslash"):
        scan(project)


def test_sockets_and_fifos_are_skipped_with_a_warning(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (project / "keep").write_bytes(b"x")
    os.mkfifo(project / "fifo")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(project / "sock"))
        with caplog.at_level(logging.WARNING, logger="fetchml.cas.scan"):
            entries = {e.path for e in scan(project).manifest.entries}
    finally:
        server.close()
    assert entries == {"keep"}
    assert "'fifo'" in caplog.text and "'sock'" in caplog.text


def test_files_over_max_file_size_are_named_with_the_fix(project: Path) -> None:
    make_tree(project, {"small": b"x" * 10, "big": b"x" * 3000, "bigger": b"x" * 5000})
    with pytest.raises(TooLarge) as caught:
        scan(project, max_file_size=1000)
    message = caught.value.message
    assert "2 file(s)" in message
    assert message.index("'bigger'") < message.index("'big'")
    assert ".fetchmlignore" in message and "max_file_size" in message
    make_tree(project, {".fetchmlignore": b"big*\n"})
    assert scan(project, max_file_size=1000).manifest.file_count == 2


def test_stat_cache_skips_unchanged_files(project: Path) -> None:
    make_tree(project, SPEC)
    age_tree(project)
    cache = StatCache.load(project)
    first = scan(project, cache)
    assert first.hashed_files == 6
    cache.save()
    assert (project / CACHE_DIR / CACHE_FILE).is_file()

    cache = StatCache.load(project)
    second = scan(project, cache)
    assert second.hashed_files == 0 and second.hashed_bytes == 0
    assert second.manifest == first.manifest
    assert set(second.sources) == set(first.sources)

    data = bytearray((project / "pkg/model/net.py").read_bytes())
    data[0] ^= 1
    (project / "pkg/model/net.py").write_bytes(bytes(data))
    third = scan(project, cache)
    assert third.hashed_files == 1 and third.hashed_bytes == len(data)
    assert third.manifest.snapshot_id != first.manifest.snapshot_id


def test_racily_clean_files_are_hashed_again(project: Path) -> None:
    make_tree(project, {"old.txt": b"old", "fresh.txt": b"aaaa"})
    age_tree(project)
    fresh = project / "fresh.txt"
    fresh.write_bytes(b"aaaa")  # modified now, within the timestamp granularity of the save
    cache = StatCache.load(project)
    assert scan(project, cache).hashed_files == 2
    cache.save()

    # Same size, same mtime as recorded: only the racy-clean rule can notice the change.
    recorded = fresh.stat()
    fresh.write_bytes(b"bbbb")
    os.utime(fresh, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))
    again = scan(project, StatCache.load(project))
    assert again.hashed_files == 1
    entry = {e.path: e for e in again.manifest.entries}["fresh.txt"]
    assert entry.oid == hash_bytes(b"bbbb")


def test_stat_cache_trusts_nothing_modified_near_the_save(project: Path) -> None:
    fresh = project / "f"
    fresh.write_bytes(b"x")
    now = time.time_ns()
    cache = StatCache.load(project)
    # Recorded as if hashed long after its mtime, so the entry is kept in memory...
    cache.record("f", fresh.stat(), False, hash_bytes(b"x"), hashed_at_ns=now + OLD_NS)
    assert cache.lookup("f", fresh.stat(), False) == hash_bytes(b"x")
    cache.save()
    # ...but its mtime is within the granularity of the save, so a reload distrusts it.
    assert StatCache.load(project).lookup("f", fresh.stat(), False) is None


def test_stat_cache_forgets_deleted_files_and_survives_corruption(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tree(project, {"a": b"a", "b": b"b"})
    age_tree(project)
    cache = StatCache.load(project)
    scan(project, cache)
    assert len(cache) == 2
    (project / "b").unlink()
    scan(project, cache)
    assert len(cache) == 1
    cache.save()
    (project / CACHE_DIR / CACHE_FILE).write_bytes(b"\x93garbage")
    with caplog.at_level(logging.WARNING):
        assert len(StatCache.load(project)) == 0
    assert "corrupt" in caplog.text


def test_a_file_that_keeps_changing_is_refused(project: Path) -> None:
    growing = project / "growing.log"
    growing.write_bytes(os.urandom(8 << 20))
    stop = threading.Event()

    def append() -> None:
        with open(growing, "ab") as stream:
            while not stop.is_set():
                stream.write(b"x" * 4096)
                stream.flush()

    def scan_until_refused() -> None:
        for _ in range(20):  # the writer needs the GIL between our fstat calls: retry a few
            scan(project)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        with pytest.raises(BadRequest, match="kept changing"):
            scan_until_refused()
    finally:
        stop.set()
        writer.join()
