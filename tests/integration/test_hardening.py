"""Hardening against a real daemon: per-owner pins, user names, the TCP gate."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fetchml.client import Target, connect
from fetchml.errors import BadRequest, NotFound
from tests.conftest import make_daemon
from tests.integration.test_security import start_secure_daemon, stored_snapshot


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_pins_are_listed_and_removed_per_owner(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            keys = {name: admin.call("admin.users.add", {"name": name, "role": "researcher"}
                                     )["key"] for name in ("alice", "bob")}
        with daemon.connect(api_key=keys["alice"]) as alice, \
                daemon.connect(api_key=keys["bob"]) as bob:
            snapshot = stored_snapshot(alice)
            assert stored_snapshot(bob) == snapshot  # the same tree: theirs too
            alice.call("snapshot.pin", {"snapshot": snapshot})
            assert bob.call("snapshot.pins")["pins"] == []
            with pytest.raises(NotFound, match="not pinned by you"):
                bob.call("snapshot.unpin", {"snapshot": snapshot})
            assert alice.call("snapshot.pins")["pins"] == [{"snapshot": snapshot,
                                                             "by": "alice"}]
            bob.call("snapshot.pin", {"snapshot": snapshot})
            assert bob.call("snapshot.unpin", {"snapshot": snapshot})["by"] == ["bob"]
        with daemon.connect() as admin:  # an admin sees and removes everyone's
            assert [p["by"] for p in admin.call("snapshot.pins")["pins"]] == ["alice"]
            assert admin.call("snapshot.unpin", {"snapshot": snapshot})["by"] == ["alice"]
    finally:
        daemon.stop()


def test_user_add_refuses_local_identity_names_and_bad_uids(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            with pytest.raises(BadRequest, match="local identity"):
                admin.call("admin.users.add", {"name": "root", "role": "admin"})
            with pytest.raises(BadRequest, match="must be a whole number"):
                admin.call("admin.users.add", {"name": "ada", "role": "researcher",
                                               "uid": -5})
        done = daemon.cli("user", "add", "root", "--role", "researcher")
        assert done.returncode == 1 and "local identity" in done.stderr, done.stderr
    finally:
        daemon.stop()


# -- the TCP gate: deadline and caps for connections that have not said hello -----------------

def _raw_tls(port: int, ca: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    context = ssl.create_default_context(cafile=str(ca))
    return context.wrap_socket(raw, server_hostname="localhost")


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the daemon closes ``sock`` within ``seconds`` (EOF or reset)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def test_silent_and_slow_connections_are_closed_at_the_deadline(short_tmp: Path) -> None:
    daemon, ca = start_secure_daemon(short_tmp, "connect_deadline: 1.5\n")
    try:
        port = int(str(daemon.runtime_info["url"]).rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent, \
                _raw_tls(port, ca) as slow:  # one never speaks TLS; one sends one header line
            slow.sendall(b"GET /ws HTTP/1.1\r\n")
            started = time.monotonic()
            assert _closed_within(silent, 10) and _closed_within(slow, 10)
            assert time.monotonic() - started < 8
        with daemon.connect() as admin:
            key = admin.call("admin.users.add", {"name": "ada", "role": "researcher"})["key"]
        url = str(daemon.runtime_info["url"])
        with connect(Target(url=url), api_key=key, ca_file=str(ca)) as tls:
            time.sleep(2.5)  # past the deadline: a session that said hello is no longer pending
            assert tls.call("host.ping")["time"] > 0
    finally:
        daemon.stop()


def test_pending_connections_are_capped_per_address_and_the_socket_still_answers(
        short_tmp: Path) -> None:
    metrics_port = free_port()
    daemon, _ = start_secure_daemon(
        short_tmp, f"connect_deadline: 30\nmax_pending_per_address: 3\n"
                   f"metrics_listen: 127.0.0.1:{metrics_port}\n")
    try:
        port = int(str(daemon.runtime_info["url"]).rsplit(":", 1)[1].split("/")[0])
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(socket.create_connection(("127.0.0.1", port),
                                                                 timeout=10)) for _ in range(3)]
            time.sleep(0.2)  # accepted, in that order
            try:  # refused at accept, long before the 30 s deadline (a reset can beat connect)
                extra = stack.enter_context(socket.create_connection(("127.0.0.1", port),
                                                                     timeout=10))
                assert _closed_within(extra, 5)
            except ConnectionResetError:
                pass
            for sock in held:
                assert not _closed_within(sock, 0.05)
            with daemon.connect() as admin:  # the Unix socket is not behind the gate
                assert admin.call("host.info")["user"]
            other = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10,
                                                                 source_address=("127.0.0.2", 0)))
            assert not _closed_within(other, 0.3)  # another address has its own cap
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as answer:
            text = answer.read().decode()
        assert re.search(r'fetchml_connections_refused_total\{reason="full"\} [1-9]', text), text
    finally:
        daemon.stop()


def test_the_units_raise_the_open_file_limit() -> None:
    units = Path(__file__).resolve().parents[2] / "fetchml" / "units"
    for name in ("fetchml.service", "fetchml-user.service"):
        assert re.search(r"^LimitNOFILE=65536$", (units / name).read_text(), re.M), name


FORKED_READERS = """
import os, time
data = bytearray(150 * 2**20)  # touched: resident in the parent
for i in range(0, len(data), 4096):
    data[i] = 1
children = []
for _ in range(3):  # readers that share the parent's pages copy-on-write, as data loaders do
    pid = os.fork()
    if pid == 0:
        time.sleep(2.0)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


def test_peak_memory_counts_shared_pages_once(short_tmp: Path) -> None:
    """Four processes sharing 150 MiB have an RSS sum of 600 MiB but use 150 MiB."""
    daemon = make_daemon(short_tmp).start()
    try:
        project = short_tmp / "project"
        project.mkdir()
        (project / "readers.py").write_text(FORKED_READERS)
        queued = daemon.cli("queue", "--json", "--", sys.executable, "readers.py", cwd=project)
        assert queued.returncode == 0, queued.stderr
        job = json.loads(queued.stdout)["jobs"][0]["id"]
        assert daemon.cli("wait", str(job), timeout=120).returncode == 0
        with daemon.connect() as conn:
            peak = conn.call("jobs.get", {"job": str(job)})["peak_rss"]
        assert 150 * 2**20 <= peak < 300 * 2**20, peak
        shown = daemon.cli("status", str(job)).stdout
        assert "(all its processes, shared pages once)" in shown, shown
    finally:
        daemon.stop()


def test_a_client_that_never_reads_holds_bounded_memory(short_tmp: Path) -> None:
    """64 downloads of a 6 MiB object asked for and never read: the daemon keeps a few chunks
    of them in memory, not every chunk of every request."""
    import psutil

    from fetchml.cas.hashing import hash_bytes
    from fetchml.client.websocket import WebSocket
    from fetchml.protocol import PROTOCOL_VERSION, encode

    daemon = make_daemon(short_tmp).start()
    try:
        data = os.urandom(6 * 2**20)
        oid = hash_bytes(data)
        with daemon.connect() as conn:
            half = 3 * 2**20
            for offset in (0, half):
                conn.call("cas.put", {"blobs": [{"oid": oid, "size": len(data),
                                                 "offset": offset,
                                                 "data": data[offset:offset + half]}]})
        assert daemon.proc is not None
        process = psutil.Process(daemon.proc.pid)
        before = process.memory_info().rss
        with socket.socket(socket.AF_UNIX) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(str(daemon.socket))
            ws = WebSocket(sock, mask_frames=False, max_frame=64 * 2**20)
            ws.handshake("localhost", "/ws", {})
            ws.send_binary(encode({"id": 0, "op": "hello", "args": {"protocol":
                                                                      PROTOCOL_VERSION}}))
            for request in range(1, 65):
                ws.send_binary(encode({"id": request, "op": "cas.get", "args": {"oid": oid}}))
            peak = before
            for _ in range(30):  # three seconds in which nothing is read
                time.sleep(0.1)
                peak = max(peak, process.memory_info().rss)
            assert peak - before < 120 * 2**20, (before, peak)
            with daemon.connect() as conn:  # and the daemon still serves others
                assert conn.call("host.ping")["time"] > 0
            started = time.monotonic()  # and stops, though this peer still takes nothing
            assert daemon.stop() == 0
            assert time.monotonic() - started < 12
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


# -- snapshots and objects belong to someone ---------------------------------------------------

def test_a_researcher_reads_only_snapshots_and_objects_that_are_theirs(short_tmp: Path) -> None:
    from fetchml.cas.hashing import hash_bytes
    from fetchml.cas.manifest import ManifestEntry, SnapshotManifest

    daemon = make_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            keys = {name: admin.call("admin.users.add", {"name": name, "role": role})["key"]
                    for name, role in (("alice", "researcher"), ("bob", "researcher"),
                                       ("carol", "analyst"))}
        secret = b"alice's weights\n"
        oid = hash_bytes(secret)
        with daemon.connect(api_key=keys["alice"]) as alice:
            alice.call("cas.put", {"blobs": [{"oid": oid, "size": len(secret), "offset": 0,
                                              "data": secret}]})
            manifest = SnapshotManifest([ManifestEntry.file("w.txt", oid, len(secret))])
            snapshot = alice.call("snapshot.put", {"manifest": manifest.encode()})["snapshot"]
            assert alice.call("snapshot.get", {"snapshot": snapshot[:8]})["snapshot"] == snapshot
            assert b"".join(e.data for e in alice.stream("cas.get", {"oid": oid}).events()) \
                == secret
        with daemon.connect(api_key=keys["bob"]) as bob:
            absent = "0123456789ab"
            with pytest.raises(NotFound) as absent_error:
                bob.call("snapshot.get", {"snapshot": absent})
            for text in (snapshot[:6], snapshot[:12], snapshot):
                with pytest.raises(NotFound) as theirs:
                    bob.call("snapshot.get", {"snapshot": text})
                assert theirs.value.message == absent_error.value.message.replace(absent, text)
                with pytest.raises(NotFound):
                    bob.call("jobs.submit", {"snapshot": text, "jobs": [{"argv": ["true"]}]})
            with pytest.raises(NotFound, match="is not in the store"):
                list(bob.stream("cas.get", {"oid": oid}).events())
            with pytest.raises(NotFound, match="base snapshot"):  # nor built upon
                bob.call("snapshot.put", {"base": snapshot, "upsert": [], "remove": []})
        with daemon.connect(api_key=keys["carol"]) as carol:  # an analyst reads everything
            assert carol.call("snapshot.get", {"snapshot": snapshot})["snapshot"] == snapshot
    finally:
        daemon.stop()


def test_a_researcher_pulls_the_outputs_of_their_own_job(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            key = admin.call("admin.users.add", {"name": "ada", "role": "researcher"})["key"]
        project = short_tmp / "project"
        project.mkdir()
        (project / "train.py").write_text(
            "import os\nopen(os.path.join(os.environ['FETCHML_OUTPUT_DIR'], 'm.txt'), 'w')"
            ".write('0.93')\n")
        env = {"FETCHML_API_KEY": key}
        # python3 from the PATH: the job runs as job_user, who may not enter /root, where
        # the test's own interpreter may live
        queued = daemon.cli("queue", "--json", "--", "python3", "train.py", cwd=project,
                            env=env)
        assert queued.returncode == 0, queued.stderr
        job = str(json.loads(queued.stdout)["jobs"][0]["id"])
        assert daemon.cli("wait", job, env=env, timeout=120).returncode == 0
        pulled = daemon.cli("pull", job, str(short_tmp / "out"), env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert (short_tmp / "out" / "m.txt").read_text() == "0.93"
    finally:
        daemon.stop()
