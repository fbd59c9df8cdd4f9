"""Crash safety: kill -9 the daemon at random moments during many syncs of a changing tree.

After every restart the store must check clean (``fetchml fsck --read-data``) and the next
sync must complete while sending no more than the objects the store really lacks.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.scan import scan_tree
from tests.conftest import DaemonProcess, make_daemon

SYNCS = 50
SEED = 20240611
# Share of syncs during which the daemon is killed; each kill costs a restart (~1 s).
KILL_SHARE = 0.28
BIG_FILES = 3
BIG_MIN, BIG_MAX = 2 << 20, 5 << 20  # several MiB, so that kills land mid-upload
# Exit statuses of a sync whose daemon died under it: done already, or "cannot reach" (3).
SURVIVABLE_EXITS = (0, 3)


@dataclass
class Counts:
    syncs: int = 0
    kills: int = 0
    killed_mid_upload: int = 0
    resends: int = 0
    resent_bytes: int = 0


class ChangingTree:
    """A project that gains, loses and rewrites files between syncs."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.serial = 0
        for _ in range(30):
            self.add_small()
        for index in range(BIG_FILES):
            self.write_big(index)

    def add_small(self) -> None:
        self.serial += 1
        path = self.root / f"pkg{self.serial % 4}" / f"mod{self.serial}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.rng.randbytes(self.rng.randint(0, 6000)))

    def write_big(self, index: int) -> None:
        (self.root / f"weights{index}.bin").write_bytes(
            self.rng.randbytes(self.rng.randint(BIG_MIN, BIG_MAX)))

    def small_files(self) -> list[Path]:
        return sorted(self.root.glob("pkg*/*.py"))

    def change(self, *, rewrite_big: bool) -> None:
        for _ in range(self.rng.randint(1, 3)):
            self.add_small()
        smalls = self.small_files()
        for path in self.rng.sample(smalls, 2):
            path.write_bytes(path.read_bytes() + b"# changed\n")
        self.rng.choice(smalls).unlink()
        if rewrite_big or self.rng.random() < 0.5:
            self.write_big(self.rng.randrange(BIG_FILES))


def lacking_bytes(daemon: DaemonProcess, tree: Path) -> tuple[str, int]:
    """(snapshot id of the tree, bytes of its objects that the daemon's store lacks)."""
    manifest = scan_tree(tree, rules=IgnoreRules.load(tree), cache=None).manifest
    sizes = {entry.oid: entry.size for entry in manifest if entry.oid is not None}
    objects = daemon.state_dir / "objects"
    missing = [oid for oid in sizes if not (objects / oid[:2] / oid[2:]).exists()]
    return manifest.snapshot_id, sum(sizes[oid] for oid in missing)


def start_sync(daemon: DaemonProcess, tree: Path) -> subprocess.Popen[str]:
    env = dict(daemon.env, FETCHML_SOCKET=str(daemon.socket))
    return subprocess.Popen([sys.executable, "-m", "fetchml", "sync", "--json", str(tree)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_during(daemon: DaemonProcess, sync: subprocess.Popen[str], *, at_upload: bool,
                delay: float) -> bool:
    """kill -9 the daemon mid-sync, as soon as an upload is being written (``at_upload``) or
    after ``delay`` seconds; True if an upload was in progress at that moment."""
    objects = daemon.state_dir / "objects"
    deadline = time.monotonic() + (2.0 if at_upload else delay)
    mid_upload = False
    while time.monotonic() < deadline and sync.poll() is None:
        mid_upload = any(objects.glob("*/.tmp-*"))
        if at_upload and mid_upload:
            break
        time.sleep(0.005)
    daemon.kill()
    return mid_upload


def check_clean(daemon: DaemonProcess) -> None:
    checked = daemon.cli("fsck", "--read-data", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["problems"] == []


def test_kill_9_during_syncs_never_corrupts_the_store(short_tmp: Path) -> None:
    rng = random.Random(SEED)
    tree = short_tmp / "proj"
    tree.mkdir()
    project = ChangingTree(tree, rng)
    daemon = make_daemon(short_tmp).start()
    counts = Counts()
    started = time.monotonic()
    try:
        for round_no in range(SYNCS):
            kill = rng.random() < KILL_SHARE
            # Half the kills wait for an upload to be under way (a big file changed, so
            # there is one), half come at a random moment: start-up, scan, upload, commit.
            at_upload = kill and rng.random() < 0.5
            delay = rng.uniform(0.05, 0.6)
            if round_no:
                project.change(rewrite_big=at_upload)
            sync = start_sync(daemon, tree)
            if kill:
                counts.kills += 1
                counts.killed_mid_upload += kill_during(daemon, sync, at_upload=at_upload,
                                                        delay=delay)
                _, stderr = sync.communicate(timeout=60)
                assert sync.returncode in SURVIVABLE_EXITS, stderr
                assert "Traceback" not in stderr, stderr
                daemon.start()
                check_clean(daemon)
                expected_id, lacking = lacking_bytes(daemon, tree)
                again = daemon.cli("sync", "--json", str(tree))
                assert again.returncode == 0, again.stderr
                report = json.loads(again.stdout)
                assert report["snapshot"] == expected_id
                assert report["sent_bytes"] <= lacking, (report, lacking)
                counts.resends += report["sent_files"] > 0
                counts.resent_bytes += report["sent_bytes"]
            else:
                stdout, stderr = sync.communicate(timeout=60)
                assert sync.returncode == 0, stderr
                assert json.loads(stdout)["snapshot"] == lacking_bytes(daemon, tree)[0]
            counts.syncs += 1
        check_clean(daemon)
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
    elapsed = time.monotonic() - started
    print(f"\ncrash harness: {counts.syncs} syncs, {counts.kills} kills "
          f"({counts.killed_mid_upload} mid-upload), {counts.resends} re-syncs that sent data "
          f"({counts.resent_bytes / 2**20:.1f} MiB), {elapsed:.1f} s")
    assert counts.syncs == SYNCS
    assert counts.kills >= SYNCS * KILL_SHARE / 2 and counts.killed_mid_upload >= 2
