"""A job never acts above its owner, against a real root daemon: a key-only researcher's job
runs as job_user and reaches none of the daemon's files, another job's workspace or the
daemon's secrets, under `none` and `bwrap`; local root's job still runs as root; a user mapped
to a uid runs as it; outputs of a non-root job are stored and pulled. The tests run as root."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from fetchml.client import Connection
from fetchml.client.transfer import sync_tree
from tests.conftest import DaemonProcess, make_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon switches users")
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")

TERMINAL = {"succeeded", "failed", "cancelled", "lost"}
JOB_USER = 65534
MAPPED_UID = 1234
DAEMON_SECRETS = {"FETCHML_API_KEY": "fml_api_key_of_the_daemon",
                  "FETCHML_CLUSTER_SECRET": "cluster-secret-of-the-daemon"}
PROBES = r"""
probe() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name allowed"; \
else echo "$name denied"; fi; }
echo "uid $(id -u) gid $(id -g)"
probe read_secret cat "$STATE/secret"
probe read_users cat "$STATE/users.json"
probe read_jobs_db cat "$STATE/jobs.db"
probe read_audit cat "$STATE/logs/audit.log"
probe read_audit_head cat "$STATE/logs/audit.log.head"
probe read_pins cat "$STATE/pins.json"
probe list_state ls "$STATE"
probe list_runs ls "$STATE/runs"
probe list_objects ls "$STATE/objects"
probe list_datasets ls "$STATE/datasets/cache"
probe read_other_workspace cat "$OTHER/work/mine.txt"
probe read_other_log cat "$OTHER/output.log"
probe write_secret sh -c 'echo x >> "$STATE/secret"'
probe write_users sh -c 'echo x >> "$STATE/users.json"'
probe write_jobs_db sh -c 'echo x >> "$STATE/jobs.db"'
probe write_audit sh -c 'echo x >> "$STATE/logs/audit.log"'
probe write_spec sh -c 'echo x >> "$FETCHML_RUN_DIR/spec.json"'
probe write_log_file sh -c 'echo x >> "$FETCHML_RUN_DIR/output.log"'
probe write_run_dir touch "$FETCHML_RUN_DIR/escape"
probe write_work touch ./made-in-work
probe write_outputs sh -c 'echo result > "$FETCHML_OUTPUT_DIR/result.txt"'
probe write_metrics sh -c 'echo "{\"step\": 1, \"loss\": 0.5}" >> "$FETCHML_METRICS_FILE"'
echo "parent-environ-start"
tr '\0' '\n' < /proc/$PPID/environ 2>/dev/null
echo "parent-environ-end"
echo "own-environ-start"
env
echo "own-environ-end"
"""
DENIED = {"read_secret", "read_users", "read_jobs_db", "read_audit", "read_audit_head",
          "read_pins", "list_state", "list_runs", "list_objects", "list_datasets",
          "read_other_workspace",
          "read_other_log", "write_secret", "write_users", "write_jobs_db", "write_audit",
          "write_spec", "write_log_file", "write_run_dir"}
ALLOWED = {"write_work", "write_outputs", "write_metrics"}
# Under bwrap the state directory is an empty tmpfs the job may write: what it writes there
# never reaches the host (checked on the host's files).
IN_SANDBOX_TMPFS = {"list_state", "list_runs", "write_secret", "write_users", "write_jobs_db",
                    "write_spec", "write_log_file", "write_run_dir"}


class Client:
    """One user's session: submit a job, wait for it, read its log and run directory."""

    def __init__(self, daemon: DaemonProcess, conn: Connection, root: Path) -> None:
        self.daemon, self.conn = daemon, conn
        project = root / "project"
        project.mkdir(exist_ok=True)
        (project / "hello.txt").write_text("hello\n")
        self.snapshot = sync_tree(conn, project, max_file_size=1 << 20).snapshot

    def run(self, argv: list[str], **fields: Any) -> dict[str, Any]:
        reply = self.conn.call("jobs.submit", {"snapshot": self.snapshot,
                                               "jobs": [{"argv": argv, **fields}]})
        return self.wait(reply["jobs"][0])

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while (job := self.conn.call("jobs.get", {"job": str(job["id"])}))["state"] \
                not in TERMINAL:
            assert time.monotonic() < deadline, f"job {job['id']} stayed {job['state']}"
            time.sleep(0.05)
        return job  # type: ignore[no-any-return]

    def run_dir(self, job: dict[str, Any]) -> Path:
        return self.daemon.state_dir / "runs" / str(job["id"]) / str(job["attempt"] or 1)

    def log(self, job: dict[str, Any]) -> str:
        return (self.run_dir(job) / "output.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    # The path to the state directory must let the job's user through (mkdtemp makes 0700).
    path = Path(tempfile.mkdtemp(prefix="fml-jobid-", dir="/tmp"))
    path.chmod(0o711)
    (path / "home").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(root: Path) -> Iterator[DaemonProcess]:
    config = root / "daemon.yaml"
    config.write_text(f"job_user: {JOB_USER}\nisolation_choices: [bwrap]\nusers:\n"
                      f"  - {{name: mapped, role: researcher, uid: {MAPPED_UID}}}\n")
    proc = make_daemon(root, "--config", str(config), FETCHML_RATE_LIMIT_SESSIONS="1000",
                       FETCHML_RATE_LIMIT_SUBMITS="1000", **DAEMON_SECRETS).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def admin(daemon: DaemonProcess, root: Path) -> Iterator[Client]:
    conn = daemon.connect()
    yield Client(daemon, conn, root)
    conn.close()


@pytest.fixture(scope="module")
def keys(admin: Client) -> dict[str, str]:
    add = admin.conn.call
    return {"alice": add("admin.users.add", {"name": "alice", "role": "researcher"})["key"],
            "bob": add("admin.users.add", {"name": "bob", "role": "researcher",
                                           "uid": MAPPED_UID + 1})["key"]}


@pytest.fixture(scope="module")
def alice(daemon: DaemonProcess, root: Path, keys: dict[str, str]) -> Iterator[Client]:
    conn = daemon.connect(api_key=keys["alice"])
    yield Client(daemon, conn, root)
    conn.close()


def probe_results(log: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in log.splitlines()
                if line.endswith((" allowed", " denied")))


def section(log: str, name: str) -> str:
    return log.split(f"{name}-start\n", 1)[1].split(f"{name}-end", 1)[0]


def assert_no_secret(text: str) -> None:
    assert "FETCHML_API_KEY" not in text and "FETCHML_CLUSTER_SECRET" not in text
    assert not [value for value in DAEMON_SECRETS.values() if value in text]


@pytest.mark.parametrize("isolation", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_a_key_only_users_job_runs_as_job_user_and_reaches_nothing_of_the_daemon(
        admin: Client, alice: Client, daemon: DaemonProcess, isolation: str) -> None:
    other = admin.run(["sh", "-c", "echo mine > mine.txt"])
    assert other["state"] == "succeeded", admin.log(other)
    env = {"STATE": str(daemon.state_dir), "OTHER": str(admin.run_dir(other))}
    private = {name: (daemon.state_dir / name).read_bytes() for name in ("secret",
                                                                         "users.json")}
    job = alice.run(["sh", "-c", PROBES], isolation=isolation, env=env)
    log = alice.log(job)
    assert job["state"] == "succeeded", log
    assert f"uid {JOB_USER} gid {JOB_USER}" in log
    results = probe_results(log)
    harmless = IN_SANDBOX_TMPFS if isolation == "bwrap" else set()
    assert {name for name, result in results.items() if result == "denied"} == (
        DENIED - harmless), log
    assert {name for name, result in results.items() if result == "allowed"} == (
        ALLOWED | harmless), log
    assert "x" not in log.splitlines()
    assert private == {name: (daemon.state_dir / name).read_bytes() for name in private}
    assert_no_secret(section(log, "parent-environ"))
    own = section(log, "own-environ")
    assert_no_secret(own)
    assert f"FETCHML_JOB_ID={job['id']}" in own  # the job's own variables stay
    # nobody's home (/nonexistent) is no place for caches: HOME is the workspace
    assert f"HOME={alice.run_dir(job) / 'work'}" in own and "USER=nobody" in own
    # Nothing of the daemon's changed; what the job wrote is where it belongs.
    run_dir = alice.run_dir(job)
    assert not (run_dir / "escape").exists()
    assert (run_dir / "work" / "made-in-work").stat().st_uid == JOB_USER
    assert (run_dir / "spec.json").stat().st_uid == 0
    assert stat.S_IMODE((run_dir / "spec.json").stat().st_mode) & 0o077 == 0


def test_outputs_of_a_non_root_job_are_stored_and_pulled(
        alice: Client, daemon: DaemonProcess, keys: dict[str, str], root: Path) -> None:
    job = alice.run(["sh", "-c", 'id -u; mkdir "$FETCHML_OUTPUT_DIR/sub" && '
                     'echo result > "$FETCHML_OUTPUT_DIR/sub/result.txt"'])
    assert job["state"] == "succeeded", alice.log(job)
    assert alice.log(job).split() == [str(JOB_USER)]
    assert job["outputs"] is not None
    dest = root / f"pulled-{job['id']}"
    done = daemon.cli("pull", str(job["id"]), str(dest), env={"FETCHML_API_KEY": keys["alice"]})
    assert done.returncode == 0, done.stderr
    assert (dest / "sub" / "result.txt").read_text() == "result\n"


def test_local_roots_job_still_runs_as_root(admin: Client) -> None:
    job = admin.run(["sh", "-c", "id -u; tr '\\0' '\\n' < /proc/$PPID/environ"])
    log = admin.log(job)
    assert job["state"] == "succeeded", log
    assert log.splitlines()[0] == "0"
    assert "PATH=" in log  # root reads its supervisor's environment, which holds no secret
    assert_no_secret(log)
    # A root job's run directory stays closed to everyone else.
    assert stat.S_IMODE(admin.run_dir(job).stat().st_mode) == 0o700


def test_a_user_mapped_to_a_uid_runs_as_it(daemon: DaemonProcess, keys: dict[str, str],
                                           root: Path) -> None:
    with daemon.connect(api_key=keys["bob"]) as conn:
        bob = Client(daemon, conn, root)
        job = bob.run(["sh", "-c", "id -u; id -g; touch made; ls -ln made"])
        log = bob.log(job)
        assert job["state"] == "succeeded", log
        lines = log.splitlines()
        assert lines[:2] == [str(MAPPED_UID + 1), str(MAPPED_UID + 1)]
        assert (bob.run_dir(job) / "work" / "made").stat().st_uid == MAPPED_UID + 1


def test_the_state_dir_keeps_the_daemons_files_to_itself(daemon: DaemonProcess,
                                                          alice: Client) -> None:
    state = daemon.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    assert stat.S_IMODE((state / "runs").stat().st_mode) == 0o711
    for entry in state.iterdir():
        if entry.name in ("runs", "datasets") or entry.is_socket():
            continue
        mode = stat.S_IMODE(entry.lstat().st_mode)
        assert mode & 0o077 == 0, f"{entry.name} is {mode:04o}"


def test_the_demo_flow_as_root_is_unchanged(daemon: DaemonProcess, root: Path) -> None:
    project = root / "demo-project"
    project.mkdir()
    (project / "train.py").write_text("import os\nprint('uid', os.getuid())\n")
    done = daemon.cli("queue", "--follow", "--", "python3", "train.py", cwd=project,
                      env={"FETCHML_API_KEY": ""})  # local root, by peer credentials
    assert done.returncode == 0, done.stderr
    assert "uid 0" in done.stdout


def test_a_job_of_a_key_only_user_fails_clearly_when_its_run_dir_is_out_of_reach(
        root: Path) -> None:
    closed = Path(tempfile.mkdtemp(prefix="fml-closed-", dir="/tmp"))  # 0700
    (closed / "home").mkdir()
    daemon = make_daemon(closed, FETCHML_JOB_USER=str(JOB_USER)).start()
    try:
        with daemon.connect() as conn:
            key = conn.call("admin.users.add", {"name": "carol", "role": "researcher"})["key"]
        with daemon.connect(api_key=key) as conn:
            job = Client(daemon, conn, closed).run(["true"])
        assert job["state"] == "failed"
        assert "cannot reach its run directory" in job["reason"] and str(closed) in job["reason"]
        assert f"{closed} does not let other users through" in daemon.log()
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", str(closed)], check=False)


def test_install_service_says_how_to_create_the_job_user(root: Path) -> None:
    out = root / "unit"
    done = subprocess.run([sys.executable, "-m", "fetchml", "install-service", "--output",
                           str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert ("useradd --system --no-create-home --shell /usr/sbin/nologin fetchml-job"
            in done.stdout)


@pytest.mark.parametrize("isolation", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_a_non_root_job_reads_its_datasets_and_cannot_change_them(
        alice: Client, daemon: DaemonProcess, keys: dict[str, str], root: Path,
        isolation: str) -> None:
    data = root / f"data-{isolation}"
    data.mkdir()
    (data / "labels.csv").write_text("id,label\n")
    pushed = daemon.cli("dataset", "push", f"imgs-{isolation}", str(data),
                        env={"FETCHML_API_KEY": keys["alice"]})
    assert pushed.returncode == 0, pushed.stderr
    script = (f'cat "$FETCHML_DATA_DIR/imgs-{isolation}/labels.csv" && cat mnt/d/labels.csv '
              '&& { echo x >> mnt/d/labels.csv && echo changed || echo unchanged; }')
    job = alice.run(["sh", "-c", script], isolation=isolation,
                    datasets=[f"imgs-{isolation}", f"imgs-{isolation}:mnt/d"])
    log = alice.log(job)
    assert job["state"] == "succeeded", log
    assert log.count("id,label") == 2 and "unchanged" in log


@pytest.mark.parametrize("isolation", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_a_non_root_job_is_cancelled_with_its_whole_tree(alice: Client, isolation: str) -> None:
    before = {p.pid for p in psutil.process_iter()}
    reply = alice.conn.call("jobs.submit", {"snapshot": alice.snapshot, "jobs": [
        {"argv": ["sh", "-c", "sleep 300 & echo $! > bg.pid; echo started; wait"],
         "isolation": isolation}]})
    job = reply["jobs"][0]
    run_dir = alice.run_dir({**job, "attempt": 1})
    deadline = time.monotonic() + 30
    while not (run_dir / "output.log").exists() or "started" not in alice.log({**job,
                                                                               "attempt": 1}):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    sleepers = [p for p in psutil.process_iter(["uids", "cmdline"])
                if p.info["cmdline"] == ["sleep", "300"] and p.info["uids"].real == JOB_USER
                and p.pid not in before]
    assert len(sleepers) == 1
    alice.conn.call("jobs.cancel", {"jobs": [str(job["id"])]})
    ended = alice.wait(job)
    assert ended["state"] == "cancelled"
    psutil.wait_procs(sleepers, timeout=10)
    assert not [p for p in sleepers if p.is_running()]


def test_a_non_root_job_outlives_a_daemon_restart_and_its_outputs_are_stored() -> None:
    root = Path(tempfile.mkdtemp(prefix="fml-jobid-rs-", dir="/tmp"))
    root.chmod(0o711)
    (root / "home").mkdir()
    daemon = make_daemon(root, FETCHML_JOB_USER=str(JOB_USER)).start()
    try:
        with daemon.connect() as conn:
            key = conn.call("admin.users.add", {"name": "dora", "role": "researcher"})["key"]
        with daemon.connect(api_key=key) as conn:
            dora = Client(daemon, conn, root)
            reply = conn.call("jobs.submit", {"snapshot": dora.snapshot, "jobs": [{"argv": [
                "sh", "-c", 'while [ ! -e go ]; do sleep 0.05; done; '
                'id -u > "$FETCHML_OUTPUT_DIR/uid"']}]})
            job = reply["jobs"][0]
            run_dir = dora.run_dir({**job, "attempt": 1})
        deadline = time.monotonic() + 30
        while not (run_dir / "supervisor.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        daemon.stop()
        (run_dir / "work" / "go").touch()  # the job ends while no daemon watches it
        daemon.start()
        with daemon.connect(api_key=key) as conn:
            dora.conn = conn
            ended = dora.wait(job)
        assert ended["state"] == "succeeded", dora.log(ended)
        assert ended["outputs"] is not None
        assert (run_dir / "outputs" / "uid").read_text().strip() == str(JOB_USER)
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
