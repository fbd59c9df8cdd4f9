"""create_app(settings): the aiohttp application and its routes.

The daemon's services (core.py) are opened in the app's cleanup context, so a test can boot a
complete daemon with ``create_app`` + an aiohttp runner and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from fetchml import __version__
from fetchml.config import DaemonSettings
from fetchml.daemon.core import DaemonCore
from fetchml.daemon.handlers import load_all
from fetchml.daemon.observe.prometheus import CONTENT_TYPE
from fetchml.daemon.security.auth import Knock, SlowedRefusal, peer_credentials
from fetchml.daemon.session import Session
from fetchml.errors import FetchmlError, RateLimited

log = logging.getLogger(__name__)

DAEMON_CORE = web.AppKey("fetchml_core", DaemonCore)


def _knock(request: web.Request) -> Knock:
    """What the connection presents: peer credentials or address, key, proxy and Origin."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    header = request.headers.get("Authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return Knock(unix=peer_credentials(sock), peer=None, key=key or None)
    return Knock(unix=None, peer=request.remote, key=key or None,
                 forwarded_for=request.headers.get("X-Forwarded-For"),
                 origin=request.headers.get("Origin"))


def _refusal(exc: FetchmlError) -> web.Response:
    status = {"unauthenticated": 401, "permission_denied": 403, "rate_limited": 429}.get(
        exc.code, 400)
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.json_response({"error": {"code": exc.code, "message": exc.message,
                                        "details": exc.details}},
                             status=status, headers=headers)


async def websocket_endpoint(request: web.Request) -> web.StreamResponse:
    core = request.app[DAEMON_CORE]
    knock = _knock(request)
    try:
        peer = core.cluster.admit_peer(knock) if core.cluster is not None else None
        identity = peer or core.auth.admit(knock)
    except SlowedRefusal as exc:
        log.info("refused connection: %s", exc.message)
        core.metrics.auth_failures.inc()
        await asyncio.sleep(exc.delay)
        return _refusal(exc)
    except FetchmlError as exc:
        log.info("refused connection: %s", exc.message)
        return _refusal(exc)
    ws = web.WebSocketResponse(
        compress=False,
        max_msg_size=core.limits.max_frame_bytes,
        autoping=True,
        heartbeat=None,
    )
    await ws.prepare(request)
    session = Session(core, ws, identity, identity.source, request.transport)
    core.sessions.add(session)
    try:
        await session.run()
    finally:
        core.sessions.discard(session)
        if not ws.closed:
            await session.close(WSCloseCode.OK, "the session ended")
    return ws


async def ready(request: web.Request) -> web.Response:
    problem = await request.app[DAEMON_CORE].ready()
    if problem:
        return web.json_response({"status": "unavailable", "reason": problem}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    core = request.app[DAEMON_CORE]
    knock = _knock(request)
    if knock.unix is None:  # over TCP, metrics follow the same network policy as sessions
        address = core.auth.policy.client_address(knock.peer, knock.forwarded_for)
        if not core.auth.policy.allows(address):
            return web.json_response({"error": {"code": "permission_denied", "message":
                                                "address not allowed"}}, status=403)
    return web.Response(body=await core.scrape_metrics(),
                        headers={"Content-Type": CONTENT_TYPE})


async def health(request: web.Request) -> web.Response:
    core = request.app[DAEMON_CORE]
    return web.json_response({"status": "ok", "daemon": f"fetchml/{__version__}",
                              "uptime": round(time.time() - core.started_at, 3)})


async def _core_context(app: web.Application) -> AsyncIterator[None]:
    core = app[DAEMON_CORE]
    await core.open()
    try:
        yield
    finally:
        await core.close()


async def _close_sessions(app: web.Application) -> None:
    sessions = list(app[DAEMON_CORE].sessions)
    if sessions:
        await asyncio.gather(*(s.shutdown() for s in sessions), return_exceptions=True)


def create_metrics_app(core: DaemonCore) -> web.Application:
    """The app of --metrics-listen: metrics, health and readiness only, no sessions."""
    app = web.Application(client_max_size=1024)
    app[DAEMON_CORE] = core
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_open)
    return app


async def metrics_open(request: web.Request) -> web.Response:
    """/metrics on the dedicated metrics listener: whoever can reach it may scrape it."""
    core = request.app[DAEMON_CORE]
    return web.Response(body=await core.scrape_metrics(),
                        headers={"Content-Type": CONTENT_TYPE})


def create_app(settings: DaemonSettings) -> web.Application:
    """A complete daemon application; nothing is opened until the app starts."""
    load_all()  # every handler registers its ops
    app = web.Application(client_max_size=64 * 1024)
    app[DAEMON_CORE] = DaemonCore(settings)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ws", websocket_endpoint)
    app.cleanup_ctx.append(_core_context)
    app.on_shutdown.append(_close_sessions)
    return app
