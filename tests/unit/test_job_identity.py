"""Who a job runs as: the owner mapping, the supervisor's switch of user before exec, the
launcher's scrubbed environment, and what the runner hands over to the job's user."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import fetchml.daemon.supervise.supervisor as supervisor_module
from fetchml.cas.ignore import IgnoreRules
from fetchml.cas.scan import scan_tree
from fetchml.daemon.isolation.sandbox import Layout, PodmanOptions, podman_argv
from fetchml.daemon.security.job_identity import (
    JobCredentials,
    JobIdentities,
    credentials_of,
    guard_state_dir,
    hand_over_job_files,
    resolve_job_user,
)
from fetchml.daemon.supervise.launcher import SupervisorLauncher, launcher_environment
from fetchml.daemon.supervise.records import RunSpec, read_status
from fetchml.errors import BadRequest, ConfigError, Unavailable

PACKAGE_ROOT = str(Path(supervisor_module.__file__).resolve().parents[2])
JOB_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory a job of another user may pass through (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fml-id-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def supervise(run_dir: Path, argv: list[str], **fields: object) -> str:
    """Run one attempt under a real supervisor; the job's log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "env": JOB_ENV, "cwd": "/", **fields}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "fetchml.daemon.supervise.supervisor",
                           str(run_dir)], env={**os.environ, "PYTHONPATH": PACKAGE_ROOT},
                          timeout=60, check=False)
    assert done.returncode == 0
    status = read_status(run_dir)
    assert status is not None and status.reason == "exited", status
    return (run_dir / "output.log").read_text()


# -- the spec -------------------------------------------------------------------------------


def test_a_spec_carries_the_jobs_user_and_checks_it() -> None:
    spec = RunSpec(argv=("true",), env={}, cwd="/", uid=1234, gid=1234, groups=(5, 6))
    again = RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert (again.uid, again.gid, again.groups) == (1234, 1234, (5, 6))
    assert RunSpec.from_dict({"argv": ["true"], "cwd": "/"}).uid is None
    for bad in ({"uid": 1}, {"uid": -1, "gid": 1}, {"uid": True, "gid": 1},
                {"groups": [1]}, {"uid": 1, "gid": 1, "groups": ["x"]}):
        with pytest.raises(BadRequest):
            RunSpec.from_dict({"argv": ["true"], "cwd": "/", **bad})


# -- the supervisor's switch ----------------------------------------------------------------


@needs_root
def test_the_job_runs_as_the_specs_user_with_exactly_its_groups(tmp_path: Path) -> None:
    log = supervise(tmp_path / "run", ["sh", "-c", "id -u; id -g; id -G; cat /proc/self/status"],
                    uid=65534, gid=65533, groups=[4242])
    lines = log.splitlines()
    assert lines[:3] == ["65534", "65533", "65533 4242"]
    caps = {line.split(":")[0]: line.split()[1] for line in lines if line.startswith("Cap")}
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0


@needs_root
def test_the_jobs_path_is_searched_as_the_jobs_user(open_tmp: Path) -> None:
    """A PATH entry only root may enter (root's own interpreters under /root) is passed over,
    as the job's own shell would."""
    for name, mode in (("private", 0o700), ("public", 0o755)):
        directory = open_tmp / name
        directory.mkdir()
        (directory / "which-one").write_text(f"#!/bin/sh\necho {name}\n")
        (directory / "which-one").chmod(0o755)
        directory.chmod(mode)
    env = {**JOB_ENV, "PATH": f"{open_tmp / 'private'}:{open_tmp / 'public'}:/usr/bin:/bin"}
    log = supervise(open_tmp / "run", ["which-one"], env=env, uid=65534, gid=65534)
    assert log.strip() == "public"
    assert supervise(open_tmp / "run-root", ["which-one"], env=env).strip() == "private"


@needs_root
def test_without_a_user_the_job_runs_as_the_supervisor(tmp_path: Path) -> None:
    assert supervise(tmp_path / "run", ["id", "-u"]).strip() == "0"


@needs_root
def test_the_supervisors_records_are_private(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    supervise(run_dir, ["true"], uid=65534, gid=65534)
    for name in ("output.log", "status.json"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) & 0o077 == 0, name


# -- the launcher's environment -------------------------------------------------------------


def test_the_launcher_environment_has_no_daemon_settings() -> None:
    env = launcher_environment({"FETCHML_API_KEY": "k", "FETCHML_CLUSTER_SECRET": "s",
                                "PATH": "/bin", "PYTHONPATH": "/x"})
    assert not [k for k in env if k.startswith("FETCHML_")]
    assert env["PATH"] == "/bin" and env["PYTHONPATH"].endswith(os.pathsep + "/x")


async def test_a_launched_supervisor_has_no_daemon_secret_in_its_environ(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FETCHML_API_KEY", "fml_secret_in_daemon_env")
    monkeypatch.setenv("FETCHML_CLUSTER_SECRET", "cluster-secret-in-daemon-env")
    launcher = SupervisorLauncher()
    await launcher.start()
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        # The job reads its parent's (the supervisor's) initial environment.
        spec = {"argv": ["sh", "-c", "tr '\\0' '\\n' < /proc/$PPID/environ"], "env": JOB_ENV,
                "cwd": "/"}
        (run_dir / "spec.json").write_text(json.dumps(spec))
        handle = await launcher.launch(run_dir)
        for _ in range(2000):
            if read_status(run_dir) is not None:
                break
            await asyncio.sleep(0.01)
        log = (run_dir / "output.log").read_text()
        assert "PATH=" in log  # it did read the supervisor's environment
        assert "secret-in-daemon-env" not in log and "fml_secret" not in log
        assert handle.pid > 0
    finally:
        await launcher.close()


# -- who runs a job -------------------------------------------------------------------------


def test_owners_map_to_root_their_uid_or_the_job_user() -> None:
    nobody = JobCredentials(65534, 65534)
    uids = {"alice": 1234, "ops": 0}
    ids = JobIdentities(daemon_uid=0, root_name="root", mapped_uid=uids.get, job_user=nobody)
    assert ids.of("root") is None  # local root's jobs stay root
    alice = ids.of("alice")
    assert alice is not None and (alice.uid, alice.gid) == (1234, credentials_of(1234).gid)
    assert ids.of("ops") is None  # mapped to uid 0 by an admin
    assert ids.of("keyonly") == nobody
    daemon_user = JobIdentities(daemon_uid=1000, root_name="root", mapped_uid=uids.get,
                                job_user=nobody)
    assert daemon_user.of("keyonly") is None and daemon_user.of("alice") is None


def test_credentials_come_from_the_passwd_and_group_databases() -> None:
    nobody = pwd.getpwnam("nobody")
    found = credentials_of(nobody.pw_uid)
    assert (found.uid, found.gid, found.name) == (nobody.pw_uid, nobody.pw_gid, "nobody")
    unknown = credentials_of(4_000_000)
    assert (unknown.uid, unknown.gid, unknown.groups, unknown.name) == (
        4_000_000, 4_000_000, (), None)


def test_job_user_setting() -> None:
    assert resolve_job_user("65534").uid == 65534
    assert resolve_job_user("nobody").uid == pwd.getpwnam("nobody").pw_uid
    default = resolve_job_user(None)
    try:
        expected = pwd.getpwnam("fetchml-job").pw_uid
    except KeyError:
        expected = pwd.getpwnam("nobody").pw_uid
    assert default.uid == expected
    for bad in ("0", "root", "no-such-user-here"):
        with pytest.raises(ConfigError):
            resolve_job_user(bad)


# -- the run directory ----------------------------------------------------------------------


@needs_root
def test_the_job_gets_its_workspace_outputs_and_metrics_and_nothing_else(
        open_tmp: Path) -> None:
    run_dir = open_tmp / "runs" / "7" / "1"
    (run_dir / "work" / "sub").mkdir(parents=True)
    (run_dir / "work" / "sub" / "a.py").write_text("x")
    os.symlink("/etc/passwd", run_dir / "work" / "link")
    (run_dir / "outputs").mkdir()
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "spec.json").write_text("{}")
    for path in (open_tmp / "runs", open_tmp / "runs" / "7", run_dir):
        path.chmod(0o711)
    user = JobCredentials(65534, 65534)
    hand_over_job_files(run_dir, user)
    for mine in ("work", "work/sub", "work/sub/a.py", "outputs", "metrics.jsonl"):
        assert (run_dir / mine).lstat().st_uid == 65534, mine
    assert os.lstat(run_dir / "work" / "link").st_uid == 65534
    assert Path("/etc/passwd").stat().st_uid == 0  # the link, never its target
    assert (run_dir / "spec.json").stat().st_uid == 0 and run_dir.stat().st_uid == 0
    assert stat.S_IMODE((run_dir / "work").stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "metrics.jsonl").stat().st_mode) == 0o600


@needs_root
def test_a_run_directory_the_job_cannot_reach_is_refused(open_tmp: Path) -> None:
    run_dir = open_tmp / "closed" / "run"
    (run_dir / "work").mkdir(parents=True)
    (run_dir / "outputs").mkdir()
    (open_tmp / "closed").chmod(0o700)
    with pytest.raises(Unavailable, match="closed"):
        hand_over_job_files(run_dir, JobCredentials(65534, 65534))


def test_the_state_dir_lets_jobs_through_to_runs_only(open_tmp: Path) -> None:
    state = open_tmp / "state"
    state.mkdir(mode=0o755)
    for name in ("objects", "snapshots", "runs", "datasets", "datasets/cache",
                 "datasets/seals", "logs"):
        (state / name).mkdir(mode=0o755)
    for name in ("secret", "users.json", "jobs.db", "pins.json"):
        (state / name).write_text("x")
        (state / name).chmod(0o644)
    guard_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    for entry in state.iterdir():
        mode = stat.S_IMODE(entry.stat().st_mode)
        if entry.name == "runs":
            assert mode == 0o755  # the runner's: 0711 once it opens
        elif entry.name == "datasets":
            assert mode == 0o711
        else:
            assert mode & 0o077 == 0, entry.name
    assert stat.S_IMODE((state / "datasets" / "cache").stat().st_mode) == 0o711
    assert stat.S_IMODE((state / "datasets" / "seals").stat().st_mode) == 0o700


# -- podman -----------------------------------------------------------------------------------


def test_rootful_podman_runs_the_container_as_the_jobs_user(tmp_path: Path) -> None:
    layout = Layout(run_dir=tmp_path / "runs" / "7" / "1", cwd=str(tmp_path), state_dir=tmp_path)
    options = PodmanOptions(podman="podman", image="img", name="n", network=False,
                            rootless=False, user=(1234, 1234, (44,)))
    argv = podman_argv(options, layout, ["id", "-u"], gpu_ids=[])
    assert "--user=1234:1234" in argv and "--group-add=44" in argv
    assert argv.index("--user=1234:1234") < argv.index("img")
    rootful_root = podman_argv(PodmanOptions(podman="podman", image="img", name="n",
                                             network=False, rootless=False),
                               layout, ["true"], gpu_ids=[])
    assert not [a for a in rootful_root if a.startswith("--user")]


# -- outputs --------------------------------------------------------------------------------


@needs_root
def test_outputs_of_another_user_are_read_only_from_files_it_owns(tmp_path: Path) -> None:
    """A job's outputs are read by root: a file there that is not the job's (a hard link to a
    secret, a directory swapped for a link by another job of the same user) is refused."""
    outputs = tmp_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "sub" / "mine.txt").write_text("mine")
    for path in (outputs, outputs / "sub", outputs / "sub" / "mine.txt"):
        os.chown(path, 65534, 65534)
    rules = IgnoreRules.load(outputs)
    assert scan_tree(outputs, rules=rules, cache=None, owner=65534).manifest.entries
    (outputs / "sub" / "secret").write_text("root's")  # owned by root, as /etc/shadow
    with pytest.raises(BadRequest, match="does not belong to uid 65534"):
        scan_tree(outputs, rules=rules, cache=None, owner=65534)
    assert scan_tree(outputs, rules=rules, cache=None).manifest.entries  # root's own job
