"""A job's outputs against a real daemon: stored exactly as written, links that leave them
dropped with a warning, and a full disk that fails the job with the reason, keeps the files
and stores them once there is space (`fetchml outputs store`, or the next start)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.client import Connection
from fetchml.errors import NotFound, PermissionDenied
from fetchml.protocol import ops
from tests.conftest import DaemonProcess, make_inprocess_daemon, stop_if_running
from tests.integration.test_jobs_cli import queue, status

WRITTEN = {
    ".git/HEAD": "ref: refs/heads/main\n",
    ".git/objects/ab/cdef": "blob",
    "__pycache__/model.cpython-312.pyc": "bytecode",
    "model.pyc": "more bytecode",
    "notes.txt~": "backup",
    ".train.py.swp": "swap",
    ".fetchml/state": "state",
    ".gitignore": "*\n",
    "venv/pyvenv.cfg": "home = /usr\n",
    "ckpt/model.bin": "weights",
}




def stored_snapshot(conn: Connection) -> str:
    data = b"print('hi')\n"
    oid = hash_bytes(data)
    conn.call(ops.CAS_PUT.name, {"blobs": [{"oid": oid, "size": len(data), "offset": 0,
                                            "data": data}]})
    manifest = SnapshotManifest([ManifestEntry.file("train.py", oid, len(data))])
    return str(conn.call(ops.SNAPSHOT_PUT.name, {"manifest": manifest.encode()})["snapshot"])


def run(daemon: DaemonProcess, project: Path, script: str) -> dict[str, Any]:
    [job] = queue(daemon, project, "--", "sh", "-c", script)
    daemon.cli("wait", str(job["id"]), timeout=120)
    return status(daemon, str(job["id"]))  # type: ignore[no-any-return]


def writes(files: dict[str, str]) -> str:
    lines = ['cd "$FETCHML_OUTPUT_DIR"']
    for rel, text in files.items():
        if "/" in rel:
            lines.append(f"mkdir -p '{rel.rsplit('/', 1)[0]}'")
        lines.append(f"printf '%s' '{text}' > '{rel}'")
    return " && ".join(lines)


def test_outputs_are_stored_exactly_as_written(daemon: DaemonProcess, project: Path,
                                               short_tmp: Path) -> None:
    job = run(daemon, project, writes(WRITTEN) + " && ln -s ckpt/model.bin latest")
    assert job["state"] == "succeeded", job
    dest = short_tmp / "pulled"
    pulled = daemon.cli("pull", str(job["id"]), str(dest), "--json")
    assert pulled.returncode == 0, pulled.stderr
    for rel, text in WRITTEN.items():
        assert (dest / rel).is_file(), f"{rel} was not stored"
        assert (dest / rel).read_text() == text, rel
    assert os.readlink(dest / "latest") == "ckpt/model.bin"
    assert job["warnings"] == [] and job["outputs_error"] is None


def test_a_link_out_of_the_outputs_is_dropped_with_a_warning(daemon: DaemonProcess,
                                                             project: Path,
                                                             short_tmp: Path) -> None:
    job = run(daemon, project, 'cd "$FETCHML_OUTPUT_DIR" && echo kept > result.txt && '
              "ln -s /etc/passwd passwd && ln -s ../../../secret up && ln -s result.txt same")
    assert job["state"] == "succeeded", job
    dest = short_tmp / "pulled"
    pulled = daemon.cli("pull", str(job["id"]), str(dest))
    assert pulled.returncode == 0, pulled.stderr
    checked = daemon.cli("fsck")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(job["warnings"]) == 2, job
    assert any("'passwd'" in w and "/etc/passwd" in w for w in job["warnings"])
    assert any("'up'" in w for w in job["warnings"])
    shown = daemon.cli("status", str(job["id"]))
    shown_warnings = [line for line in shown.stdout.splitlines() if line.startswith("warning")]
    assert len(shown_warnings) == 2 and "/etc/passwd" in shown.stdout, shown.stdout
    assert (dest / "result.txt").read_text() == "kept\n"
    assert os.readlink(dest / "same") == "result.txt"
    assert not (dest / "passwd").is_symlink() and not (dest / "up").is_symlink()
    assert "warning: symlink 'passwd'" in pulled.stderr


def test_storing_outputs_later_is_the_owners_or_an_admins(daemon: DaemonProcess) -> None:
    with daemon.connect() as admin:
        keys = {name: admin.call(ops.ADMIN_USERS_ADD.name, {"name": name, "role": role})["key"]
                for name, role in (("alice", "researcher"), ("bob", "researcher"),
                                   ("carol", "analyst"))}
        with daemon.connect(api_key=keys["alice"]) as alice:
            job = alice.call(ops.JOBS_SUBMIT.name, {
                "snapshot": stored_snapshot(alice),
                "jobs": [{"argv": ["sh", "-c", 'echo x > "$FETCHML_OUTPUT_DIR/x"']}]})["jobs"][0]
            job_id = str(job["id"])
            done = alice.stream(ops.JOBS_WAIT.name, {"jobs": [job_id], "timeout": 60})
            list(done.events())
            mine = alice.call(ops.OUTPUTS_STORE.name, {"job": job_id})
            assert mine["stored"] is False and mine["job"]["outputs"]
        with daemon.connect(api_key=keys["bob"]) as bob:
            with pytest.raises(NotFound) as theirs:
                bob.call(ops.OUTPUTS_STORE.name, {"job": job_id})
            with pytest.raises(NotFound) as missing:
                bob.call(ops.OUTPUTS_STORE.name, {"job": "999999"})
            assert theirs.value.message.replace(job_id, "N") == \
                missing.value.message.replace("999999", "N")
        with daemon.connect(api_key=keys["carol"]) as carol, pytest.raises(PermissionDenied):
            carol.call(ops.OUTPUTS_STORE.name, {"job": job_id})
        assert admin.call(ops.OUTPUTS_STORE.name, {"job": job_id})["stored"] is False


# --- a full disk ------------------------------------------------------------------------------


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills) needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    """``state/objects`` on a 2 MiB tmpfs: the object store fills while other writes work."""
    objects = short_tmp / "state" / "objects"
    mount_tmpfs(objects, "2m")
    yield objects
    subprocess.run(["umount", "-l", str(objects)], check=False)


def test_outputs_that_do_not_fit_fail_the_job_and_are_stored_once_there_is_space(
        short_tmp: Path, small_disk: Path, project: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp).start()
    try:
        big = 'head -c 3000000 /dev/urandom > "$FETCHML_OUTPUT_DIR/model.bin"'
        first = run(daemon, project, big)
        second = run(daemon, project, big)
        for job in (first, second):
            assert job["state"] == "failed", job
            assert job["exit_code"] == 0 and job["outputs"] is None
            assert job["reason"].startswith("outputs not stored: the disk is full"), job
            assert f"fetchml outputs store {job['id']}" in job["outputs_error"]
            kept = daemon.state_dir / "runs" / str(job["id"]) / "1" / "outputs" / "model.bin"
            assert kept.stat().st_size == 3000000
        pulled = daemon.cli("pull", str(first["id"]), str(short_tmp / "early"))
        assert pulled.returncode == 1
        assert "not stored: the disk is full" in pulled.stderr, pulled.stderr
        assert "wrote nothing" not in pulled.stderr
        assert len(pulled.stderr.strip().splitlines()) == 1
        still = daemon.cli("outputs", "store", str(first["id"]))
        assert still.returncode == 1 and "still not stored: the disk is full" in still.stderr
        shown = daemon.cli("status", str(first["id"]))
        assert "not stored: the disk is full" in shown.stdout
        assert "outputs      not stored (see state)" in shown.stdout

        resize_tmpfs(small_disk, "64m")
        stored = daemon.cli("outputs", "store", str(first["id"]), "--json")
        assert stored.returncode == 0, stored.stderr
        result = json.loads(stored.stdout)
        assert result["stored"] is True and result["job"]["outputs"]
        assert result["job"]["state"] == "failed" and result["job"]["outputs_error"] is None
        assert "stored after the job ended" in result["job"]["reason"]
        dest = short_tmp / "pulled"
        assert daemon.cli("pull", str(first["id"]), str(dest)).returncode == 0
        source = daemon.state_dir / "runs" / str(first["id"]) / "1" / "outputs" / "model.bin"
        assert (dest / "model.bin").read_bytes() == source.read_bytes()
        again = daemon.cli("outputs", "store", str(first["id"]))
        assert again.returncode == 0 and "already stored" in again.stdout

        daemon.stop()  # the next start stores what is still waiting, by itself
        daemon.start()
        later = stored_later(daemon, second["id"])
        assert later["outputs"] and later["outputs_error"] is None, later
    finally:
        stop_if_running(daemon)


def stored_later(daemon: DaemonProcess, job_id: int) -> Any:
    """The job once its outputs are stored (or as it stands after ten seconds)."""
    for _ in range(200):
        later = status(daemon, str(job_id))
        if later["outputs"]:
            break
        time.sleep(0.05)
    return later


def test_a_prune_that_frees_space_lets_waiting_outputs_in(short_tmp: Path, small_disk: Path,
                                                          project: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp).start()
    try:
        big = 'head -c 1300000 /dev/urandom > "$FETCHML_OUTPUT_DIR/model.bin"'
        old = run(daemon, project, big)
        assert old["state"] == "succeeded", old
        waiting = run(daemon, project, big)
        assert waiting["state"] == "failed" and waiting["outputs_error"], waiting
        pruned = daemon.cli("prune", "--older-than", "0s", "--state", "succeeded",
                            "--gc-grace", "0s")
        assert pruned.returncode == 0, pruned.stderr
        later = stored_later(daemon, waiting["id"])
        assert later["outputs"] and later["outputs_error"] is None, later
    finally:
        stop_if_running(daemon)


def test_a_job_that_fills_its_disk_is_failed_with_the_reason_not_lost(
        short_tmp: Path, project: Path) -> None:
    runs = short_tmp / "state" / "runs"
    mount_tmpfs(runs, "2m")
    daemon = make_inprocess_daemon(short_tmp).start()
    try:
        job = run(daemon, project, 'head -c 4000000 /dev/zero > "$FETCHML_OUTPUT_DIR/big" '
                  "|| exit 7")
        assert job["state"] == "failed", job
        assert job["exit_code"] == 7
        assert job["reason"] == "attempt 1 failed: exit 7; the disk was full when the job ended"
    finally:
        stop_if_running(daemon)
        subprocess.run(["umount", "-l", str(runs)], check=False)


def test_outputs_over_their_limit_say_so_instead_of_nothing(short_tmp: Path,
                                                            project: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_JOB_MAX_OUTPUT_BYTES="1M").start()
    try:
        job = run(daemon, project, 'head -c 2000000 /dev/zero > "$FETCHML_OUTPUT_DIR/big"')
        assert (job["state"], job["reason"]) == ("failed", "output limit 1M exceeded")
        assert job["outputs"] is None and "output limit" in job["outputs_error"]
        pulled = daemon.cli("pull", str(job["id"]), str(short_tmp / "pulled"))
        assert pulled.returncode == 1 and "not stored" in pulled.stderr, pulled.stderr
        assert "wrote nothing" not in pulled.stderr
        refused = daemon.cli("outputs", "store", str(job["id"]))
        assert refused.returncode == 1 and "output limit" in refused.stderr
    finally:
        stop_if_running(daemon)


def test_a_status_lost_to_a_full_disk_is_a_failure_that_says_so(short_tmp: Path,
                                                                project: Path) -> None:
    runs = short_tmp / "state" / "runs"
    mount_tmpfs(runs, "2m")
    daemon = make_inprocess_daemon(short_tmp).start()
    try:  # the job throws away the space its supervisor set aside, then fills the disk
        job = run(daemon, project, 'rm -f "$FETCHML_RUN_DIR/.status.reserve"; '
                  'head -c 4000000 /dev/zero > "$FETCHML_OUTPUT_DIR/big"; exit 0')
        assert job["state"] == "failed", job
        assert job["reason"].endswith("the disk of its run directory is full"), job
    finally:
        stop_if_running(daemon)
        subprocess.run(["umount", "-l", str(runs)], check=False)
