"""Multi-user access against live daemons, over TLS (certificate made at test time) and over the
Unix socket: keys, roles, ownership, rate limits, allowlist, Origin, audit chain, no key leaks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fetchml.client import Connection, Target, connect
from fetchml.client.connection import tls_wrap
from fetchml.errors import (
    DaemonUnreachable,
    FetchmlError,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from tests.conftest import DaemonProcess, make_daemon, make_inprocess_daemon


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
         str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"],
        check=True, capture_output=True)
    return cert, key


@dataclass
class Site:
    daemon: DaemonProcess
    url: str
    ca: Path
    keys: dict[str, str]
    transport: str

    def conn(self, key: str | None) -> Connection:
        if self.transport == "tls":
            return connect(Target(url=self.url), api_key=key, ca_file=str(self.ca))
        return connect(Target(socket_path=str(self.daemon.socket)), api_key=key)

    def as_user(self, name: str) -> Connection:
        return self.conn(self.keys[name])


def write_config(root: Path, text: str) -> Path:
    path = root / "daemon.yaml"
    path.write_text(text)
    return path


def start_secure_daemon(root: Path, extra: str = "", listen: str = "127.0.0.1:0"
                        ) -> tuple[DaemonProcess, Path]:
    cert, key = make_cert(root)
    config = write_config(root, f"tls_cert: {cert}\ntls_key: {key}\n{extra}")
    daemon = make_daemon(root, "--config", str(config), "--listen", listen,
                         FETCHML_RATE_LIMIT_SESSIONS="1000").start()
    return daemon, cert


def stored_snapshot(conn: Connection) -> str:
    """Upload a one-file tree and return its snapshot id (the tests need something to run)."""
    from fetchml.cas.hashing import hash_bytes
    from fetchml.cas.manifest import ManifestEntry, SnapshotManifest

    data = b"print('hi')\n"
    oid = hash_bytes(data)
    conn.call("cas.put", {"blobs": [{"oid": oid, "size": len(data), "offset": 0,
                                     "data": data}]})
    manifest = SnapshotManifest([ManifestEntry.file("train.py", oid, len(data))])
    return str(conn.call("snapshot.put", {"manifest": manifest.encode()})["snapshot"])


@pytest.fixture(scope="module", params=["tls", "unix"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="fml-sec-", dir="/tmp"))
    (root / "home").mkdir()
    daemon, cert = start_secure_daemon(root)
    with daemon.connect() as admin:  # root on the Unix socket is admin
        keys = {name: admin.call("admin.users.add", {"name": name, "role": role})["key"]
                for name, role in (("alice", "researcher"), ("bob", "researcher"),
                                   ("carol", "analyst"), ("root2", "admin"))}
    yield Site(daemon, str(daemon.runtime_info["url"]), cert, keys, request.param)
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


def http_status(site: Site, headers: dict[str, str]) -> int:
    """The HTTP status of a WebSocket upgrade attempt with these headers."""
    lines = ["GET /ws HTTP/1.1", "Host: localhost", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in headers.items())]
    if site.transport == "tls":
        from urllib.parse import urlsplit

        parts = urlsplit(site.url)
        raw = socket.create_connection((parts.hostname, parts.port), timeout=10)
        context = ssl.create_default_context(cafile=str(site.ca))
        sock: socket.socket = tls_wrap(raw, context, "localhost")
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(site.daemon.socket))
    with sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return int(sock.recv(4096).split(b" ")[1])


def test_no_key_wrong_key_and_revoked_key_are_refused_and_audited(site: Site) -> None:
    if site.transport == "tls":
        assert http_status(site, {}) == 401
        with pytest.raises(Unauthenticated, match="needs an API key"):
            site.conn(None)
    assert http_status(site, {"Authorization": "Bearer fml_wrong"}) == 401
    with pytest.raises(Unauthenticated, match="not valid"):
        site.conn("fml_" + "x" * 43)
    with site.daemon.connect() as admin:
        name = f"temp{site.transport}"
        key = admin.call("admin.users.add", {"name": name, "role": "researcher"})["key"]
        with site.conn(key) as conn:
            assert conn.hello["user"] == name
            admin.call("admin.users.revoke", {"name": name})
            with pytest.raises(Unauthenticated, match="revoked"):
                conn.call("host.ping")  # an open session stops at its next request
        with pytest.raises(Unauthenticated):
            site.conn(key)
        entries = admin.call("admin.audit", {"tail": 200})["entries"]
    failures = [e for e in entries if e["event"] == "auth.failure"]
    assert failures and all("fml_" not in json.dumps(e) for e in entries)
    assert any(e["event"] == "admin.users.revoke" and e["details"]["name"] == name
               for e in entries)


def test_roles_and_ownership(site: Site) -> None:
    with site.as_user("alice") as alice:
        snapshot = stored_snapshot(alice)
        job = alice.call("jobs.submit", {"snapshot": snapshot,
                                         "jobs": [{"argv": ["sleep", "30"]}]})["jobs"][0]
        job_id = str(job["id"])
        with site.as_user("bob") as bob:
            for op, args in (("jobs.get", {"job": job_id}), ("jobs.cancel", {"jobs": [job_id]}),
                             ("jobs.wait", {"jobs": [job_id], "timeout": 0.1})):
                with pytest.raises(NotFound) as theirs:
                    bob.call(op, args)
                with pytest.raises(NotFound) as missing:
                    bob.call(op, {k: (["999999"] if isinstance(v, list) else
                                      "999999" if k == "job" else v) for k, v in args.items()})
                assert theirs.value.message.replace(job_id, "N") == \
                    missing.value.message.replace("999999", "N")
            stream = bob.stream("jobs.logs", {"job": job_id})
            with pytest.raises(NotFound):
                list(stream.events())
            assert all(j["id"] != job["id"] for j in
                       bob.call("jobs.list", {"all_users": False})["jobs"])
            with pytest.raises(PermissionDenied):
                bob.call("jobs.list", {"all_users": True})
        with site.as_user("carol") as carol:
            assert carol.call("jobs.get", {"job": job_id})["owner"] == "alice"
            assert any(j["id"] == job["id"] for j in
                       carol.call("jobs.list", {"all_users": True})["jobs"])
            with pytest.raises(PermissionDenied):
                carol.call("jobs.submit", {"snapshot": snapshot,
                                           "jobs": [{"argv": ["true"]}]})
            with pytest.raises(PermissionDenied):
                carol.call("jobs.cancel", {"jobs": [job_id]})
            with pytest.raises(PermissionDenied):
                carol.call("admin.users.list")
        with site.as_user("root2") as admin:
            assert admin.call("jobs.cancel", {"jobs": [job_id]})["jobs"][0]["id"] == job["id"]
            assert any(u["name"] == "alice" for u in admin.call("admin.users.list")["users"])


def test_31st_submission_in_a_minute_is_rate_limited_but_sync_is_not(short_tmp: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            key = admin.call("admin.users.add", {"name": "dan", "role": "researcher"})["key"]
        with daemon.connect(api_key=key) as dan:
            snapshot = stored_snapshot(dan)
            for _ in range(30):
                dan.call("jobs.submit", {"snapshot": snapshot, "jobs": [{"argv": ["true"]}]})
            with pytest.raises(RateLimited) as info:
                dan.call("jobs.submit", {"snapshot": snapshot, "jobs": [{"argv": ["true"]}]})
            assert 0 < info.value.retry_after <= 60
        project = short_tmp / "many"
        (project / "d").mkdir(parents=True)
        for i in range(1000):
            (project / "d" / f"f{i}.txt").write_text(f"file {i}\n")
        done = daemon.cli("sync", "--json", cwd=project, env={"FETCHML_API_KEY": key})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["sent_files"] == 1000
    finally:
        daemon.stop()


def tls_url(daemon: DaemonProcess, host: str) -> str:
    from urllib.parse import urlsplit

    return f"wss://{host}:{urlsplit(str(daemon.runtime_info['url'])).port}"


def test_allowlist_forged_forwarded_for_mapped_ipv6_and_origin(short_tmp: Path) -> None:
    daemon, ca = start_secure_daemon(short_tmp, "ip_allowlist: ['10.1.2.3/32']\n",
                                     listen="[::]:0")
    try:
        with daemon.connect() as admin:
            key = admin.call("admin.users.add", {"name": "eve", "role": "researcher"})["key"]
        # outside the allowlist, a connection is closed at accept: not even TLS is spoken
        for host in ("127.0.0.1", "[::1]"):
            with pytest.raises(DaemonUnreachable):
                connect(Target(url=tls_url(daemon, host) + "/ws"), api_key=key,
                        ca_file=str(ca))
        site = Site(daemon, tls_url(daemon, "127.0.0.1") + "/ws", ca, {}, "tls")
        forged = {"Authorization": f"Bearer {key}", "X-Forwarded-For": "10.1.2.3"}
        with pytest.raises((ssl.SSLError, ConnectionError)):
            http_status(site, forged)
        with daemon.connect() as admin:
            entries = admin.call("admin.audit", {"tail": 50})["entries"]
        assert not [e for e in entries if e["event"] == "auth.success" and e["user"] == "eve"]
        assert key not in json.dumps(entries)
    finally:
        daemon.stop()
    daemon, ca = start_secure_daemon(
        short_tmp,
        "ip_allowlist: ['10.1.2.3/32', '127.0.0.0/8']\ntrusted_proxies: ['::1/128']\n"
        "allowed_origins: ['https://dash.example']\n", listen="[::]:0")
    try:
        with daemon.connect() as admin:
            key = admin.call("admin.users.add", {"name": "eve2", "role": "researcher"})["key"]
        v4 = Site(daemon, tls_url(daemon, "127.0.0.1") + "/ws", ca, {}, "tls")
        auth = {"Authorization": f"Bearer {key}"}
        assert http_status(v4, auth) == 101  # ::ffff:127.0.0.1 matches 127.0.0.0/8
        assert http_status(v4, {**auth, "Origin": "https://evil.example"}) == 403
        assert http_status(v4, {**auth, "Origin": "https://dash.example"}) == 101
        # a trusted proxy (::1) may speak for an allowed client, not for a refused one
        v6 = Site(daemon, tls_url(daemon, "[::1]") + "/ws", ca, {}, "tls")
        assert http_status(v6, {**auth, "X-Forwarded-For": "10.1.2.3"}) == 101
        assert http_status(v6, {**auth, "X-Forwarded-For": "192.168.7.7"}) == 403
    finally:
        daemon.stop()


NOBODY = 65534


def connect_as_uid(uid: int, sock_path: Path) -> dict[str, object]:
    """Connect from a forked child running as ``uid`` (the kernel reports the peer's uid as
    it was at connect time); returns the hello result or the error the child got."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, connect, report, exit without running pytest code
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with connect(Target(socket_path=str(sock_path))) as conn:
                outcome: dict[str, object] = {"hello": conn.hello}
        except FetchmlError as exc:
            outcome = {"error": exc.code, "message": exc.message}
        except BaseException as exc:
            outcome = {"error": "crash", "message": repr(exc)}
        os.write(write_fd, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_unmapped_local_uid_is_refused_and_a_mapped_one_is_its_user(short_tmp: Path) -> None:
    os.chmod(short_tmp, 0o755)
    daemon = make_daemon(short_tmp, FETCHML_SOCKET_MODE="0666").start()
    try:
        os.chmod(daemon.state_dir, 0o755)
        refused = connect_as_uid(NOBODY, daemon.socket)
        assert refused["error"] == "unauthenticated", refused
        assert f"local uid {NOBODY} is not mapped" in str(refused["message"])
        with daemon.connect() as admin:
            entries = admin.call("admin.audit", {"tail": 20})["entries"]
        assert any(e["event"] == "auth.failure" and e["peer"].startswith(f"unix uid {NOBODY}")
                   for e in entries)
    finally:
        daemon.stop()
    config = write_config(short_tmp, f"users:\n  - {{name: nob, role: analyst, uid: {NOBODY}}}\n")
    daemon = make_daemon(short_tmp, "--config", str(config), FETCHML_SOCKET_MODE="0666").start()
    try:
        os.chmod(daemon.state_dir, 0o755)
        accepted = connect_as_uid(NOBODY, daemon.socket)
        assert accepted["hello"]["user"] == "nob", accepted  # type: ignore[index]
        assert accepted["hello"]["role"] == "analyst"  # type: ignore[index]
    finally:
        daemon.stop()


def test_keys_never_land_in_the_state_dir_logs_or_audit(site: Site) -> None:
    with site.as_user("alice") as alice:
        alice.call("host.ping")
    with pytest.raises(FetchmlError):
        site.conn("fml_guessing_" + "y" * 30)
    blobs = [p.read_bytes() for p in site.daemon.root.rglob("*") if p.is_file()
             and not p.is_symlink() and p.stat().st_size < 50 << 20]
    for key in site.keys.values():
        assert key.encode() not in b"".join(blobs)
    assert b"fml_guessing" not in b"".join(blobs)


def test_editing_one_audit_line_is_found_and_named(short_tmp: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            for name in ("u1", "u2", "u3"):
                admin.call("admin.users.add", {"name": name, "role": "analyst"})
        assert daemon.cli("audit", "verify").returncode == 0
        log = daemon.state_dir / "logs" / "audit.log"
        lines = log.read_text().splitlines()
        target = next(i for i, line in enumerate(lines) if '"u2"' in line)
        lines[target] = lines[target].replace('"u2"', '"u9"')
        log.write_text("\n".join(lines) + "\n")
        done = daemon.cli("audit", "verify", "--json")
        assert done.returncode == 1
        report = json.loads(done.stdout)
        assert report["ok"] is False and report["bad_line"] == target + 1
        assert "edited" in report["reason"]
    finally:
        daemon.stop()


def test_user_names_and_job_names_cannot_forge_audit_lines(short_tmp: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            snapshot = stored_snapshot(admin)
            evil = 'x"}\n{"seq": 1, "event": "auth.success"\x1b[31m'
            admin.call("jobs.submit", {"snapshot": snapshot,
                                       "jobs": [{"argv": ["true"], "name": evil}]})
        raw = (daemon.state_dir / "logs" / "audit.log").read_bytes()
        assert all(json.loads(line) for line in raw.splitlines())
        assert b"\x1b" not in raw and b'\n{"seq": 1' not in raw
        assert daemon.cli("audit", "verify").returncode == 0
    finally:
        daemon.stop()
