"""fetchml sync against a real daemon: stable ids, incremental uploads, integrity, bad input."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fetchml.cas import delta
from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import FORMAT_TAG, FORMAT_VERSION, ManifestEntry, SnapshotManifest
from fetchml.client.transfer import upload
from fetchml.errors import BadRequest, IntegrityError, NotFound
from tests.conftest import DaemonProcess, make_inprocess_daemon

OID = hash_bytes(b"not stored anywhere")
PR_CAPBSET_DROP = 24
# Capabilities that let root read any file: dropped so that mode 000 means unreadable.
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def write_tree(root: Path) -> Path:
    """A small project: nested files, an executable, a link, an empty dir, ignored junk."""
    files = {
        "train.py": b"print('train')\n",
        "pkg/__init__.py": b"",
        "pkg/model/net.py": b"class Net: ...\n" * 50,
        "configs/base.yaml": b"lr: 0.1\n",
        "data/table.csv": bytes(range(256)) * 40,
        "pkg/__pycache__/net.cpython-311.pyc": b"ignored",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "run.sh").write_bytes(b"#!/bin/sh\npython train.py\n")
    (root / "run.sh").chmod(0o755)
    (root / "latest").symlink_to("configs/base.yaml")
    (root / "outputs").mkdir()
    return root


def sync(daemon: DaemonProcess, tree: Path, *args: str, **env: str) -> dict[str, Any]:
    done = daemon.cli("sync", "--json", *args, str(tree), env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def store_listing(daemon: DaemonProcess) -> list[str]:
    """Every name under the daemon's object and snapshot stores."""
    found = []
    for store in ("objects", "snapshots"):
        for dirpath, _, filenames in os.walk(daemon.state_dir / store):
            found += [os.path.join(dirpath, name) for name in filenames]
    return sorted(found)


def object_path(daemon: DaemonProcess, oid: str) -> Path:
    return daemon.state_dir / "objects" / oid[:2] / oid[2:]


def test_the_same_tree_has_the_same_id_in_two_dirs_and_after_touch(
        daemon: DaemonProcess, short_tmp: Path) -> None:
    first = write_tree(short_tmp / "one")
    shutil.copytree(first, short_tmp / "two", symlinks=True)
    a = sync(daemon, first)
    b = sync(daemon, short_tmp / "two")
    assert a["snapshot"] == b["snapshot"] and len(a["snapshot"]) == 64
    assert a["files"] == b["files"] == 6 and a["bytes"] == b["bytes"]
    later = time.time() + 5
    for dirpath, _, filenames in os.walk(first):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (later, later))
    assert sync(daemon, first)["snapshot"] == a["snapshot"]


def test_a_copy_sends_nothing_and_a_one_byte_change_sends_that_file(
        daemon: DaemonProcess, short_tmp: Path) -> None:
    first = write_tree(short_tmp / "one")
    initial = sync(daemon, first)
    assert (initial["sent_files"], initial["sent_bytes"]) == (6, initial["bytes"])
    copy = short_tmp / "copy"
    shutil.copytree(first, copy, symlinks=True)
    again = sync(daemon, copy)
    assert (again["sent_files"], again["sent_bytes"]) == (0, 0)
    target = copy / "pkg/model/net.py"
    data = bytearray(target.read_bytes())
    data[7] ^= 0x01
    target.write_bytes(bytes(data))
    changed = sync(daemon, copy)
    assert (changed["sent_files"], changed["sent_bytes"]) == (1, len(data))
    assert changed["snapshot"] != initial["snapshot"]
    assert (sync(daemon, copy)["sent_bytes"]) == 0


def test_a_damaged_object_is_never_served_and_fsck_names_it(
        daemon: DaemonProcess, short_tmp: Path) -> None:
    tree = write_tree(short_tmp / "proj")
    sync(daemon, tree)
    for args in ((), ("--read-data",)):
        clean = daemon.cli("fsck", "--json", *args)
        assert clean.returncode == 0, clean.stderr
        assert json.loads(clean.stdout)["problems"] == []
    content = (tree / "pkg/model/net.py").read_bytes()
    oid = hash_bytes(content)
    path = object_path(daemon, oid)
    mode = path.stat().st_mode
    path.chmod(0o644)
    with path.open("r+b") as handle:
        handle.seek(3)
        handle.write(bytes([content[3] ^ 0xFF]))
    path.chmod(mode)
    with daemon.connect() as conn:
        stream = conn.stream("cas.get", {"oid": oid})
        with pytest.raises(IntegrityError, match=oid):
            for _ in stream.events():
                pass
        assert conn.call("host.ping")  # the connection survives the refusal
    checked = daemon.cli("fsck", "--read-data", "--json")
    assert checked.returncode == 1, checked.stderr
    problems = json.loads(checked.stdout)["problems"]
    assert [(p["kind"], p["oid"]) for p in problems] == [("corrupt_object", oid)]
    assert str(path) in problems[0]["message"]


def manifest_bytes(rows: list[list[Any]]) -> bytes:
    """A manifest encoded by hand, as a hostile or buggy client could send it."""
    return msgpack.packb([FORMAT_TAG, FORMAT_VERSION, rows],  # type: ignore[no-any-return]
                         use_bin_type=True)


def file_row(path: str) -> list[Any]:
    return [path, "file", False, 3, bytes.fromhex(OID), None]


BAD_MANIFESTS: dict[str, tuple[str, list[list[Any]]]] = {
    "dotdot": ("../outside.py", [file_row("../outside.py")]),
    "inner-dotdot": ("pkg/../../x", [file_row("pkg/../../x")]),
    "absolute": ("/etc/passwd", [file_row("/etc/passwd")]),
    "nul": ("a\x00b", [file_row("a\x00b")]),
    "backslash": ("dir\\file", [file_row("dir\\file")]),
    "long-component": ("d/" + "x" * 256, [file_row("d/" + "x" * 256)]),
    "duplicate": ("dup.py", [file_row("dup.py"), file_row("dup.py")]),
    "escaping-link": ("sub/escape", [["sub/escape", "link", False, 0, None, "../../etc"]]),
    "absolute-link": ("abs", [["abs", "link", False, 0, None, "/etc/shadow"]]),
    "non-nfc": ("cafe\u0301.txt", [file_row("cafe\u0301.txt")]),
}


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    """One daemon for tests that leave nothing behind."""
    root = Path(tempfile.mkdtemp(prefix="fml-", dir="/tmp"))
    (root / "home").mkdir()
    proc = make_inprocess_daemon(root).start()
    yield proc
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_snapshot_put_refuses_every_bad_path_by_name(shared_daemon: DaemonProcess,
                                                     case: str) -> None:
    daemon = shared_daemon
    bad, rows = BAD_MANIFESTS[case]
    with daemon.connect() as conn:
        with pytest.raises(BadRequest) as caught:
            conn.call("snapshot.put", {"manifest": manifest_bytes(rows)})
        assert caught.value.details.get("path") == bad
        assert repr(bad) in caught.value.message
        # a good manifest on the same connection still works
        assert conn.call("snapshot.put", {"manifest": manifest_bytes([])})["files"] == 0
    assert not any(OID[2:] in name for name in store_listing(daemon))


def test_dry_run_changes_nothing_on_the_daemon(daemon: DaemonProcess, short_tmp: Path) -> None:
    tree = write_tree(short_tmp / "proj")
    before = store_listing(daemon)
    report = sync(daemon, tree, "--dry-run")
    assert report["dry_run"] is True and report["sent_files"] == report["files"] == 6
    assert store_listing(daemon) == before
    done = sync(daemon, tree)
    assert done["snapshot"] == report["snapshot"]
    assert (done["sent_files"], done["sent_bytes"]) == (report["sent_files"],
                                                        report["sent_bytes"])
    assert sync(daemon, tree, "--dry-run")["sent_files"] == 0


def one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_a_file_over_max_file_size_stops_the_sync_and_is_named(
        daemon: DaemonProcess, short_tmp: Path) -> None:
    tree = write_tree(short_tmp / "proj")
    (tree / "weights.ckpt").write_bytes(b"\0" * 5000)
    done = daemon.cli("sync", "--json", str(tree), env={"FETCHML_MAX_FILE_SIZE": "4k"})
    assert done.returncode in (1, 2), done.stderr
    assert done.stdout == ""
    message = one_sentence(done.stderr)
    assert "'weights.ckpt'" in message and "max_file_size" in message
    assert store_listing(daemon) == []


def drop_read_override() -> None:
    """Run as root without the capabilities that ignore file modes (a child's pre-exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def cli_without_privileges(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(daemon.env, FETCHML_SOCKET=str(daemon.socket))
    pre_exec: Callable[[], None] | None = drop_read_override if os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "fetchml", *args], env=env, cwd=daemon.root,
                          capture_output=True, text=True, timeout=60, check=False,
                          preexec_fn=pre_exec)


@pytest.mark.parametrize("unreadable", ["secret.key", "private"])
def test_an_unreadable_file_or_directory_gives_a_clear_error(
        daemon: DaemonProcess, short_tmp: Path, unreadable: str) -> None:
    tree = write_tree(short_tmp / "proj")
    target = tree / unreadable
    if unreadable == "private":
        target.mkdir()
        (target / "inside.txt").write_text("x")
    else:
        target.write_text("x")
    target.chmod(0)
    try:
        done = cli_without_privileges(daemon, "sync", str(tree))
    finally:
        target.chmod(0o700)
    assert done.returncode == 1, done.stderr
    message = one_sentence(done.stderr)
    assert f"'{unreadable}'" in message and "Permission denied" in message
    assert ".fetchmlignore" in message


def test_symlink_loops_sockets_and_fifos_do_not_break_the_scan(
        daemon: DaemonProcess, short_tmp: Path) -> None:
    tree = write_tree(short_tmp / "proj")
    (tree / "loop-a").symlink_to("loop-b")
    (tree / "loop-b").symlink_to("loop-a")
    (tree / "self").symlink_to("self")
    (tree / "dangling").symlink_to("nowhere/at/all")
    (tree / "pkg" / "up").symlink_to("..")  # a directory loop through a link
    os.mkfifo(tree / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tree / "live.sock"))
    try:
        done = daemon.cli("sync", "--json", str(tree))
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == 6
    assert "Traceback" not in done.stderr
    assert "'live.sock'" in done.stderr and "'pipe'" in done.stderr  # skipped, with a warning
    with daemon.connect() as conn:
        got = conn.call("snapshot.get", {"snapshot": json.loads(done.stdout)["snapshot"]})
    rows = msgpack.unpackb(got["manifest"])[2]
    links = {row[0]: row[5] for row in rows if row[1] == "link"}
    assert links == {"dangling": "nowhere/at/all", "latest": "configs/base.yaml",
                     "loop-a": "loop-b", "loop-b": "loop-a", "pkg/up": "..", "self": "self"}


def temp_files(daemon: DaemonProcess) -> list[Path]:
    return sorted((daemon.state_dir / "objects").rglob(".tmp-*"))


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_sync_leaves_nothing_half_written(
        daemon: DaemonProcess, short_tmp: Path, sig: signal.Signals) -> None:
    tree = write_tree(short_tmp / "proj")
    with (tree / "data" / "big.bin").open("wb") as stream:
        for _ in range(48):
            stream.write(os.urandom(1 << 20))
    env = dict(daemon.env, FETCHML_SOCKET=str(daemon.socket))
    proc = subprocess.Popen([sys.executable, "-m", "fetchml", "sync", str(tree)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: bool(temp_files(daemon)) or proc.poll() is not None)
        assert proc.poll() is None, "the sync finished before it could be interrupted"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:
        # click turns Ctrl-C into "Aborted." (exit 1): a clean stop, no traceback
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert wait_for(lambda: not temp_files(daemon)), temp_files(daemon)
    checked = daemon.cli("fsck", "--read-data", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["problems"] == []
    assert sync(daemon, tree)["files"] == 7  # and the next sync completes


def test_an_object_deleted_by_hand_is_uploaded_again(
        daemon: DaemonProcess, short_tmp: Path) -> None:
    tree = write_tree(short_tmp / "proj")
    sync(daemon, tree)
    # Fan-out directories untouched for an hour: the daemon trusts them between checks...
    old = time.time() - 3600
    for fanout in (daemon.state_dir / "objects").iterdir():
        os.utime(fanout, (old, old))
    assert sync(daemon, tree)["sent_bytes"] == 0
    assert sync(daemon, tree)["sent_bytes"] == 0
    # ...until one changes, as deleting a damaged object (what fsck advises) does.
    content = (tree / "configs/base.yaml").read_bytes()
    object_path(daemon, hash_bytes(content)).unlink()
    again = sync(daemon, tree)
    assert (again["sent_files"], again["sent_bytes"]) == (1, len(content))
    checked = daemon.cli("fsck", "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["problems"] == []


def test_snapshot_put_as_changes_to_a_stored_base(daemon: DaemonProcess) -> None:
    def file(path: str, data: bytes) -> ManifestEntry:
        return ManifestEntry.file(path, hash_bytes(data), len(data))

    contents = {f"src/m{i}.py": f"print({i})\n".encode() for i in range(50)}
    with daemon.connect() as conn:
        conn.call("cas.put", {"blobs": [{"oid": hash_bytes(d), "size": len(d), "offset": 0,
                                         "data": d} for d in [*contents.values(), b"edited\n"]]})
        base = SnapshotManifest([file(p, d) for p, d in contents.items()])
        base_id = conn.call("snapshot.put", {"manifest": base.encode()})["snapshot"]
        edited = SnapshotManifest([file(p, b"edited\n" if p == "src/m7.py" else d)
                                   for p, d in contents.items() if p != "src/m9.py"])
        upsert, remove = delta.diff(base, edited)
        assert len(upsert) == 1 and remove == ["src/m9.py"]
        args = {"base": base_id, "upsert": upsert, "remove": remove,
                "expect": edited.snapshot_id}
        result = conn.call("snapshot.put", args)
        assert result == {"snapshot": edited.snapshot_id, "files": 49,
                          "bytes": edited.total_bytes}
        got = conn.call("snapshot.get", {"snapshot": edited.snapshot_id})["manifest"]
        assert got == edited.encode()
        with pytest.raises(BadRequest, match="expected"):
            conn.call("snapshot.put", {**args, "expect": "0" * 64})
        with pytest.raises(NotFound, match="base snapshot"):
            conn.call("snapshot.put", {**args, "base": "1" * 64})
        with pytest.raises(BadRequest, match="under"):
            conn.call("snapshot.put", {"base": base_id, "remove": [],
                                       "upsert": [delta.entry_row(file("src/m1.py/x", b"e"))]})
        # Only the objects the base lacks are checked, and those still are.
        absent = file("src/new.py", b"never uploaded\n")
        with pytest.raises(IntegrityError) as refused:
            conn.call("snapshot.put", {"base": base_id, "remove": [],
                                       "upsert": [delta.entry_row(absent)]})
        assert refused.value.details["missing"] == [absent.oid]
    with daemon.connect() as fresh:  # another connection: the base is read from the store
        assert fresh.call("snapshot.put", args)["snapshot"] == edited.snapshot_id


def test_a_file_removed_before_its_upload_is_a_clear_error(daemon: DaemonProcess,
                                                           tmp_path: Path) -> None:
    gone = tmp_path / "gone.bin"
    oid = hash_bytes(b"was here")
    with daemon.connect() as conn, pytest.raises(BadRequest, match="was removed while"):
        upload(conn, [oid], {oid: gone}, {oid: 8})
    with daemon.connect() as conn:
        assert conn.call("cas.missing", {"oids": [oid]})["missing"] == [oid]
