"""Isolated runs against a real daemon: what a bwrap job cannot reach, limits that stop jobs
(and say which), a fork bomb contained while the daemon keeps answering, and Podman where it
works. Tests run as root here, which is the hardest case for the sandbox."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fetchml.client import Connection
from fetchml.client.transfer import sync_tree
from fetchml.daemon.isolation.cgroups import JOBS_DIR
from fetchml.daemon.isolation.service import daemon_tag
from fetchml.errors import BadRequest
from tests.conftest import DaemonProcess, make_daemon

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")

TERMINAL = {"succeeded", "failed", "cancelled", "lost"}
MiB = 1 << 20
MAX_PROCESSES = 64
DAEMON_SECRETS = {"FETCHML_CLUSTER_SECRET": "cluster-secret-value",
                  "FETCHML_API_KEY": "api-key-value"}
PYTHON = "/usr/bin/python3"  # the system's: the test runner's own may live under /root


class Jobs:
    def __init__(self, daemon: DaemonProcess, root: Path) -> None:
        self.daemon = daemon
        self.conn: Connection = daemon.connect()
        project = root / "project"
        project.mkdir(exist_ok=True)
        (project / "hello.txt").write_text("hello\n")
        self.snapshot = sync_tree(self.conn, project, max_file_size=MiB).snapshot

    def close(self) -> None:
        self.conn.close()

    def submit(self, argv: list[str], **fields: Any) -> dict[str, Any]:
        reply = self.conn.call("jobs.submit", {"snapshot": self.snapshot,
                                               "jobs": [{"argv": argv, **fields}]})
        return reply["jobs"][0]  # type: ignore[no-any-return]

    def get(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.conn.call("jobs.get", {"job": str(job["id"])})  # type: ignore[no-any-return]

    def wait(self, job: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (found := self.get(job))["state"] not in TERMINAL:
            assert time.monotonic() < deadline, f"job {job['id']} stayed {found['state']}"
            time.sleep(0.05)
        return found

    def run(self, argv: list[str], **fields: Any) -> dict[str, Any]:
        return self.wait(self.submit(argv, **fields))

    def run_dir(self, job: dict[str, Any]) -> Path:
        return self.daemon.state_dir / "runs" / str(job["id"]) / str(job["attempt"] or 1)

    def log(self, job: dict[str, Any]) -> str:
        return (self.run_dir(job) / "output.log").read_text(errors="replace")


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fml-iso-", dir="/tmp"))
    (path / "home").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(root: Path) -> Iterator[DaemonProcess]:
    proc = make_daemon(root, "--isolation", "bwrap", FETCHML_ISOLATION_CHOICES="none",
                       FETCHML_JOB_NETWORK="false",
                       FETCHML_JOB_MAX_PROCESSES=str(MAX_PROCESSES),
                       FETCHML_JOB_MAX_LOG_BYTES="256K", FETCHML_JOB_MAX_OUTPUT_BYTES="1M",
                       FETCHML_KILL_GRACE="5s", **DAEMON_SECRETS).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def jobs(daemon: DaemonProcess, root: Path) -> Iterator[Jobs]:
    client = Jobs(daemon, root)
    yield client
    client.close()


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port on the host's loopback that accepts connections."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


PROBES = """
probe() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name allowed"; \
else echo "$name denied"; fi; }
probe read_state_db cat "$STATE/jobs.db"
probe read_daemon_secret cat "$STATE/secret"
probe read_other_workspace cat "$OTHER/work/mine.txt"
probe list_root ls /root
probe read_root_file cat /root/.bashrc
probe read_daemon_environ cat /proc/$DAEMON_PID/environ
probe tcp_connect $PY -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 3)"
"""
WRITES = """
probe write_usr touch /usr/fetchml-escape
probe write_etc touch /etc/fetchml-escape
probe write_root touch /fetchml-escape
probe write_var touch /var/fetchml-escape
probe write_host_dir touch "$HOSTDIR/escape"
probe write_run_dir touch "$FETCHML_RUN_DIR/escape"
probe write_tmp touch /tmp/fetchml-private-$FETCHML_JOB_ID
probe write_work touch ./made-in-work
probe write_outputs touch "$FETCHML_OUTPUT_DIR/made-in-outputs"
env > "$FETCHML_OUTPUT_DIR/env.txt"
ls -a "$STATE" > "$FETCHML_OUTPUT_DIR/state.txt"
ls /proc | grep -c '^[0-9]' > "$FETCHML_OUTPUT_DIR/processes.txt"
"""


def probe_results(log: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in log.splitlines() if line.endswith(("allowed",
                                                                                   "denied")))


def test_bwrap_job_cannot_reach_what_is_not_its_own(jobs: Jobs, daemon: DaemonProcess,
                                                     root: Path, listener: int) -> None:
    other = jobs.run(sh("echo mine > mine.txt"))
    assert other["state"] == "succeeded", jobs.log(other)
    assert (jobs.run_dir(other) / "work" / "mine.txt").read_text() == "mine\n"
    env = {"STATE": str(daemon.state_dir), "OTHER": str(jobs.run_dir(other)),
           "PORT": str(listener), "HOSTDIR": str(root), "PY": PYTHON,
           "DAEMON_PID": str(daemon.proc.pid if daemon.proc else 0)}

    # The same probes without a sandbox reach everything: each probe can succeed.
    control = jobs.run(sh(PROBES), isolation="none", env=env)
    assert probe_results(jobs.log(control)) == {
        "read_state_db": "allowed", "read_daemon_secret": "allowed",
        "read_other_workspace": "allowed", "list_root": "allowed", "read_root_file": "allowed",
        "read_daemon_environ": "allowed", "tcp_connect": "allowed"}

    sandboxed = jobs.run(sh(PROBES + WRITES), env=env)
    assert sandboxed["state"] == "succeeded", jobs.log(sandboxed)
    assert sandboxed["isolation"] is None  # the daemon's default: bwrap
    assert probe_results(jobs.log(sandboxed)) == {
        "read_state_db": "denied", "read_daemon_secret": "denied",
        "read_other_workspace": "denied", "list_root": "denied", "read_root_file": "denied",
        "read_daemon_environ": "denied", "tcp_connect": "denied",
        "write_usr": "denied", "write_etc": "denied", "write_root": "denied",
        "write_var": "denied",
        # These land on the sandbox's private /tmp: nothing appears on the host.
        "write_host_dir": "allowed", "write_run_dir": "allowed", "write_tmp": "allowed",
        "write_work": "allowed", "write_outputs": "allowed"}
    run_dir = jobs.run_dir(sandboxed)
    assert not (root / "escape").exists()
    assert not (run_dir / "escape").exists()
    assert not Path(f"/tmp/fetchml-private-{sandboxed['id']}").exists()
    assert not Path("/usr/fetchml-escape").exists() and not Path("/etc/fetchml-escape").exists()
    assert (run_dir / "work" / "made-in-work").exists()
    assert (run_dir / "outputs" / "made-in-outputs").exists()
    assert sandboxed["outputs"] is not None
    # The state dir shows only the path down to this run (and the read-only dataset cache);
    # /proc only the sandbox's processes.
    seen = set((run_dir / "outputs" / "state.txt").read_text().split())
    assert seen <= {".", "..", "runs", "datasets"} and "runs" in seen
    assert int((run_dir / "outputs" / "processes.txt").read_text()) < 10


def test_job_environment_holds_no_daemon_secrets(jobs: Jobs) -> None:
    for isolation in ("none", "bwrap"):
        job = jobs.run(["env"], isolation=isolation, env={"MINE": "passed"})
        assert job["state"] == "succeeded", jobs.log(job)
        env = dict(line.split("=", 1) for line in jobs.log(job).splitlines() if "=" in line)
        assert env["MINE"] == "passed"
        assert env["FETCHML_JOB_ID"] == str(job["id"])
        assert "FETCHML_CLUSTER_SECRET" not in env and "FETCHML_API_KEY" not in env
        assert not set(DAEMON_SECRETS.values()) & set(env.values())


def test_files_made_for_the_job_stay_writable_in_the_sandbox(jobs: Jobs) -> None:
    job = jobs.run(sh('test -n "$FETCHML_METRICS_FILE" && echo \'{"loss": 1}\' >> '
                      '"$FETCHML_METRICS_FILE"'))
    assert job["state"] == "succeeded", jobs.log(job)
    assert '"loss": 1' in (jobs.run_dir(job) / "metrics.jsonl").read_text()


def test_a_sandboxed_job_has_the_network_only_when_allowed_and_asked(
        short_tmp: Path, listener: int) -> None:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {listener}), 3)"
    daemon = make_daemon(short_tmp, "--isolation", "bwrap",  # job_network: its default
                         FETCHML_ISOLATION_CHOICES="none").start()
    jobs = Jobs(daemon, short_tmp)
    try:
        job = jobs.run([PYTHON, "-c", probe])
        assert job["state"] == "failed" and not job["network"], jobs.log(job)
        with pytest.raises(BadRequest, match="no network"):
            jobs.submit([PYTHON, "-c", probe], network=True)
        assert jobs.run([PYTHON, "-c", probe], network=True,  # no sandbox, nothing to deny
                        isolation="none")["state"] == "succeeded"
    finally:
        jobs.close()
        daemon.stop()
    daemon = make_daemon(short_tmp, "--isolation", "bwrap", FETCHML_JOB_NETWORK="true").start()
    jobs = Jobs(daemon, short_tmp)
    try:
        job = jobs.run([PYTHON, "-c", probe], network=True)
        assert job["state"] == "succeeded" and job["network"], jobs.log(job)
        assert jobs.run([PYTHON, "-c", probe])["state"] == "failed"  # allowed, not asked
    finally:
        jobs.close()
        daemon.stop()


def test_isolation_a_job_may_ask_for(jobs: Jobs) -> None:
    with pytest.raises(BadRequest, match="isolation 'podman' is not offered here"):
        jobs.submit(["true"], isolation="podman")
    with pytest.raises(BadRequest, match="not offered"):
        jobs.submit(["true"], isolation=3)
    assert jobs.run(["true"], isolation="bwrap")["state"] == "succeeded"
    missing = jobs.run(["no-such-command-here"])
    assert missing["state"] == "failed"
    assert "command not found inside the bwrap sandbox" in missing["reason"]


@pytest.mark.parametrize("isolation", ["bwrap", "none"])
def test_memory_limit_stops_the_job_and_says_so(jobs: Jobs, isolation: str) -> None:
    hog = [PYTHON, "-c", "import time; x = b'1' * (400 << 20); time.sleep(30)"]
    job = jobs.run(hog, memory=100 * MiB, isolation=isolation)
    assert job["state"] == "failed"
    assert job["reason"] == "memory limit 100M exceeded", jobs.log(job)
    fits = jobs.run([PYTHON, "-c", "x = b'1' * (20 << 20)"], memory=100 * MiB,
                    isolation=isolation)
    assert fits["state"] == "succeeded", jobs.log(fits)


def test_fork_bomb_is_contained_and_the_daemon_keeps_answering(jobs: Jobs,
                                                              daemon: DaemonProcess) -> None:
    latencies: list[float] = []
    host_processes: list[int] = []
    stop = threading.Event()

    def ping() -> None:
        with daemon.connect() as conn:
            while not stop.is_set():
                started = time.perf_counter()
                conn.call("host.ping", {})
                latencies.append(time.perf_counter() - started)
                host_processes.append(len(psutil.pids()))
                time.sleep(0.01)

    before = len(psutil.pids())
    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        bomb = jobs.run(["bash", "-c", "f() { f | f & }; f; sleep 60"], timeout=50)
    finally:
        stop.set()
        pinger.join()
    assert bomb["state"] == "failed"
    assert bomb["reason"] == f"process limit {MAX_PROCESSES} reached", jobs.log(bomb)
    assert latencies, "the daemon never answered"
    # The bomb never held much more than its limit (plus the sandbox and other tests' churn).
    assert max(host_processes) - before < MAX_PROCESSES + 40
    worst, median = max(latencies), statistics.median(latencies)
    print(f"ping during fork bomb: {len(latencies)} pings, median {median * 1000:.1f} ms, "
          f"max {worst * 1000:.1f} ms; host processes +{max(host_processes) - before}")
    assert worst < 5.0  # generous: two shared cores


def test_log_and_output_limits(jobs: Jobs) -> None:
    chatty = jobs.run(sh("while true; do echo 'a line of log output'; done"))
    assert (chatty["state"], chatty["reason"]) == ("failed", "log limit 256K exceeded")
    big = jobs.run(sh('head -c 2000000 /dev/zero > "$FETCHML_OUTPUT_DIR/big"; sleep 30'))
    assert (big["state"], big["reason"]) == ("failed", "output limit 1M exceeded")
    assert big["outputs"] is None  # over the limit: left in the run directory, not stored
    quick = jobs.run(sh('head -c 2000000 /dev/zero > "$FETCHML_OUTPUT_DIR/big"'))
    assert (quick["state"], quick["reason"]) == ("failed", "output limit 1M exceeded")


def test_cpu_affinity_follows_the_cpus_asked_for(jobs: Jobs) -> None:
    cpus = len(os.sched_getaffinity(0))
    job = jobs.run(sh("grep Cpus_allowed_list /proc/self/status"), cpus=1)
    allowed = jobs.log(job).split()[-1]
    if cpus > 1:
        assert allowed.isdigit(), allowed  # one CPU: "1", not "0-1"


def test_cancel_gives_a_sandboxed_job_its_grace(jobs: Jobs) -> None:
    script = ('trap \'echo term > "$FETCHML_OUTPUT_DIR/term"; exit 5\' TERM; '
              'touch "$FETCHML_OUTPUT_DIR/started"; while true; do sleep 0.05; done')
    job = jobs.submit(sh(script))
    started = jobs.daemon.state_dir / "runs" / str(job["id"]) / "1" / "outputs" / "started"
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    jobs.conn.call("jobs.cancel", {"jobs": [str(job["id"])]})
    done = jobs.wait(job)
    assert done["state"] == "cancelled"
    assert (started.parent / "term").read_text() == "term\n"


def test_no_job_cgroups_are_left_behind(jobs: Jobs, daemon: DaemonProcess) -> None:
    jobs.run(["true"], memory=64 * MiB)
    tag = daemon_tag(daemon.state_dir)
    left = [p for p in Path("/sys/fs/cgroup").rglob(f"{JOBS_DIR}/{tag}-*")]
    assert left == []


def test_sandboxed_job_survives_a_daemon_restart(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, "--isolation", "bwrap", FETCHML_JOB_MAX_PROCESSES="32").start()
    jobs = Jobs(daemon, short_tmp)
    try:
        job = jobs.submit(sh('while [ ! -e gate ]; do sleep 0.05; done; echo out > '
                             '"$FETCHML_OUTPUT_DIR/out"'), memory=64 * MiB)
        work = jobs.run_dir(job) / "work"
        deadline = time.monotonic() + 30
        while jobs.get(job)["state"] != "running" or not (work.parent / "supervisor.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        jobs.close()
        daemon.kill()
        daemon.start()
        jobs = Jobs(daemon, short_tmp)
        (work / "gate").touch()
        done = jobs.wait(job)
        assert done["state"] == "succeeded", jobs.log(done)
        assert done["outputs"] is not None
    finally:
        jobs.close()
        daemon.stop()


def podman_unusable(image: str) -> str | None:
    podman = shutil.which("podman")
    if podman is None:
        return "podman is not installed on this machine"
    try:
        done = subprocess.run([podman, "run", "--rm", "--pull=never", image, "true"],
                              capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman run fails here: {exc}"
    if done.returncode != 0:
        return f"podman run fails here: {done.stderr.decode(errors='replace').strip()[-200:]}"
    return None


def test_podman_job_runs_in_a_container(short_tmp: Path) -> None:
    # An image this machine has (nothing is pulled in tests); it needs sh, cat and env.
    image = os.environ.get("FETCHML_TEST_PODMAN_IMAGE", "docker.io/library/python:3.11-slim")
    why = podman_unusable(image)
    if why is not None:
        print(f"skipping the podman test: {why}")
        pytest.skip(why)
    daemon = make_daemon(short_tmp, "--isolation", "podman", FETCHML_JOB_NETWORK="false",
                         FETCHML_PODMAN_IMAGE=image, FETCHML_KILL_GRACE="1s",
                         **DAEMON_SECRETS).start()
    jobs = Jobs(daemon, short_tmp)
    try:
        state = daemon.state_dir
        job = jobs.run(sh(f'cat hello.txt; env; echo ok > "$FETCHML_OUTPUT_DIR/ok"; '
                          f'cat {state}/jobs.db > /dev/null 2>&1 && echo READ-STATE; '
                          f'touch /usr/escape 2>/dev/null && echo WROTE-USR; true'),
                       env={"MINE": "--privileged"})
        assert job["state"] == "succeeded", jobs.log(job)
        log = jobs.log(job)
        assert "hello" in log and "MINE=--privileged" in log  # a value, never a podman flag
        assert "FETCHML_CLUSTER_SECRET" not in log and "FETCHML_API_KEY" not in log
        assert "READ-STATE" not in log and "WROTE-USR" not in log
        assert job["outputs"] is not None
        # A job deaf to SIGTERM: podman run is killed, and its container removed after it.
        deaf = jobs.run(sh("trap '' TERM; while true; do sleep 1; done"), timeout=2)
        assert (deaf["state"], deaf["reason"]) == ("failed", "timed out after 2 s")
        name = f"fetchml-{daemon_tag(state)}-{deaf['id']}-1"
        deadline = time.monotonic() + 30
        while name in podman_containers():
            assert time.monotonic() < deadline, f"container {name} was left behind"
            time.sleep(0.2)
    finally:
        jobs.close()
        daemon.stop()


def podman_containers() -> str:
    return subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
                          text=True, timeout=60, check=False).stdout
