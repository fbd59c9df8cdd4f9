"""Scanning a job's outputs: nothing ignored, and what a snapshot cannot hold left out with a
sentence instead of failing the scan or storing a tree nobody can pull."""

from __future__ import annotations

import os
from pathlib import Path

from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.scan import scan_tree

IGNORED_BY_PROJECTS = [".git/HEAD", ".git/objects/ab/cd", "__pycache__/m.cpython-312.pyc",
                       "model.pyc", "notes.txt~", ".train.py.swp", "4913", ".fetchml/state",
                       "venv/pyvenv.cfg", "venv/lib/x.py", "secret.log"]


def write(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_without_rules_nothing_is_ignored(tmp_path: Path) -> None:
    for rel in IGNORED_BY_PROJECTS:
        write(tmp_path, rel, rel.encode())
    write(tmp_path, ".gitignore", b"*\n")
    write(tmp_path, ".fetchmlignore", b"*.log\n")
    kept = {e.path for e in scan_tree(tmp_path, rules=None, cache=None).manifest
            if e.kind == "file"}
    assert kept == {*IGNORED_BY_PROJECTS, ".gitignore", ".fetchmlignore"}
    # a project scan of the same tree leaves them out, as before
    synced = scan_tree(tmp_path, rules=IgnoreRules.load(tmp_path), cache=None).manifest
    assert not {e.path for e in synced} & set(IGNORED_BY_PROJECTS)


def test_links_that_leave_the_tree_are_dropped_with_a_sentence(tmp_path: Path) -> None:
    write(tmp_path, "ckpt/model.bin", b"weights")
    os.symlink("/etc/passwd", tmp_path / "absolute")
    os.symlink("../../outside", tmp_path / "ckpt" / "escape")
    os.symlink("model.bin", tmp_path / "ckpt" / "latest")
    os.symlink("../ckpt/model.bin", tmp_path / "ckpt" / "up-and-in")
    os.symlink("ckpt/../../x", tmp_path / "sneaky")
    os.mkfifo(tmp_path / "pipe")
    dropped: list[str] = []
    scan = scan_tree(tmp_path, rules=None, cache=None, dropped=dropped)
    entries = {e.path: e for e in scan.manifest}
    assert entries["ckpt/latest"].kind == "link" and entries["ckpt/latest"].target == "model.bin"
    assert entries["ckpt/up-and-in"].target == "../ckpt/model.bin"
    assert {"absolute", "ckpt/escape", "sneaky", "pipe"}.isdisjoint(entries)
    assert len(dropped) == 4, dropped
    assert any("'absolute'" in d and "/etc/passwd" in d for d in dropped)
    assert any("'ckpt/escape'" in d and "outside" in d for d in dropped)
    assert any("'pipe'" in d and "not a regular file" in d for d in dropped)
    assert all(d.endswith(": left out") for d in dropped)
    # what is stored can be read back, pulled and checked: no link leaves the tree
    SnapshotManifest.decode(scan.manifest.encode())


def test_names_a_snapshot_cannot_hold_are_dropped_not_fatal(tmp_path: Path) -> None:
    write(tmp_path, "good.txt")
    os.close(os.open(os.fsencode(tmp_path) + b"/bad-\xff.txt", os.O_CREAT | os.O_WRONLY))
    os.mkdir(os.fsencode(tmp_path) + b"/dir-\xfe")
    write(tmp_path, "back\\slash.txt")
    dropped: list[str] = []
    scan = scan_tree(tmp_path, rules=None, cache=None, dropped=dropped)
    assert [e.path for e in scan.manifest] == ["good.txt"]
    assert len(dropped) == 3, dropped
    assert sum("not valid UTF-8" in d for d in dropped) == 2
    assert any("backslash" in d for d in dropped)
