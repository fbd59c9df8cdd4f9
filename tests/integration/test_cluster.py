"""Several daemons sharing one real redis-server (AOF on, fsync always), on loopback.

Each daemon has its own state dir, a TCP listener on port 0, a name, and its own CPU slots;
they authenticate each other with a cluster secret. Jobs write a line to a shared file when
they complete, so the test counts how many times each job ran to success.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetchml.client import Connection, Target, connect
from fetchml.client.transfer import sync_tree
from fetchml.errors import BadRequest, PermissionDenied, Unauthenticated, Unavailable
from tests.conftest import DaemonProcess, RedisServer, make_daemon

SECRET = "cluster-test-secret"
HEARTBEAT_S, LEASE_S = 0.3, 3.0
TERMINAL = {"succeeded", "failed", "cancelled", "lost"}


class Hosts:
    """A redis-server and named daemons sharing it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = RedisServer(root / "redis").start()
        self.daemons: dict[str, DaemonProcess] = {}

    def start(self, *specs: tuple[str, str, str]) -> None:
        """Start daemons (name, FETCHML_GPUS, FETCHML_CPUS) at once, then wait for all."""
        for name, gpus, cpus in specs:
            (self.root / name / "home").mkdir(parents=True)
            self.daemons[name] = make_daemon(
                self.root / name, "--listen", "127.0.0.1:0", "--name", name,
                "--store", self.redis.url, FETCHML_GPUS=gpus, FETCHML_CPUS=cpus,
                FETCHML_CLUSTER_SECRET=SECRET, FETCHML_HEARTBEAT_INTERVAL=str(HEARTBEAT_S),
                FETCHML_LEASE_TIMEOUT=str(LEASE_S)).start(wait=False)
        for name, _, _ in specs:
            self.daemons[name].wait_ready()
        # A daemon hears of the others on its next heartbeat: wait until each one started
        # here sees all of them alive, so that a submit may go to any of them.
        names = {name for name, _, _ in specs}
        for name in names:
            until(self.sees_alive(name, names), 20, f"{name} to see hosts {sorted(names)}")

    def sees_alive(self, name: str, names: set[str]) -> Any:
        def check() -> bool:
            with self.daemons[name].connect() as conn:
                hosts = conn.call("cluster.hosts")["hosts"]
            return names <= {h["name"] for h in hosts if h["alive"]}

        return check

    def url(self, name: str) -> str:
        return str(self.daemons[name].runtime_info["url"])

    def restart_redis(self, down_s: float, during: Any = None) -> Any:
        """Kill redis-server with -9, call ``during()`` while it is down, start it again."""
        self.redis.stop(signal.SIGKILL)
        started = time.monotonic()
        outcome = during() if during is not None else None
        time.sleep(max(0.0, down_s - (time.monotonic() - started)))
        self.redis = RedisServer(self.redis.root, port=self.redis.port).start()
        return outcome

    def close(self) -> None:
        for daemon in self.daemons.values():
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
        self.redis.stop()


@pytest.fixture
def hosts(short_tmp: Path) -> Iterator[Hosts]:
    cluster = Hosts(short_tmp)
    try:
        yield cluster
    finally:
        cluster.close()


def sync_project(conn: Connection, root: Path, files: dict[str, str]) -> str:
    project = root / "project"
    project.mkdir(exist_ok=True)
    for name, text in files.items():
        (project / name).write_text(text)
    return sync_tree(conn, project, max_file_size=1 << 20).snapshot


def wait_all(conn: Connection, ids: list[int], timeout: float) -> list[dict[str, Any]]:
    stream = conn.stream("jobs.wait", {"jobs": [str(i) for i in ids], "timeout": timeout})
    for _ in stream.events():
        pass
    assert not stream.final["timed_out"], "jobs did not end in time"
    return stream.final["jobs"]  # type: ignore[no-any-return]


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill_with_jobs(daemon: DaemonProcess) -> None:
    """SIGKILL a daemon and every job it supervises, as if its host lost power."""
    daemon.kill()
    for info in daemon.state_dir.glob("runs/*/*/supervisor.json"):
        record = json.loads(info.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record["job_pgid"], signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(record["pid"], signal.SIGKILL)


def test_sixty_jobs_survive_a_dead_host_and_a_redis_restart(hosts: Hosts) -> None:
    # b runs one job at a time, so the test can kill it while that job is surely mid-run
    hosts.start(("a", "", "2"), ("b", "", "1"), ("c", "", "2"))
    conn = hosts.daemons["a"].connect()
    snapshot = sync_project(conn, hosts.root, {"work.sh": "sleep 0.8\n"})
    done_file = hosts.root / "done.log"
    script = (f'sh work.sh && echo "$FETCHML_JOB_ID $FETCHML_ATTEMPT $FETCHML_RUN_DIR" '
              f' >> {done_file}')
    submitted = conn.call("jobs.submit", {"snapshot": snapshot, "jobs": [
        {"argv": ["sh", "-c", script], "name": f"j{i}", "retries": 3} for i in range(60)]})
    ids = [job["id"] for job in submitted["jobs"]]

    def running_on_b() -> list[dict[str, Any]] | None:
        """b's running job, once b has finished one and the one it runs now is mid-sleep (a
        job killed as it finishes would rightly run again: its success was never recorded)."""
        jobs = conn.call("jobs.list", {"states": ["running", "succeeded"], "limit": 100})["jobs"]
        mine = [j for j in jobs if j["host"] == "b"]
        running = [j for j in mine if j["state"] == "running"]
        fresh = all(time.time() - j["started_at"] < 0.4 for j in running)
        done = any(j["state"] == "succeeded" for j in mine)
        return running if running and fresh and done else None

    on_b = until(running_on_b, 40, "b to finish a job and start others")
    kill_with_jobs(hosts.daemons["b"])
    killed = {j["id"] for j in conn.call("jobs.list", {"states": ["running"], "limit": 100})[
        "jobs"] if j["host"] == "b"}
    assert {j["id"] for j in on_b} <= killed

    def submit_while_down() -> float:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            conn.call("jobs.submit", {"snapshot": snapshot, "jobs": [{"argv": ["true"]}]})
        assert conn.call("host.ping")["time"] > 0  # the daemon itself keeps answering
        assert "store_error" in conn.call("host.info")
        return time.monotonic() - started

    refused_in = hosts.restart_redis(2.0, submit_while_down)
    assert refused_in < 3.0

    ended = wait_all(conn, ids, timeout=90)
    states = Counter(job["state"] for job in ended)
    runs = Counter(int(line.split()[0]) for line in done_file.read_text().splitlines())
    twice = sorted(job_id for job_id, count in runs.items() if count > 1)
    never = sorted(set(ids) - set(runs))
    delayed = sum(hosts.daemons[n].log().count("result not stored yet") for n in ("a", "c"))
    print(f"\n60 jobs: {dict(states)}; killed on b: {len(killed)}; results held back by the "
          f"Redis restart: {delayed}; ran to success twice: {len(twice)}; never ran to "
          f"success: {len(never)}; by host: {dict(Counter(job['host'] for job in ended))}")
    assert states == {"succeeded": 60}, ended
    assert not twice and not never, (killed, [line for line in done_file.read_text(
        ).splitlines() if int(line.split()[0]) in twice], hosts.daemons["a"].log()[-5000:])
    assert {job["host"] for job in ended} == {"a", "b", "c"}
    assert delayed >= 1  # jobs ended while Redis was down, and their results still landed
    for job in ended:
        if job["id"] in killed:
            assert job["host"] in ("a", "c") and job["attempt"] >= 2, job
    # status, from any daemon: the same store
    c_conn = hosts.daemons["c"].connect()
    assert c_conn.call("jobs.get", {"job": str(ids[0])})["state"] == "succeeded"
    c_conn.close()
    conn.close()


def test_gpu_job_queued_without_gpus_runs_on_the_host_that_has_one(hosts: Hosts) -> None:
    hosts.start(("a", "", "2"), ("g", "0", "2"))
    a, g = hosts.daemons["a"], hosts.daemons["g"]
    project = hosts.root / "project"
    project.mkdir()
    (project / "data.txt").write_text("only on a\n")
    queued = a.cli("queue", "--json", "--gpus", "1", "--", "sh", "-c",
                   'cat data.txt; echo "gpu=$CUDA_VISIBLE_DEVICES"; '
                   'cp data.txt "$FETCHML_OUTPUT_DIR/"', cwd=project)
    assert queued.returncode == 0, queued.stderr
    body = json.loads(queued.stdout)
    job_id = str(body["jobs"][0]["id"])
    assert a.cli("wait", job_id).returncode == 0, a.log()
    status = json.loads(a.cli("status", "--json", job_id).stdout)
    assert status["state"] == "succeeded" and status["host"] == "g" and status["gpus"] == [0]
    # the snapshot came from a, verified, into g's own store
    assert (g.state_dir / "snapshots" / body["snapshot"][:2] / body["snapshot"][2:]).exists()
    logs = a.cli("logs", job_id)  # served by a, read from g
    assert logs.returncode == 0 and logs.stdout == "only on a\ngpu=0\n", logs.stderr
    followed = a.cli("queue", "--gpus", "1", "--follow", "--", "sh", "-c",
                     "echo one; sleep 1; echo two", cwd=project)  # logs -f relayed from g
    assert followed.returncode == 0 and followed.stdout.endswith("one\ntwo\n"), followed
    pulled = a.cli("pull", job_id, str(hosts.root / "pulled"))
    assert pulled.returncode == 0, pulled.stderr
    assert (hosts.root / "pulled" / "data.txt").read_text() == "only on a\n"

    info = a.cli("info", "--cluster", "--json")
    assert info.returncode == 0, info.stderr
    listed = {h["name"]: h for h in json.loads(info.stdout)["hosts"]}
    assert set(listed) == {"a", "g"}
    assert all({"name", "address", "resources", "free", "last_seen"} <= set(h)
               for h in listed.values())
    assert len(listed["g"]["resources"]["gpus"]) == 1 and listed["a"]["resources"]["gpus"] == []
    assert listed["g"]["address"] == hosts.url("g")

    # cancelled through a, stopped by g
    queued = a.cli("queue", "--json", "--gpus", "1", "--", "sleep", "60", cwd=project)
    long_id = str(json.loads(queued.stdout)["jobs"][0]["id"])
    with a.connect() as conn:
        until(lambda: conn.call("jobs.get", {"job": long_id})["state"] == "running", 20,
              "the job to start on g")
        started = time.monotonic()
        assert a.cli("cancel", long_id).returncode == 0
        ended = wait_all(conn, [int(long_id)], timeout=30)[0]
        assert ended["state"] == "cancelled" and time.monotonic() - started < 15
        with pytest.raises(BadRequest, match="no other host of the cluster has room"):
            conn.call("jobs.submit", {"snapshot": body["snapshot"],
                                      "jobs": [{"argv": ["true"], "gpus": 2}]})


def test_a_daemon_on_its_own_store_is_a_cluster_of_one(daemon: DaemonProcess) -> None:
    listed = daemon.cli("info", "--cluster", "--json")
    assert listed.returncode == 0, listed.stderr
    (host,) = json.loads(listed.stdout)["hosts"]
    assert host["alive"] and host["resources"]["gpus"] == [] and host["last_seen"].endswith("Z")
    table = daemon.cli("info", "--cluster")
    assert table.returncode == 0 and "alive" in table.stdout


def test_peers_need_the_cluster_secret_and_get_only_peer_rights(hosts: Hosts) -> None:
    hosts.start(("a", "", "1"))
    url = hosts.url("a")
    with pytest.raises(Unauthenticated):
        connect(Target(url=url), api_key="not-the-secret")
    with connect(Target(url=url), api_key=SECRET) as peer:
        assert peer.hello["role"] == "cluster"
        assert peer.call("cluster.hosts")["hosts"][0]["name"] == "a"
        with pytest.raises(PermissionDenied):
            peer.call("jobs.submit", {"snapshot": "0" * 64, "jobs": [{"argv": ["true"]}]})


def test_a_host_that_comes_back_stops_its_stale_attempt(hosts: Hosts) -> None:
    hosts.start(("b", "", "1"))  # alone at first: the job can only go to b
    b = hosts.daemons["b"]
    with b.connect() as b_conn:
        snapshot = sync_project(b_conn, hosts.root, {"x": "x"})
        marker = hosts.root / "ran"
        # the first attempt would run long: b must stop it; the retry ends at once
        script = (f'echo "$FETCHML_ATTEMPT" >> {marker}; '
                  'if [ "$FETCHML_ATTEMPT" = 1 ]; then sleep 60; fi')
        job = b_conn.call("jobs.submit", {"snapshot": snapshot, "jobs": [
            {"argv": ["sh", "-c", script], "retries": 1}]})["jobs"][0]
        until(lambda: b_conn.call("jobs.get", {"job": str(job["id"])})["state"] == "running",
              20, "the job to start on b")
    hosts.start(("a", "", "1"))
    conn = hosts.daemons["a"].connect()
    assert sync_project(conn, hosts.root, {"x": "x"}) == snapshot  # a copy that outlives b
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)  # b goes silent; its job keeps running
    try:
        retried = until(lambda: (j := conn.call("jobs.get", {"job": str(job["id"])}))
                        ["attempt"] == 2 and j["host"] and j, 20, "the job to be retried on a")
        assert retried["host"] == "a"
        assert "its host b stopped answering" in hosts.daemons["a"].log()
    finally:
        b.proc.send_signal(signal.SIGCONT)
    # b notices that its attempt lost the job and stops it; its result is refused
    until(lambda: "result of attempt 1 rejected" in b.log(), 20, "b's result to be rejected")
    assert "stopping it" in b.log()
    ended = wait_all(conn, [job["id"]], timeout=30)[0]
    assert ended["state"] == "succeeded" and ended["attempt"] == 2 and ended["host"] == "a"
    assert marker.read_text().split() == ["1", "2"]
    conn.close()


def test_a_restarted_host_stops_the_attempts_that_moved_elsewhere(hosts: Hosts) -> None:
    hosts.start(("b", "", "1"))
    b = hosts.daemons["b"]
    with b.connect() as b_conn:
        snapshot = sync_project(b_conn, hosts.root, {"x": "x"})
        script = 'if [ "$FETCHML_ATTEMPT" = 1 ]; then sleep 60; fi'
        job = b_conn.call("jobs.submit", {"snapshot": snapshot, "jobs": [
            {"argv": ["sh", "-c", script], "retries": 1}]})["jobs"][0]
        until(lambda: b_conn.call("jobs.get", {"job": str(job["id"])})["state"] == "running",
              20, "the job to start on b")
    supervised = until(lambda: list(b.state_dir.glob("runs/*/1/supervisor.json")), 10,
                       "the job's supervisor to record itself")
    info = json.loads(supervised[0].read_text())
    b.kill()  # the daemon only: its job keeps running
    hosts.start(("a", "", "1"))
    with hosts.daemons["a"].connect() as conn:
        assert sync_project(conn, hosts.root, {"x": "x"}) == snapshot
        ended = wait_all(conn, [job["id"]], timeout=30)[0]
        assert ended["state"] == "succeeded" and ended["host"] == "a" and ended["attempt"] == 2
        assert os.path.exists(f"/proc/{info['job_pid']}")  # b's attempt still runs, unseen
        b.start()
        until(lambda: not os.path.exists(f"/proc/{info['job_pid']}"), 20,
              "b to stop its old attempt")
        assert "no longer runs on this host" in b.log()
        assert conn.call("jobs.get", {"job": str(job["id"])})["attempt"] == 2
