"""Storing a job's outputs directory: warnings are bounded, what is left out is said, and a
full disk is recognised."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.daemon.jobs.outputs import MAX_WARNINGS, capped, disk_full_at, ingest


def test_a_million_bad_links_make_a_bounded_list_of_warnings() -> None:
    many = [f"symlink 'l{i}' points outside the tree: left out" for i in range(1000)]
    kept = capped(many)
    assert len(kept) == MAX_WARNINGS
    assert kept[-1] == f"{1000 - MAX_WARNINGS + 1} more entries were left out"
    assert capped(many[:3]) == tuple(many[:3])


def test_ingest_stores_everything_but_links_that_leave(tmp_path: Path) -> None:
    objects, snapshots = ObjectStore(tmp_path / "objects"), ObjectStore(tmp_path / "snapshots")
    outputs = tmp_path / "outputs"
    assert ingest(objects, snapshots, outputs).snapshot is None  # never made
    outputs.mkdir()
    assert ingest(objects, snapshots, outputs).snapshot is None  # wrote nothing
    (outputs / "__pycache__").mkdir()
    (outputs / "__pycache__" / "m.pyc").write_bytes(b"pyc")
    for i in range(MAX_WARNINGS + 5):
        os.symlink(f"/abs/{i}", outputs / f"l{i:02d}")
    done = ingest(objects, snapshots, outputs)
    assert done.snapshot is not None and len(done.warnings) == MAX_WARNINGS
    manifest = SnapshotManifest.decode(snapshots.read_bytes(done.snapshot))
    assert [e.path for e in manifest] == ["__pycache__/m.pyc"]


def test_a_full_disk_is_recognised(tmp_path: Path) -> None:
    """What turns "its supervisor vanished without a status" into a failure with the reason."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert not disk_full_at(disk)
        done = subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'fill'}", "bs=64k"],
                              check=False, capture_output=True, text=True)
        assert "No space left" in done.stderr
        assert disk_full_at(disk)
        assert not disk_full_at(tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_files_not_the_jobs_own_are_left_out_with_a_warning(tmp_path: Path) -> None:
    """A job run as another user may plant a hard link to what only the daemon could read:
    that file is left out, and the rest of its outputs are still stored."""
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    objects, snapshots = ObjectStore(tmp_path / "objects"), ObjectStore(tmp_path / "snapshots")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "mine.txt").write_text("mine")
    for path in (outputs, outputs / "mine.txt"):
        os.chown(path, 65534, 65534)
    (outputs / "secret").write_text("root's")  # root's, as a hard link to /etc/shadow would be
    done = ingest(objects, snapshots, outputs, owner=65534)
    assert done.snapshot is not None
    manifest = SnapshotManifest.decode(snapshots.read_bytes(done.snapshot))
    assert [e.path for e in manifest] == ["mine.txt"]
    assert len(done.warnings) == 1 and "does not belong to uid 65534" in done.warnings[0]
