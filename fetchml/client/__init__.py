"""The CLI's side of the protocol: a blocking client that never imports aiohttp or the daemon."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fetchml.client.connection import Connection, Pending, StreamEvent, Target, connect
from fetchml.config import ClientSettings, Loaded, default_socket_candidates
from fetchml.errors import ConfigError

__all__ = ["Connection", "Pending", "StreamEvent", "Target", "connect", "resolve_target"]

# Lower rank = higher priority, matching the settings' precedence.
_RANK = {"flag": 0, "env": 1, "project-file": 2, "user-file": 3, "default": 9}


def _rank(source: str) -> int:
    return _RANK.get(source.split(" ", 1)[0], 9)


def resolve_target(loaded: Loaded[ClientSettings], env: Mapping[str, str]) -> Target:
    """Where to connect: the most specific of --socket/--url, env, project, user config;
    socket and url are one choice, so a URL from a higher level beats a socket from a lower
    one; else the default local socket."""
    settings, sources = loaded.settings, loaded.sources
    socket_rank = _rank(sources["socket"]) if settings.socket else 99
    url_rank = _rank(sources["url"]) if settings.url else 99
    if socket_rank == url_rank < 99:
        raise ConfigError(
            f"both socket and url are set by {sources['url']}; keep only one of them"
        )
    if url_rank < socket_rank:
        return Target(url=settings.url)
    if settings.socket is not None:
        return Target(socket_path=str(settings.socket))
    candidates = default_socket_candidates(env)
    chosen = next((path for path in candidates if path.exists()), candidates[0])
    return Target(socket_path=str(Path(chosen)))
