"""Datasets against real daemons: push, versions, jobs reading them, removal, gc, clusters."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from fetchml.daemon.datasets.registry import REMOVING, SqliteDatasetRegistry
from fetchml.daemon.isolation import service as isolation
from fetchml.errors import Conflict, NotFound, PermissionDenied
from tests.conftest import (
    DaemonProcess,
    RedisServer,
    make_daemon,
    make_inprocess_daemon,
    stop_if_running,
)

MiB = 1 << 20
# Each job prints a digest of every file it sees and the inode of the dataset's root.
SHOW_DATA = ('cd "$FETCHML_DATA_DIR/imgs" && find . -type f | sort | xargs sha256sum '
             '&& stat -L -c "inode %i" .')


def run_json(daemon: DaemonProcess, *args: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> Any:
    done = daemon.cli("--json", *args, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def push(daemon: DaemonProcess, name: str, path: Path, *args: str,
         env: dict[str, str] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = run_json(daemon, "dataset", "push", name, str(path), *args, env=env)
    return result


def queue(daemon: DaemonProcess, project: Path, *args: str,
          env: dict[str, str] | None = None) -> list[str]:
    result = run_json(daemon, "queue", *args, cwd=project, env=env)
    return [str(job["id"]) for job in result["jobs"]]


def job(daemon: DaemonProcess, job_id: str) -> dict[str, Any]:
    with daemon.connect() as conn:
        found: dict[str, Any] = conn.call("jobs.get", {"job": job_id})
    return found


def logs(daemon: DaemonProcess, job_id: str) -> str:
    return daemon.cli("logs", job_id).stdout


def wait_state(daemon: DaemonProcess, job_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while job(daemon, job_id)["state"] != state:
        assert time.monotonic() < deadline, f"job {job_id} never became {state}"
        time.sleep(0.05)


def materialisations(daemon: DaemonProcess) -> int:
    return daemon.log().count("materialised dataset")


def objects_on_disk(daemon: DaemonProcess) -> set[str]:
    root = daemon.state_dir / "objects"
    return {p.parent.name + p.name for p in root.glob("??/*") if not p.name.startswith(".")}


def fsck_clean(daemon: DaemonProcess) -> bool:
    done = daemon.cli("fsck", "--read-data")
    return done.returncode == 0 and "no problems" in done.stdout


def tree_digests(root: Path) -> dict[str, str]:
    return {f"./{p.relative_to(root)}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and ".fetchml" not in p.parts}


def seen_digests(output: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in output.splitlines()
            if len(line.split()) == 2 and line.split()[1].startswith("./")}


@pytest.fixture
def data(short_tmp: Path) -> Path:
    path = short_tmp / "data"
    (path / "train").mkdir(parents=True)
    for i in range(4):
        (path / "train" / f"part{i}.bin").write_bytes(os.urandom(MiB))
    (path / "labels.csv").write_text("id,label\n1,cat\n")
    return path


@pytest.fixture
def project(short_tmp: Path) -> Path:
    path = short_tmp / "proj"
    path.mkdir()
    (path / "train.py").write_text("print('training')\n")
    (path / "taken").write_text("part of the code\n")
    return path


@pytest.fixture
def busy_daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    """A daemon with room for ten jobs at once."""
    proc = make_inprocess_daemon(short_tmp, FETCHML_CPUS="16").start()
    yield proc
    stop_if_running(proc)


def test_push_sends_what_changed_only_and_an_unchanged_tree_is_no_new_version(
        daemon: DaemonProcess, data: Path) -> None:
    first = push(daemon, "imgs", data, "--description", "four parts")
    assert (first["version"], first["created"], first["files"]) == (1, True, 5)
    assert first["sent_bytes"] == first["bytes"] >= 4 * MiB
    again = push(daemon, "imgs", data)
    assert (again["version"], again["created"], again["sent_bytes"]) == (1, False, 0)
    assert again["snapshot"] == first["snapshot"]
    (data / "train" / "part2.bin").write_bytes(os.urandom(MiB))
    second = push(daemon, "imgs", data)
    assert (second["version"], second["created"]) == (2, True)
    assert (second["sent_files"], second["sent_bytes"]) == (1, MiB)
    human = daemon.cli("dataset", "push", "imgs", str(data))
    assert human.returncode == 0 and "imgs@2 is unchanged" in human.stdout
    info = run_json(daemon, "dataset", "info", "imgs")
    assert info["name"] == "imgs" and info["owner"] == "root"
    assert [v["version"] for v in info["versions"]] == [1, 2]
    v1 = info["versions"][0]
    assert {k: v1[k] for k in ("snapshot", "files", "bytes", "pushed_by", "description")} == {
        "snapshot": first["snapshot"], "files": 5, "bytes": first["bytes"],
        "pushed_by": "root", "description": "four parts"}
    assert v1["pushed_at"].endswith("Z") and v1["cached"] is False
    only = run_json(daemon, "dataset", "info", "imgs@2")
    assert [v["version"] for v in only["versions"]] == [2]
    listed = run_json(daemon, "dataset", "list")["datasets"]
    assert [(d["name"], d["owner"], d["versions"], d["latest"]["version"])
            for d in listed] == [("imgs", "root", 2, 2)]
    table = daemon.cli("dataset", "list").stdout
    assert "imgs" in table and "root" in table


@pytest.mark.slow
def test_a_1_gib_dataset_pushed_twice_is_sent_once(daemon: DaemonProcess,
                                                    short_tmp: Path) -> None:
    data = short_tmp / "big"
    data.mkdir()
    chunk = os.urandom(16 * MiB)
    for i in range(64):  # 64 distinct 16 MiB files: 1 GiB
        (data / f"shard{i:02d}.bin").write_bytes(i.to_bytes(8, "big") + chunk[8:])
    first = push(daemon, "big", data)
    assert first["bytes"] == first["sent_bytes"] == 1 << 30
    again = push(daemon, "big", data)
    assert (again["created"], again["sent_bytes"]) == (False, 0)
    with open(data / "shard07.bin", "r+b") as shard:
        shard.write(b"changed!")
    second = push(daemon, "big", data)
    assert (second["version"], second["sent_files"], second["sent_bytes"]) == (2, 1, 16 * MiB)
    assert fsck_clean(daemon)


def test_names_versions_and_permissions_are_checked(daemon: DaemonProcess, data: Path,
                                                    project: Path) -> None:
    with daemon.connect() as admin:
        keys = {name: admin.call("admin.users.add", {"name": name, "role": role})["key"]
                for name, role in (("rita", "researcher"), ("ravi", "researcher"),
                                   ("ana", "analyst"))}
    rita, ravi, ana = ({"FETCHML_API_KEY": keys[n]} for n in ("rita", "ravi", "ana"))
    assert push(daemon, "imgs", data, env=rita)["pushed_by"] == "rita"
    (data / "labels.csv").write_text("id,label\n1,dog\n")
    assert push(daemon, "imgs", data, env=ravi)["version"] == 2  # a team's data grows
    analyst = daemon.cli("dataset", "push", "mine", str(data), env=ana)
    assert analyst.returncode == 4 and "may not" in analyst.stderr  # nor upload
    with daemon.connect(api_key=keys["ana"]) as conn, pytest.raises(PermissionDenied,
                                                                    match="datasets:write"):
        conn.call("datasets.push", {"name": "mine", "snapshot": "0" * 64})
    assert run_json(daemon, "dataset", "info", "imgs", env=ana)["owner"] == "rita"
    assert len(run_json(daemon, "dataset", "list", env=ana)["datasets"]) == 1
    # ravi may use rita's dataset and remove the version he pushed, not hers
    assert queue(daemon, project, "--dataset", "imgs@1", "--", "true", env=ravi)
    refused = daemon.cli("dataset", "rm", "imgs@1", env=ravi)
    assert refused.returncode == 4 and "belongs to rita" in refused.stderr
    refused = daemon.cli("dataset", "rm", "imgs", env=ravi)
    assert refused.returncode == 4
    with daemon.connect(api_key=keys["ana"]) as conn, pytest.raises(PermissionDenied):
        conn.call("datasets.rm", {"name": "imgs@2"})
    daemon.cli("wait", "1")
    assert [v["version"] for v in run_json(daemon, "dataset", "rm", "imgs@2",
                                           env=ravi)["removed"]] == [2]
    assert run_json(daemon, "dataset", "rm", "imgs", env=rita)["removed"][0]["version"] == 1
    assert push(daemon, "imgs", data, env=ravi)["version"] == 3  # numbers are never reused
    assert run_json(daemon, "dataset", "rm", "imgs")["removed"][0]["version"] == 3  # admin
    for bad, code, words in (("dataset info nothing", 1, "no dataset nothing"),
                             ("dataset info imgs@x", 2, "positive number"),
                             ("dataset info a/b", 2, "not a dataset name"),
                             ("dataset rm nothing@1", 1, "no dataset nothing"),
                             ("dataset push .bad " + str(data), 2, "not a dataset name")):
        done = daemon.cli(*bad.split())
        last = done.stderr.strip().splitlines()[-1]  # the sentence after click's usage lines
        assert done.returncode == code and words in last, (bad, done.stderr)


def test_jobs_read_the_version_they_were_queued_with(daemon: DaemonProcess, data: Path,
                                                     project: Path) -> None:
    v1 = tree_digests(data)
    push(daemon, "imgs", data)
    (data / "labels.csv").write_text("id,label\n1,dog\n")
    push(daemon, "imgs", data)
    [latest, pinned, mounted] = [queue(daemon, project, *args, "--", "sh", "-c", script)[0]
                                 for args, script in (
        (("--dataset", "imgs"), SHOW_DATA),
        (("--dataset", "imgs@1"), SHOW_DATA),
        (("--dataset", "imgs@1:data/in", "--dataset", "imgs:latest"),
         "cat data/in/labels.csv latest/labels.csv; ls $FETCHML_DATA_DIR | wc -l"))]
    assert daemon.cli("wait", latest, pinned, mounted).returncode == 0
    assert job(daemon, latest)["datasets"] == ["imgs@2"]
    assert job(daemon, pinned)["datasets"] == ["imgs@1"]
    assert job(daemon, mounted)["datasets"] == ["imgs@1:data/in", "imgs@2:latest"]
    assert seen_digests(logs(daemon, latest)) == tree_digests(data)
    assert seen_digests(logs(daemon, pinned)) == v1
    assert logs(daemon, mounted).split() == ["id,label", "1,cat", "id,label", "1,dog", "0"]
    status = run_json(daemon, "status", mounted)
    assert status["datasets"] == ["imgs@1:data/in", "imgs@2:latest"]
    assert "imgs@1:data/in, imgs@2:latest" in daemon.cli("status", mounted).stdout
    info = run_json(daemon, "dataset", "info", "imgs")
    assert [v["cached"] for v in info["versions"]] == [True, True]


def test_bad_dataset_references_are_refused_at_submit(daemon: DaemonProcess, data: Path,
                                                      project: Path) -> None:
    push(daemon, "imgs", data)
    for ref, code, words in (("nothing", 1, "no dataset nothing"),
                             ("imgs@5", 1, "no version 5"),
                             ("imgs@1:../out", 1, "snapshot paths are relative"),
                             ("im/gs", 1, "not a dataset name")):
        done = daemon.cli("queue", "--dataset", ref, "--", "true", cwd=project)
        assert done.returncode == code and words in done.stderr, (ref, done.stderr)
    clash = daemon.cli("queue", "--dataset", "imgs@1", "--dataset", "imgs", "--", "true",
                       cwd=project)
    assert clash.returncode == 1 and "would appear at" in clash.stderr
    nested = daemon.cli("queue", "--dataset", "imgs:d", "--dataset", "imgs:d/e", "--", "true",
                        cwd=project)
    assert nested.returncode == 1 and "would appear at" in nested.stderr
    with daemon.connect() as conn:
        snapshot = run_json(daemon, "sync", cwd=project)["snapshot"]
        with pytest.raises(NotFound):
            conn.call("jobs.submit", {"snapshot": snapshot,
                                      "jobs": [{"argv": ["true"], "datasets": ["imgs@9"]}]})
        assert conn.call("jobs.list", {})["jobs"] == []  # nothing was queued
    [taken] = queue(daemon, project, "--dataset", "imgs:taken", "--", "true")
    assert daemon.cli("wait", taken).returncode != 0
    failed = job(daemon, taken)
    assert failed["state"] == "failed" and "snapshot has that path already" in failed["reason"]


def test_ten_jobs_share_one_materialisation(busy_daemon: DaemonProcess, data: Path,
                                            project: Path) -> None:
    daemon = busy_daemon
    pushed = push(daemon, "imgs", data)
    started = time.monotonic()
    grid = "i=" + ",".join(map(str, range(10)))
    jobs = queue(daemon, project, "--dataset", "imgs", "--grid", grid, "--", "sh", "-c",
                 "echo job {i}; " + SHOW_DATA)
    assert len(jobs) == 10
    assert daemon.cli("wait", *jobs, timeout=120).returncode == 0
    elapsed = time.monotonic() - started
    outputs = [logs(daemon, j) for j in jobs]
    seen = [seen_digests(out) for out in outputs]
    assert all(s == tree_digests(data) for s in seen)
    inodes = {line for out in outputs for line in out.splitlines() if line.startswith("inode")}
    assert len(inodes) == 1  # the same tree, not ten copies
    assert materialisations(daemon) == 1
    cache = daemon.state_dir / "datasets" / "cache"
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    runs_bytes = sum(p.lstat().st_size for p in (daemon.state_dir / "runs").rglob("*")
                     if p.is_file() or p.is_symlink())
    assert cache_bytes == pushed["bytes"]
    assert runs_bytes < pushed["bytes"] // 20  # run dirs hold links and logs, no data
    print(f"\n10 jobs on one {pushed['bytes'] / MiB:.1f} MiB dataset: {elapsed:.2f} s, "
          f"cache {cache_bytes / MiB:.1f} MiB, run dirs {runs_bytes / 1024:.1f} KiB")


def test_a_job_cannot_change_stored_objects_through_a_dataset(daemon: DaemonProcess,
                                                              data: Path,
                                                              project: Path) -> None:
    """Without isolation a job runs as the daemon's user (root here): it may change its view,
    but never a stored object, and the next job still reads the pushed bytes."""
    push(daemon, "imgs", data)
    attack = ('d="$FETCHML_DATA_DIR/imgs"; chmod -R u+w "$d"; echo evil > "$d/labels.csv"; '
              'rm -f "$d/train/part0.bin"; chmod 777 "$d/train/part1.bin"; '
              'echo new > "$d/train/extra"; exit 0')
    [vandal] = queue(daemon, project, "--dataset", "imgs", "--", "sh", "-c", attack)
    daemon.cli("wait", vandal)
    assert fsck_clean(daemon)
    [reader] = queue(daemon, project, "--dataset", "imgs", "--", "sh", "-c", SHOW_DATA)
    assert daemon.cli("wait", reader).returncode == 0
    assert seen_digests(logs(daemon, reader)) == tree_digests(data)
    assert "was altered; replacing it" in daemon.log()
    assert fsck_clean(daemon)


@pytest.mark.skipif("bwrap" not in Path(isolation.__file__).read_text(),
                    reason="needs --isolation bwrap (the isolation module is still a stub)")
def test_under_bwrap_a_job_cannot_modify_delete_or_chmod_a_dataset_file(
        short_tmp: Path, data: Path, project: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_ISOLATION_CHOICES="bwrap").start()
    try:
        push(daemon, "imgs", data)
        snapshot = run_json(daemon, "sync", cwd=project)["snapshot"]
        attacks = {"modify": 'echo evil > "$D/labels.csv"', "delete": 'rm "$D/labels.csv"',
                   "chmod": 'chmod 666 "$D/labels.csv"', "mount": "echo evil > in/labels.csv"}
        with daemon.connect() as conn:
            jobs = conn.call("jobs.submit", {"snapshot": snapshot, "jobs": [
                {"argv": ["sh", "-c", f'D="$FETCHML_DATA_DIR/imgs"; {script}'],
                 "datasets": ["imgs", "imgs:in"], "isolation": "bwrap", "name": name}
                for name, script in attacks.items()]})["jobs"]
        ids = [str(j["id"]) for j in jobs]
        daemon.cli("wait", *ids)
        for job_id in ids:
            assert job(daemon, job_id)["state"] == "failed"
            assert "Read-only file system" in logs(daemon, job_id)
        [reader] = queue(daemon, project, "--dataset", "imgs", "--", "sh", "-c", SHOW_DATA)
        assert daemon.cli("wait", reader).returncode == 0
        assert seen_digests(logs(daemon, reader)) == tree_digests(data)
        assert materialisations(daemon) == 1 and fsck_clean(daemon)
    finally:
        daemon.stop()


def test_rm_is_refused_while_jobs_use_it_then_gc_reclaims(daemon_process: DaemonProcess,
                                                          data: Path, project: Path) -> None:
    daemon = daemon_process  # restarted below
    push(daemon, "imgs", data)
    unique = data / "train" / "part3.bin"
    unique.write_bytes(os.urandom(MiB))
    v2 = push(daemon, "imgs", data)
    [running] = queue(daemon, project, "--dataset", "imgs@2", "--", "sleep", "60")
    [held] = queue(daemon, project, "--after", running, "--dataset", "imgs@2", "--", "true")
    wait_state(daemon, running, "running")
    refused = daemon.cli("dataset", "rm", "imgs@2")
    assert refused.returncode == 1
    assert f"used by 2 held, queued or running jobs (yours: {held}, {running})" in refused.stderr
    with daemon.connect() as conn:
        with pytest.raises(Conflict) as err:
            conn.call("datasets.rm", {"name": "imgs"})
        assert err.value.details["count"] == 2
        assert conn.call("jobs.get", {"job": running})["state"] == "running"
        assert [v["state"] for v in conn.call("datasets.info", {"name": "imgs"})["versions"]] \
            == ["ready", "ready"]  # a refused removal leaves every version usable
        conn.call("jobs.cancel", {"jobs": [running, held]})
    daemon.cli("wait", running, held)
    # restarting keeps the registry, and versions stay gc roots
    daemon.stop()
    daemon.start()
    before = objects_on_disk(daemon)
    run_json(daemon, "prune", "--gc-grace", "0")
    assert objects_on_disk(daemon) == before and fsck_clean(daemon)
    removed = run_json(daemon, "dataset", "rm", "imgs@2")["removed"]
    assert [(v["version"], v["state"]) for v in removed] == [(2, "removed")]
    assert not (daemon.state_dir / "datasets" / "cache" / v2["snapshot"]).exists()
    freed = run_json(daemon, "prune", "--gc-grace", "0")
    assert freed["objects"] == 1 and freed["bytes"] >= MiB  # part3 of v2 only
    assert len(objects_on_disk(daemon)) == len(before) - 1
    assert [v["version"] for v in run_json(daemon, "dataset", "info", "imgs")["versions"]] == [1]
    gone = daemon.cli("queue", "--dataset", "imgs@2", "--", "true", cwd=project)
    assert gone.returncode == 1 and "no version 2" in gone.stderr
    assert fsck_clean(daemon)


def test_a_version_being_removed_is_refused_to_new_jobs(daemon: DaemonProcess, data: Path,
                                                        project: Path) -> None:
    push(daemon, "imgs", data)

    async def mark() -> None:
        registry = SqliteDatasetRegistry(daemon.state_dir / "datasets.db")
        await registry.open()
        await registry.set_state("imgs", 1, REMOVING, expect=("ready",))
        await registry.close()

    asyncio.run(mark())
    done = daemon.cli("queue", "--dataset", "imgs@1", "--", "true", cwd=project)
    assert done.returncode == 1 and "imgs@1 is being removed" in done.stderr
    done = daemon.cli("queue", "--dataset", "imgs", "--", "true", cwd=project)
    assert done.returncode == 1 and "every version of dataset imgs" in done.stderr


def test_a_cluster_shares_the_registry_and_fetches_datasets(
        short_tmp: Path, data: Path, project: Path, redis_server: RedisServer) -> None:
    """a stores the dataset; b (the only host with a GPU) runs the jobs and fetches it."""
    url = redis_server.url.replace("/0", "/5")
    redis.Redis.from_url(url).flushdb()
    daemons = {}
    for name, gpus in (("a", ""), ("b", "0")):
        (short_tmp / name / "home").mkdir(parents=True)
        daemons[name] = make_daemon(
            short_tmp / name, "--listen", "127.0.0.1:0", "--name", name, "--store", url,
            FETCHML_GPUS=gpus, FETCHML_CLUSTER_SECRET="datasets-test",
            FETCHML_HEARTBEAT_INTERVAL="0.3").start()
    a, b = daemons["a"], daemons["b"]
    try:
        pushed = push(a, "imgs", data)
        [reader] = queue(a, project, "--gpus", "1", "--dataset", "imgs", "--", "sh", "-c",
                         SHOW_DATA)
        assert a.cli("wait", reader).returncode == 0, job(a, reader)
        assert job(a, reader)["host"] == "b"
        assert seen_digests(logs(a, reader)) == tree_digests(data)
        assert run_json(b, "dataset", "info", "imgs")["versions"][0]["cached"] is True
        assert run_json(a, "dataset", "info", "imgs")["versions"][0]["cached"] is False
        same = push(b, "imgs", data)  # b holds the objects now: nothing to send, no version
        assert (same["version"], same["created"], same["sent_bytes"]) == (1, False, 0)
        [running] = queue(a, project, "--gpus", "1", "--dataset", "imgs", "--", "sleep", "60")
        wait_state(a, running, "running")
        refused = a.cli("dataset", "rm", "imgs")
        assert refused.returncode == 1 and "used by 1" in refused.stderr
        with a.connect() as conn:
            conn.call("jobs.cancel", {"jobs": [running]})
        a.cli("wait", running)
        assert run_json(a, "dataset", "rm", "imgs")["removed"][0]["version"] == 1
        cache = b.state_dir / "datasets" / "cache" / pushed["snapshot"]
        deadline = time.monotonic() + 20
        while cache.exists():  # b hears of the removal made on a and drops its cache
            assert time.monotonic() < deadline, "b never noticed the removal made on a"
            time.sleep(0.1)
        assert run_json(b, "prune", "--gc-grace", "0")["objects"] >= 5
        assert run_json(a, "prune", "--gc-grace", "0")["objects"] >= 5
        assert fsck_clean(a) and fsck_clean(b)
        assert run_json(b, "dataset", "list")["datasets"] == []
    finally:
        for proc in (a, b):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()


def test_dataset_help_and_queue_option(daemon: DaemonProcess) -> None:
    done = subprocess.run([sys.executable, "-m", "fetchml", "queue", "--help"], capture_output=True,
                          text=True, check=False, env=daemon.env)
    assert "--dataset NAME[@V][:MOUNT]" in done.stdout
    done = daemon.cli("dataset", "--help")
    assert all(word in done.stdout for word in ("push", "list", "info", "rm"))
