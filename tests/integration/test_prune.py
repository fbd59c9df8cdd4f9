"""fetchml prune and garbage collection against a real daemon."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from fetchml.cas.manifest import SnapshotManifest
from fetchml.errors import NotFound, PermissionDenied
from tests.conftest import DaemonProcess, make_inprocess_daemon


def objects_on_disk(daemon: DaemonProcess) -> set[str]:
    root = daemon.state_dir / "objects"
    return {p.parent.name + p.name for p in root.glob("??/*") if not p.name.startswith(".")}


def age_everything(daemon: DaemonProcess, seconds: float = 7200) -> None:
    """Make every stored object and manifest look old (grace periods are about age)."""
    old = time.time() - seconds
    for store in ("objects", "snapshots"):
        for path in (daemon.state_dir / store).glob("??/*"):
            os.utime(path, (old, old), follow_symlinks=False)


def queue(daemon: DaemonProcess, project: Path, *args: str, env: dict[str, str] | None = None
          ) -> str:
    done = daemon.cli("queue", "--json", *args, cwd=project, env=env)
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["jobs"][0]["id"])


def prune(daemon: DaemonProcess, *args: str, env: dict[str, str] | None = None
          ) -> dict[str, object]:
    done = daemon.cli("prune", "--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture
def project(short_tmp: Path) -> Path:
    path = short_tmp / "proj"
    path.mkdir()
    (path / "train.py").write_text("print('training')\n")
    (path / "data.bin").write_bytes(os.urandom(20_000))
    return path


def test_prune_deletes_old_finished_runs_never_active_ones(daemon: DaemonProcess,
                                                           project: Path) -> None:
    done = [queue(daemon, project, "--", "sh", "-c", f"echo {i} > $FETCHML_OUTPUT_DIR/o")
            for i in range(3)]
    assert daemon.cli("wait", *done).returncode == 0
    blocker = queue(daemon, project, "--", "sleep", "30")
    held = queue(daemon, project, "--after", blocker, "--", "true")
    dry = prune(daemon, "--older-than", "0", "--dry-run", "--gc-grace", "0")
    assert dry["dry_run"] is True and dry["jobs"] == 3 and dry["runs"] == 3
    assert dry["objects"] >= 3  # the three outputs go with their jobs
    with daemon.connect() as conn:
        assert conn.call("jobs.get", {"job": done[0]})["state"] == "succeeded"
    real = prune(daemon, "--older-than", "0", "--gc-grace", "0")
    assert {k: real[k] for k in ("jobs", "runs", "objects", "bytes")} == \
        {k: dry[k] for k in ("jobs", "runs", "objects", "bytes")}
    with daemon.connect() as conn:
        for job in done:
            with pytest.raises(NotFound):
                conn.call("jobs.get", {"job": job})
        assert conn.call("jobs.get", {"job": blocker})["state"] == "running"
        assert conn.call("jobs.get", {"job": held})["state"] == "held"
        conn.call("jobs.cancel", {"jobs": [blocker]})
    assert not (daemon.state_dir / "runs" / done[0]).exists()
    assert daemon.cli("fsck", "--read-data").returncode == 0


def test_keep_state_and_older_than_select_jobs(daemon: DaemonProcess, project: Path) -> None:
    ok = [queue(daemon, project, "--", "true") for _ in range(3)]
    bad = [queue(daemon, project, "--", "false") for _ in range(2)]
    daemon.cli("wait", *ok, *bad)
    assert prune(daemon, "--older-than", "1h", "--no-gc")["jobs"] == 0
    report = prune(daemon, "--older-than", "0", "--state", "failed", "--no-gc")
    assert report["jobs"] == 2 and report["objects"] == 0
    assert prune(daemon, "--older-than", "0", "--keep", "1", "--no-gc")["jobs"] == 2
    with daemon.connect() as conn:
        assert [j["id"] for j in conn.call("jobs.list", {})["jobs"]] == [int(ok[-1])]
    bad_state = daemon.cli("prune", "--state", "running")
    assert bad_state.returncode == 2


def test_gc_keeps_young_pinned_and_referenced_objects(daemon: DaemonProcess,
                                                      project: Path) -> None:
    job = queue(daemon, project, "--", "true")  # keeps its snapshot referenced
    daemon.cli("wait", job)
    referenced = objects_on_disk(daemon)
    other = project.parent / "other"
    other.mkdir()
    (other / "unused.txt").write_text("never queued\n")
    sync = json.loads(daemon.cli("sync", "--json", cwd=other).stdout)
    pinned_dir = project.parent / "pinned"
    pinned_dir.mkdir()
    (pinned_dir / "keep.txt").write_text("pinned\n")
    pinned = json.loads(daemon.cli("sync", "--json", cwd=pinned_dir).stdout)["snapshot"]
    assert daemon.cli("pin", pinned[:10]).returncode == 0
    all_objects = objects_on_disk(daemon)
    assert prune(daemon, "--no-gc", "--older-than", "1d")["objects"] == 0
    young = prune(daemon, "--older-than", "1d")  # default grace: everything is young
    assert young["objects"] == 0 and objects_on_disk(daemon) == all_objects
    age_everything(daemon)
    report = prune(daemon, "--older-than", "1d")
    assert report["objects"] == 1 and report["snapshots"] == 1  # unused.txt and its manifest
    left = objects_on_disk(daemon)
    assert referenced <= left and len(left) == len(all_objects) - 1
    assert not (daemon.state_dir / "snapshots" / sync["snapshot"][:2] /
                sync["snapshot"][2:]).exists()
    assert daemon.cli("unpin", pinned).returncode == 0
    age_everything(daemon)
    assert prune(daemon, "--older-than", "1d")["objects"] == 1  # keep.txt, now unpinned
    assert daemon.cli("fsck", "--read-data").returncode == 0


def test_researcher_prunes_only_their_jobs_and_analyst_cannot_prune(daemon: DaemonProcess,
                                                                    project: Path) -> None:
    with daemon.connect() as admin:
        keys = {name: admin.call("admin.users.add", {"name": name, "role": role})["key"]
                for name, role in (("rita", "researcher"), ("ravi", "researcher"),
                                   ("ana", "analyst"))}
    rita, ravi = ({"FETCHML_API_KEY": keys[n]} for n in ("rita", "ravi"))
    mine = queue(daemon, project, "--", "true", env=rita)
    theirs = queue(daemon, project, "--", "true", env=ravi)
    daemon.cli("wait", mine, theirs)
    refused = daemon.cli("prune", "--older-than", "0", "--user", "ravi", env=rita)
    assert refused.returncode == 4 and "may not" in refused.stderr
    refused = daemon.cli("prune", "--older-than", "0", "--all", env=rita)
    assert refused.returncode == 4
    refused = daemon.cli("prune", "--older-than", "0", "--gc-grace", "0", env=rita)
    assert refused.returncode == 4
    assert prune(daemon, "--older-than", "0", env=rita)["jobs"] == 1
    with daemon.connect() as admin:
        assert admin.call("jobs.get", {"job": theirs})["owner"] == "ravi"
        with pytest.raises(NotFound):
            admin.call("jobs.get", {"job": mine})
    analyst = daemon.cli("prune", "--older-than", "0", env={"FETCHML_API_KEY": keys["ana"]})
    assert analyst.returncode == 4 and "jobs:prune" in analyst.stderr
    with daemon.connect(api_key=keys["ana"]) as ana, pytest.raises(PermissionDenied):
        ana.call("admin.prune", {"older_than": 0})
    assert prune(daemon, "--older-than", "0", "--user", "ravi")["jobs"] == 1  # admin may


def test_retention_policy_prunes_periodically(short_tmp: Path, project: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_RETENTION_OLDER_THAN="0",
                         FETCHML_RETENTION_INTERVAL="0.5").start()
    try:
        job = queue(daemon, project, "--", "true")
        daemon.cli("wait", job)
        deadline = time.monotonic() + 20
        with daemon.connect() as conn:
            while True:
                try:
                    conn.call("jobs.get", {"job": job})
                except NotFound:
                    break
                assert time.monotonic() < deadline, "retention never pruned the job"
                time.sleep(0.1)
    finally:
        daemon.stop()


def test_sync_during_gc_completes_with_an_intact_snapshot(daemon: DaemonProcess,
                                                          short_tmp: Path) -> None:
    tree = short_tmp / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(3000):  # old garbage and old-but-reused objects: gc has work to do
        (tree / "many" / f"f{i}.txt").write_text(f"old file {i}\n")
    first = json.loads(daemon.cli("sync", "--json", cwd=tree).stdout)
    assert first["sent_files"] == 3000
    age_everything(daemon)  # the first snapshot and all its objects are collectable now
    for i in range(0, 3000, 2):
        (tree / "many" / f"f{i}.txt").unlink()  # half of them become garbage for good
    (tree / "new.txt").write_text("written during the collection\n")
    gc_done = threading.Event()
    gc_result: list[object] = []

    def collect() -> None:
        gc_result.append(prune(daemon, "--older-than", "1d", "--gc-grace", "0"))
        gc_done.set()

    collector = threading.Thread(target=collect)
    collector.start()
    snapshots = []
    while not gc_done.is_set() or not snapshots:
        done = daemon.cli("sync", "--json", cwd=tree)
        assert done.returncode == 0, done.stderr
        snapshots.append(json.loads(done.stdout)["snapshot"])
    collector.join(timeout=60)
    assert gc_result and int(gc_result[0]["objects"]) >= 1500  # type: ignore[index]
    with daemon.connect() as conn:
        for snapshot in set(snapshots):
            manifest = conn.call("snapshot.get", {"snapshot": snapshot})["manifest"]
            oids = sorted(SnapshotManifest.decode(manifest).oids())
            assert conn.call("cas.missing", {"oids": oids})["missing"] == []
    assert daemon.cli("fsck", "--read-data").returncode == 0
