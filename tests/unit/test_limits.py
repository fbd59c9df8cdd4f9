"""Per-job limits: the supervisor stopping real jobs at their log, output, memory and process
limits (and saying which), the spec and status fields, and the cgroup plumbing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fetchml.daemon.supervise.supervisor as supervisor_module
from fetchml.daemon.isolation import cgroups
from fetchml.daemon.supervise.job_limits import cgroup_counter, format_size, tree_size
from fetchml.daemon.supervise.records import RunSpec, RunStatus, read_status
from fetchml.errors import BadRequest

PACKAGE_ROOT = str(Path(supervisor_module.__file__).resolve().parents[2])
JOB_ENV = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MiB = 1 << 20


def supervise(run_dir: Path, argv: list[str], **fields: Any) -> RunStatus:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "env": JOB_ENV, "cwd": str(run_dir), "kill_grace": 2.0, **fields}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    process = subprocess.run(
        [sys.executable, "-m", "fetchml.daemon.supervise.supervisor", str(run_dir)],
        env={**os.environ, "PYTHONPATH": PACKAGE_ROOT}, start_new_session=True,
        stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert process.returncode == 0
    status = read_status(run_dir)
    assert status is not None
    return status


# -- sizes and counters ------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "text"), [
    (0, "0B"), (100, "100B"), (1024, "1K"), (200 * MiB, "200M"), (1536 * MiB, "1.5G"),
    (3 << 40, "3T"), (1000 * 1024, "1000K"), (100_000, "97.66K"), (int(1.25 * (1 << 30)), "1.25G"),
])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_tree_size_counts_hard_links_once_and_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    os.link(tmp_path / "a", tmp_path / "a-again")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 500)
    big = tmp_path.parent / f"{tmp_path.name}-outside"
    big.write_bytes(b"z" * 10_000)
    (tmp_path / "link").symlink_to(big)
    (tmp_path / "dirlink").symlink_to(tmp_path.parent)
    assert tree_size(tmp_path, 1 << 30) == 1500
    assert tree_size(tmp_path / "missing", 1 << 30) == 0
    assert 1000 <= tree_size(tmp_path, 10) <= 1500  # stops once past the bound


def test_cgroup_counter_reads_event_files(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n")
    (tmp_path / "pids.events").write_text("max 0\n")
    assert cgroup_counter(str(tmp_path), "memory.events", "oom_kill") == 1
    assert cgroup_counter(str(tmp_path), "memory.events", "max") == 12
    assert cgroup_counter(str(tmp_path), "pids.events", "max") == 0
    assert cgroup_counter(str(tmp_path), "nothing.events", "max") == 0


# -- spec and status fields --------------------------------------------------------------------


def base_spec(**fields: Any) -> dict[str, Any]:
    return {"argv": ["true"], "cwd": "/", **fields}


def test_limit_fields_round_trip_and_old_specs_still_parse() -> None:
    spec = RunSpec.from_dict(base_spec(cgroups=["/sys/fs/cgroup/x"], memory_limit=MiB,
                                       max_processes=10, max_log_bytes=5, max_output_bytes=7,
                                       output_dir="/o", wrapper_depth=2))
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = RunSpec.from_dict(base_spec())
    assert (old.cgroups, old.memory_limit, old.wrapper_depth) == ((), None, 0)
    assert RunSpec.from_dict(base_spec(cgroups=None, wrapper_depth=None)) == old


@pytest.mark.parametrize(("fields", "message"), [
    ({"memory_limit": 0}, "memory_limit must be a positive integer"),
    ({"max_processes": -1}, "max_processes must be a positive integer"),
    ({"max_log_bytes": True}, "max_log_bytes must be a positive integer"),
    ({"max_log_bytes": "1M"}, "max_log_bytes must be a positive integer"),
    ({"max_output_bytes": 5}, "max_output_bytes needs output_dir"),
    ({"output_dir": "relative"}, "output_dir must be an absolute path"),
    ({"cgroups": ["relative/cg"]}, "cgroups must be a list of absolute"),
    ({"cgroups": "/sys/fs/cgroup/x"}, "cgroups must be a list"),
    ({"wrapper_depth": 9}, "wrapper_depth must be an integer from 0 to 8"),
    ({"wrapper_depth": -1}, "wrapper_depth must be an integer from 0 to 8"),
])
def test_bad_limit_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        RunSpec.from_dict(base_spec(**fields))


def test_status_names_the_limit() -> None:
    record = {"exit_code": None, "signal": 9, "reason": "limit",
              "error": "memory limit 1M exceeded", "started_at": 1.0, "finished_at": 2.0,
              "peak_rss": 0, "cpu_time": 0.0, "limit": "memory"}
    assert RunStatus.from_dict(record).limit == "memory"
    assert RunStatus.from_dict(record).to_dict() == record
    del record["limit"]  # written by an older supervisor
    assert RunStatus.from_dict(record).limit is None
    with pytest.raises(BadRequest, match="limit must be one of"):
        RunStatus.from_dict({**record, "limit": "disk"})


# -- the supervisor enforcing limits -----------------------------------------------------------


def test_log_limit_stops_a_chatty_job(tmp_path: Path) -> None:
    status = supervise(tmp_path, ["sh", "-c", "while true; do echo chatter; done"],
                       max_log_bytes=64 * 1024)
    assert (status.reason, status.limit, status.error) == ("limit", "log",
                                                           "log limit 64K exceeded")
    assert status.signal is not None  # stopped, not ended on its own


def test_output_limit_while_running_and_at_the_end(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    writer = f"head -c 300000 /dev/zero > {outputs}/big"
    status = supervise(tmp_path / "slow", ["sh", "-c", f"{writer}; sleep 30"],
                       max_output_bytes=100_000, output_dir=str(outputs))
    assert (status.reason, status.limit, status.error) == ("limit", "output",
                                                           "output limit 97.66K exceeded")
    (outputs / "big").unlink()
    quick = supervise(tmp_path / "quick", ["sh", "-c", writer], max_output_bytes=100_000,
                      output_dir=str(outputs))
    assert (quick.reason, quick.limit, quick.exit_code) == ("limit", "output", 0)
    (outputs / "big").unlink()
    within = supervise(tmp_path / "within", ["sh", "-c", "echo small > " + f"{outputs}/s"],
                       max_output_bytes=100_000, output_dir=str(outputs), max_log_bytes=MiB)
    assert (within.reason, within.limit, within.exit_code) == ("exited", None, 0)


def test_address_space_limit_reports_memory_from_the_log(tmp_path: Path) -> None:
    hog = [PYTHON, "-c", "x = b'1' * (300 << 20)"]
    limit = {"RLIMIT_AS": [200 * MiB, 200 * MiB]}
    status = supervise(tmp_path / "hog", hog, rlimits=limit, memory_limit=200 * MiB)
    assert (status.reason, status.limit) == ("limit", "memory")
    assert status.error == "memory limit 200M exceeded (address-space limit)"
    other = supervise(tmp_path / "other", ["sh", "-c", "exit 3"], rlimits=limit,
                      memory_limit=200 * MiB)
    assert (other.reason, other.exit_code, other.limit) == ("exited", 3, None)


def test_a_missing_cgroup_fails_the_start(tmp_path: Path) -> None:
    status = supervise(tmp_path, ["true"], cgroups=[str(tmp_path / "no-such-cgroup")])
    assert status.reason == "spawn_failed"
    assert status.error is not None and "the job's cgroup cannot be joined" in status.error


# -- real cgroups, where this host lets us make them ---------------------------------------------


@pytest.fixture
def tree() -> Iterator[cgroups.CgroupTree]:
    found, notes = cgroups.detect(f"unit{os.getpid()}")
    if not found.hierarchies:
        pytest.skip(f"no writable cgroup here: {'; '.join(notes)}")
    yield found
    found.sweep()


def test_cgroup_memory_limit_stops_the_job(tmp_path: Path, tree: cgroups.CgroupTree) -> None:
    if not tree.enforces("memory"):
        pytest.skip("no writable memory cgroup here")
    paths = tree.create("mem-1", 50 * MiB, None)
    hog = [PYTHON, "-c", "import time; x = b'1' * (200 << 20); time.sleep(30)"]
    status = supervise(tmp_path, hog, cgroups=list(paths), memory_limit=50 * MiB)
    assert (status.reason, status.limit, status.error) == ("limit", "memory",
                                                           "memory limit 50M exceeded")
    assert not any(os.path.exists(p) for p in paths), "the supervisor removes its cgroups"


def test_cgroup_process_limit_contains_a_fork_bomb(tmp_path: Path,
                                                   tree: cgroups.CgroupTree) -> None:
    if not tree.enforces("pids"):
        pytest.skip("no writable pids cgroup here")
    paths = tree.create("pids-1", None, 20)
    status = supervise(tmp_path, ["bash", "-c", "f() { f | f & }; f; sleep 30"],
                       cgroups=list(paths), max_processes=20)
    assert (status.reason, status.limit, status.error) == ("limit", "processes",
                                                           "process limit 20 reached")
    fine = supervise(tmp_path / "fine", ["sh", "-c", "sleep 0.1 & sleep 0.1 & wait"],
                     cgroups=list(tree.create("pids-2", None, 20)), max_processes=20)
    assert (fine.reason, fine.exit_code) == ("exited", 0)


def test_cgroup_tree_writes_limits_and_sweeps_what_is_left(tree: cgroups.CgroupTree) -> None:
    paths = tree.create("sweep-1", 64 * MiB, 10)
    assert paths and all(os.path.isdir(p) for p in paths)
    for path in paths:
        files = set(os.listdir(path))
        if "memory.max" in files:
            assert Path(path, "memory.max").read_text().strip() == str(64 * MiB)
        if "memory.limit_in_bytes" in files:
            assert Path(path, "memory.limit_in_bytes").read_text().strip() == str(64 * MiB)
        if "pids.max" in files:
            assert Path(path, "pids.max").read_text().strip() == "10"
    assert tree.create("sweep-1", 32 * MiB, 5) == paths  # an unused one is made afresh
    assert tree.sweep() == len(paths)
    assert not any(os.path.exists(p) for p in paths)


# -- finding cgroups ---------------------------------------------------------------------------

HYBRID_CGROUP = "4:memory:/process_api/abc\n8:pids:/\n1:cpu,cpuacct:/x\n0::/\n"
HYBRID_MOUNTS = (
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
)


def test_parse_proc_cgroup_and_mountinfo() -> None:
    own = cgroups.parse_proc_cgroup(HYBRID_CGROUP)
    assert own == {"memory": "/process_api/abc", "pids": "/", "cpu": "/x", "cpuacct": "/x",
                   "": "/"}
    mounts = cgroups.parse_mountinfo(HYBRID_MOUNTS)
    assert [(m.point, m.fstype) for m in mounts] == [
        ("/sys/fs/cgroup/memory", "cgroup"), ("/sys/fs/cgroup/pids", "cgroup"),
        ("/sys/fs/cgroup/unified", "cgroup2")]
    assert "memory" in mounts[0].options
    assert cgroups.cgroup_dir(mounts[0], own["memory"]) == Path(
        "/sys/fs/cgroup/memory/process_api/abc")
    assert cgroups.cgroup_dir(mounts[1], "/") == Path("/sys/fs/cgroup/pids")


def test_cgroup_dir_inside_a_container_mount() -> None:
    (mount,) = cgroups.parse_mountinfo(
        "30 25 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n")
    assert cgroups.cgroup_dir(mount, "/docker/abc/system.slice/fetchml.service") == Path(
        "/sys/fs/cgroup/system.slice/fetchml.service")
    assert cgroups.cgroup_dir(mount, "/docker/abc") == Path("/sys/fs/cgroup")
    assert cgroups.cgroup_dir(mount, "/elsewhere") is None
    (spaced,) = cgroups.parse_mountinfo(
        "30 25 0:26 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n")
    assert spaced.point == "/mnt/my cgroups"
