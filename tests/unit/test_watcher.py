"""The watch's building blocks on real files: the patched mirror must equal a fresh scan, and
the change watcher must watch only the directories it is given (real inotify)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.scan import scan_tree
from fetchml.client.mirror import TreeMirror
from fetchml.client.watcher import OVERFLOW_RISK_PATHS, Batch, ChangeWatcher
from fetchml.errors import TooLarge

FILES = {"train.py": "print(1)\n", "pkg/a.py": "A = 1\n", "pkg/b.py": "B = 1\n",
         "pkg/sub/c.py": "C = 1\n", "docs/readme.md": "hi\n"}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "empty").mkdir()
    return root


@pytest.fixture
def mirror(tree: Path) -> TreeMirror:
    built = TreeMirror(tree, max_file_size=1 << 20)
    built.watch_dirs()
    built.rescan()
    built.mark_synced()
    return built


def fresh_scan_id(root: Path) -> str:
    return scan_tree(root, rules=IgnoreRules.load(root), cache=None).manifest.snapshot_id


def patch(mirror: TreeMirror, *rels: str) -> None:
    mirror.apply([str(mirror.root / rel) for rel in rels])


def atomic_save(path: Path, text: str) -> None:
    temp = path.with_name(".t.tmp")
    temp.write_text(text)
    os.replace(temp, path)


EDITS: list[tuple[str, Callable[[Path], object], tuple[str, ...], int]] = [
    # (what, edit, paths the events name, files read)
    ("modify", lambda r: (r / "pkg/a.py").write_text("A = 2\n"), ("pkg/a.py",), 1),
    ("add", lambda r: (r / "pkg/new.py").write_text("N\n"), ("pkg/new.py",), 1),
    ("chmod +x", lambda r: (r / "train.py").chmod(0o755), ("train.py",), 1),
    ("delete", lambda r: (r / "pkg/b.py").unlink(), ("pkg/b.py",), 0),
    ("empty a dir", lambda r: (r / "pkg/sub/c.py").unlink(), ("pkg/sub/c.py",), 0),
    ("fill an empty dir", lambda r: (r / "empty/e.py").write_text("E"), ("empty/e.py",), 1),
    ("atomic save", lambda r: atomic_save(r / "train.py", "saved\n"), (".t.tmp", "train.py"), 1),
    ("ignored file", lambda r: (r / "pkg/a.pyc").write_bytes(b"\0"), ("pkg/a.pyc",), 0),
    ("gone temp file", lambda r: None, ("never-there.tmp",), 0),
]


@pytest.mark.parametrize(("what", "edit", "rels", "reads"), EDITS, ids=[e[0] for e in EDITS])
def test_a_patch_equals_a_fresh_scan_and_reads_only_the_changed_file(
        tree: Path, mirror: TreeMirror, what: str, edit: Callable[[Path], object],
        rels: tuple[str, ...], reads: int) -> None:
    edit(tree)
    patch(mirror, *rels)
    assert not mirror.needs_full_scan, what
    assert mirror.hashed_files == reads
    assert mirror.manifest.snapshot_id == fresh_scan_id(tree)


FULL_SCAN_EDITS: list[tuple[str, Callable[[Path], object], tuple[str, ...]]] = [
    ("new dir", lambda r: (r / "newdir").mkdir(), ("newdir",)),
    ("ignore file", lambda r: (r / ".gitignore").write_text("docs/\n"), (".gitignore",)),
    ("symlink", lambda r: (r / "link").symlink_to("train.py"), ("link",)),
    ("non-ascii name", lambda r: (r / "caf\u00e9.py").write_text("accent"), ("caf\u00e9.py",)),
    ("empty dir removed", lambda r: (r / "empty").rmdir(), ("empty",)),
    ("dir removed", lambda r: shutil.rmtree(r / "pkg/sub"), ("pkg/sub",)),
    ("fifo", lambda r: os.mkfifo(r / "pipe"), ("pipe",)),  # never opened: it would block
    ("too large", lambda r: (r / "big.bin").write_bytes(b"x" * 2048), ("big.bin",)),
]


@pytest.mark.parametrize(("what", "edit", "rels"), FULL_SCAN_EDITS,
                         ids=[e[0] for e in FULL_SCAN_EDITS])
def test_what_a_patch_cannot_decide_asks_for_a_full_scan(
        tree: Path, what: str, edit: Callable[[Path], object], rels: tuple[str, ...]) -> None:
    mirror = TreeMirror(tree, max_file_size=1024)
    mirror.watch_dirs()
    mirror.rescan()
    edit(tree)
    patch(mirror, *rels)
    assert mirror.needs_full_scan, what
    mirror.reload_rules()
    if what == "too large":
        with pytest.raises(TooLarge, match=r"big\.bin"):
            mirror.rescan()
        return
    mirror.rescan()
    assert mirror.manifest.snapshot_id == fresh_scan_id(tree)


def test_changed_paths_compare_with_the_last_synced_snapshot(
        tree: Path, mirror: TreeMirror) -> None:
    (tree / "pkg/a.py").write_text("A = 2\n")
    patch(mirror, "pkg/a.py")
    assert mirror.changed_paths() == ["pkg/a.py"]
    (tree / "pkg/a.py").write_text("A = 1\n")  # back to what was synced
    patch(mirror, "pkg/a.py")
    assert mirror.changed_paths() == []
    (tree / "docs/readme.md").unlink()
    (tree / "docs/more.md").write_text("more")
    patch(mirror, "docs/readme.md", "docs/more.md")
    mirror.reload_rules()
    mirror.rescan()  # a full scan finds the same differences
    assert mirror.changed_paths() == ["docs/more.md", "docs/readme.md"]
    mirror.mark_synced()
    assert mirror.changed_paths() == [] and mirror.hashed_files == 0


def test_sources_name_a_file_with_the_new_bytes(tree: Path, mirror: TreeMirror) -> None:
    (tree / "pkg/a.py").write_text("fresh bytes\n")
    patch(mirror, "pkg/a.py")
    entry = next(e for e in mirror.manifest.entries if e.path == "pkg/a.py")
    assert entry.oid is not None
    assert mirror.source(entry.oid).read_text() == "fresh bytes\n"


def test_watch_dirs_prune_ignored_trees_and_virtualenvs(tree: Path) -> None:
    (tree / ".venv/lib/site").mkdir(parents=True)
    (tree / ".venv/pyvenv.cfg").write_text("home = /usr\n")
    (tree / "env2/lib").mkdir(parents=True)
    (tree / "env2/pyvenv.cfg").write_text("home = /usr\n")
    (tree / "data/raw").mkdir(parents=True)
    (tree / ".fetchmlignore").write_text("data/\n")
    (tree / "pkg/__pycache__").mkdir()
    mirror = TreeMirror(tree, max_file_size=1 << 20)
    rels = sorted(os.path.relpath(d, tree) for d in mirror.watch_dirs())
    assert rels == [".", "docs", "empty", "pkg", "pkg/sub"]


# -- the change watcher ------------------------------------------------------------------------
@pytest.fixture
def watcher() -> Iterator[ChangeWatcher]:
    running = ChangeWatcher()
    yield running
    running.close()


def own_inotify_watches() -> int:
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                info = Path(f"/proc/self/fdinfo/{fd}").read_text()
                total += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
        except OSError:
            continue
    return total


def wait_batch(watcher: ChangeWatcher, timeout: float = 5.0) -> Batch:
    batch = watcher.wait(timeout)
    assert batch is not None, "no change reported"
    return batch


def test_each_directory_is_watched_on_its_own(tree: Path, watcher: ChangeWatcher) -> None:
    before = own_inotify_watches()
    assert watcher.watch([str(tree), str(tree / "pkg")])
    assert not watcher.watch([str(tree), str(tree / "pkg")])  # the same set: kept as it is
    assert own_inotify_watches() - before == 2
    (tree / "pkg/sub/c.py").write_text("unwatched")  # pkg/sub is not in the list
    (tree / "pkg/a.py").write_text("watched")
    assert wait_batch(watcher).paths == {str(tree / "pkg/a.py")}
    assert watcher.wait(0.3) is None


def test_a_replaced_watch_reports_the_new_directories(tree: Path, watcher: ChangeWatcher) -> None:
    watcher.watch([str(tree)])
    (tree / "newdir").mkdir()
    assert str(tree / "newdir") in wait_batch(watcher).paths
    assert watcher.watch([str(tree), str(tree / "newdir"), str(tree / "gone-meanwhile")])
    assert watcher.watched == (str(tree), str(tree / "newdir"))
    (tree / "newdir/f.py").write_text("f")
    assert str(tree / "newdir/f.py") in wait_batch(watcher).paths


def test_the_watch_limit_switches_to_polling_with_one_warning(
        tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    limited = ChangeWatcher(watch_limit=1)
    try:
        with caplog.at_level(logging.WARNING, logger="fetchml.client.watcher"):
            limited.watch([str(tree), str(tree / "pkg")])
            limited.watch([str(tree), str(tree / "pkg"), str(tree / "docs")])
        assert limited.polling
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "max_user_watches" in caplog.records[0].getMessage()
        # A change before the poller's first look is in its baseline (the caller scans
        # again for that); later ones are reported.
        deadline = time.monotonic() + 10
        while True:
            (tree / "pkg/a.py").write_text(f"polled change {time.monotonic()}")
            batch = limited.wait(1.0)
            if batch is not None:
                assert str(tree / "pkg/a.py") in batch.paths
                break
            assert time.monotonic() < deadline, "the poller never reported the change"
        assert limited.settled_at is not None
    finally:
        limited.close()


def test_a_burst_ends_once_it_has_been_quiet_for_the_debounce(
        tree: Path, watcher: ChangeWatcher) -> None:
    watcher.watch([str(tree)])
    quiet, gap, count = 0.2, 0.05, 6

    def writer() -> None:
        for index in range(count):
            (tree / f"burst{index}.py").write_text(str(index))
            time.sleep(gap)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[int] = []
    burst = watcher.collect(wait_batch(watcher), quiet, lambda b: seen.append(len(b.paths)))
    ended = time.monotonic()
    last_write = (tree / f"burst{count - 1}.py").stat().st_mtime
    thread.join()
    assert burst.paths == {str(tree / f"burst{i}.py") for i in range(count)}
    assert sum(seen) >= count and not burst.lost
    waited = time.time() - last_write - (time.monotonic() - ended)
    assert quiet <= waited < quiet + 0.3  # generous above: the machine may be busy


def test_wait_times_out_without_changes(tree: Path, watcher: ChangeWatcher) -> None:
    watcher.watch([str(tree)])
    started = time.monotonic()
    assert watcher.wait(0.1) is None
    assert time.monotonic() - started < 1.0
    with pytest.raises(RuntimeError, match="watch"):
        ChangeWatcher().wait(0.1)


def test_a_burst_big_enough_to_overflow_the_event_queue_is_marked_lossy(
        tree: Path, watcher: ChangeWatcher) -> None:
    watcher.watch([str(tree)])
    for index in range(OVERFLOW_RISK_PATHS + 1):
        (tree / f"many{index}.py").write_text("")
    seen: list[bool] = []
    burst = watcher.collect(wait_batch(watcher), 0.2, lambda b: seen.append(b.lost))
    assert len(burst.paths) > OVERFLOW_RISK_PATHS
    assert burst.lost and seen[-1]
