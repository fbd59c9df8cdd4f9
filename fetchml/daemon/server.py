"""Listeners, the state-dir lock, signals and graceful stop: what turns an app into a daemon."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web

from fetchml.config import DaemonSettings, daemon_socket_path
from fetchml.daemon import sdnotify
from fetchml.daemon.app import DAEMON_CORE, create_app, create_metrics_app
from fetchml.daemon.cluster.membership import advertised_address
from fetchml.daemon.core import DaemonCore
from fetchml.daemon.security.auth import check_users, load_roles
from fetchml.daemon.security.gate import ConnectionGate
from fetchml.daemon.security.netpolicy import NetworkPolicy
from fetchml.daemon.tasks import cancel_and_wait, every
from fetchml.errors import ConfigError, Conflict, FetchmlError

log = logging.getLogger(__name__)

LOCK_NAME = "daemon.lock"
# Written once the daemon listens, so tools and tests can find a TCP port chosen with port 0.
RUNTIME_INFO_NAME = "daemon.json"
# AF_UNIX paths are limited to 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the state dir for the daemon's lifetime."""
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        reason = ("it is not a directory" if state_dir.exists() and not state_dir.is_dir()
                  else exc.strerror or str(exc))
        raise ConfigError(f"cannot use state dir {state_dir} ({reason}); give "
                          "--state-dir a directory this user can write") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Conflict(
                f"another fetchml daemon (pid {holder}) is using state dir {state_dir}; "
                "stop it first or choose another --state-dir"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def bind_unix_socket(path: Path, mode: int, group: str | None) -> socket.socket:
    """Bind the local socket under umask 0077, replacing only a stale socket file."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError(
            f"socket path {path} is longer than {MAX_UNIX_PATH} bytes; set a shorter "
            "--state-dir or the socket setting"
        )
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise Conflict(f"{path} exists and is not a socket; move it away or choose "
                           "another socket path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise Conflict(f"cannot tell whether {path} is in use ({exc.strerror}); "
                               "remove it if no daemon runs") from exc
            log.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise Conflict(f"a daemon already answers on {path}; stop it first or choose "
                           "another socket path")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, PermissionError) as exc:
            sock.close()
            raise ConfigError(f"cannot give socket {path} to group {group!r}: {exc}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port; ``::`` takes IPv4 clients too (as ::ffff:a.b.c.d), as on Linux."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                          "another address or port") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ConfigError(f"listen address {value!r} must look like 127.0.0.1:9101 or [::1]:9101")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(settings: DaemonSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("TLS needs both tls_cert and tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}") from exc
    return context


def check_settings(settings: DaemonSettings) -> ssl.SSLContext | None:
    """Validate what can be checked without starting; returns the TLS context, if any."""
    context = tls_context(settings)
    if settings.listen:
        host, _ = parse_listen(settings.listen)
        if context is None and not _is_loopback(host) and not settings.allow_insecure:
            raise ConfigError(
                f"refusing to listen on {settings.listen} without TLS; set tls_cert and "
                "tls_key, or allow_insecure: true on a trusted network"
            )
    roles = load_roles(settings.roles)
    check_users(settings.users, roles)
    advertised_address(settings.advertise, None)  # a bad URL is a config error, not a crash
    NetworkPolicy(settings.ip_allowlist, settings.trusted_proxies, settings.allowed_origins)
    return context


async def serve(settings: DaemonSettings, *, on_ready: Callable[[dict[str, object]], None]
                | None = None, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until ``stop`` is set (or SIGTERM/SIGINT); returns after a clean stop."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    socket_path = daemon_socket_path(settings)
    context = check_settings(settings)
    tcp = parse_listen(settings.listen) if settings.listen else None
    with state_dir_lock(settings.state_dir):
        unix = bind_unix_socket(socket_path, settings.socket_mode, settings.socket_group)
        ours = os.stat(socket_path).st_ino  # remove on exit only the socket we created
        app = create_app(settings)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        info: dict[str, object] = {"pid": os.getpid(), "socket": str(socket_path)}
        cleanups: list[Callable[[], Awaitable[None]]] = []
        tcp_sock: socket.socket | None = None
        try:
            if tcp:  # bound first: the daemon tells its cluster peers the port it got
                tcp_sock = bind_tcp_socket(*tcp)
                info["url"] = _url("wss" if context else "ws", (tcp[0],
                                   tcp_sock.getsockname()[1])) + "/ws"
                app[DAEMON_CORE].listen_url = str(info["url"])
            await runner.setup()
            await web.SockSite(runner, unix).start()
            if tcp_sock is not None:  # through the gate: the Unix socket is always served
                gate = _gate(settings, app[DAEMON_CORE], with_policy=True)
                app[DAEMON_CORE].connections = gate
                cleanups.append(_serve_through(gate, tcp_sock, runner, context))
                log.info("listening on %s", info["url"])
            if settings.metrics_listen:
                metrics_runner = web.AppRunner(create_metrics_app(app[DAEMON_CORE]),
                                               handle_signals=False, access_log=None)
                await metrics_runner.setup()
                cleanups.append(metrics_runner.cleanup)
                metrics_sock = bind_tcp_socket(*parse_listen(settings.metrics_listen))
                cleanups.append(_serve_through(_gate(settings, app[DAEMON_CORE],
                                                     with_policy=False),
                                               metrics_sock, metrics_runner, None))
                info["metrics"] = _url("http", metrics_sock.getsockname()) + "/metrics"
                log.info("metrics on %s", info["metrics"])
            log.info("listening on unix socket %s", socket_path)
            _write_runtime_info(settings.state_dir, info)
            sdnotify.notify(f"READY=1\nSTATUS=serving on {socket_path}\nMAINPID={os.getpid()}")
            period = sdnotify.watchdog_period()
            if period:
                watchdog = asyncio.create_task(_watchdog(period, app[DAEMON_CORE]))
                cleanups.append(lambda: cancel_and_wait(watchdog))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            if on_ready is not None:
                on_ready(info)
            await stop.wait()
            log.info("stopping")
            sdnotify.notify("STOPPING=1")
        finally:
            for cleanup in reversed(cleanups):
                await cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await runner.cleanup()
            unix.close()
            if tcp_sock is not None:
                tcp_sock.close()
            with contextlib.suppress(FileNotFoundError):
                if os.stat(socket_path).st_ino == ours:
                    socket_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                (settings.state_dir / RUNTIME_INFO_NAME).unlink()
    log.info("stopped")


def _gate(settings: DaemonSettings, core: DaemonCore, *, with_policy: bool) -> ConnectionGate:
    policy = (NetworkPolicy(settings.ip_allowlist, settings.trusted_proxies,
                            settings.allowed_origins) if with_policy else None)
    refused = core.metrics.connections_refused
    return ConnectionGate(policy=policy, deadline=settings.connect_deadline,
                          per_address=settings.max_pending_per_address,
                          total=settings.max_pending_connections,
                          on_refuse=lambda reason: refused.labels(reason).inc())


def _serve_through(gate: ConnectionGate, sock: socket.socket, runner: web.AppRunner,
                   context: ssl.SSLContext | None) -> Callable[[], Awaitable[None]]:
    """Accept on ``sock`` through ``gate`` into ``runner``'s server; returns the stop."""
    server = runner.server
    assert server is not None  # set up before
    task = asyncio.create_task(gate.serve(sock, server, context), name="accept")
    return lambda: cancel_and_wait(task)


def raise_file_limit(wanted: int = 65536) -> None:
    """Raise the soft limit on open files towards the hard one: connections, logs and
    supervisors' pipes all need descriptors, and the default soft limit is often 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _url(scheme: str, address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host = address[0]
    return f"{scheme}://[{host}]:{address[1]}" if ":" in host else f"{scheme}://{host}:{address[1]}"


async def _watchdog(period: float, core: DaemonCore) -> None:
    """Ping systemd's watchdog while the daemon is healthy; a stuck loop stops the pings."""

    async def ping() -> None:
        if await core.ready() is None:
            sdnotify.notify("WATCHDOG=1")

    await every(period, ping, name="watchdog", at_once=True)


def _write_runtime_info(state_dir: Path, info: dict[str, object]) -> None:
    tmp = state_dir / f".{RUNTIME_INFO_NAME}.tmp"
    # 0600: jobs of other users pass through the state directory; this is the daemon's.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(info))
    tmp.replace(state_dir / RUNTIME_INFO_NAME)


def run(settings: DaemonSettings) -> int:
    """Blocking entry point: serve until stopped; returns the process exit status."""
    raise_file_limit()
    try:
        asyncio.run(serve(settings))
    except FetchmlError as exc:
        log.error("%s", exc.message)
        return exc.exit_code
    return 0
