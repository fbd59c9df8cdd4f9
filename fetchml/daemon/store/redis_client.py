"""The one way fetchml talks to Redis: clients with the project's timeouts, and one
translation of what Redis and its sockets raise into ``Unavailable``.

Used by the Redis job store, the Redis dataset registry and the cluster, which are imported
only when the daemon is given a ``redis://`` store: a SQLite daemon never imports redis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import RedisError

from fetchml.errors import Unavailable

# A Redis that does not answer within this many seconds is treated as unreachable, so that
# requests fail fast with `unavailable` rather than hang. Commands are small: even with
# appendfsync always one answers in milliseconds.
SOCKET_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 2.0
# One quick retry on a fresh connection: after a Redis restart the pooled connections are
# dead, and the first command on each would fail otherwise. More would only delay `unavailable`.
COMMAND_RETRY = Retry(ConstantBackoff(0.05), 1)

# What Redis being away (stopped, restarting, unreachable, too slow) raises.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)


def redis_client(url: str) -> aioredis.Redis:
    """A client (a connection pool; it connects on first use) for ``url``, answering str.

    A malformed URL raises ValueError: create it inside ``redis_errors(..., connecting=True)``.
    """
    return aioredis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                                   socket_connect_timeout=CONNECT_TIMEOUT_S,
                                   retry=COMMAND_RETRY, decode_responses=True)


@contextlib.contextmanager
def redis_errors(failed: str, then: str, *, connecting: bool = False) -> Iterator[None]:
    """Raise what Redis raises in the block as Unavailable: "<failed> (<cause>); <then>".

    ``failed`` says what could not be reached, ``then`` what to do; with ``connecting``, a
    ValueError (a malformed URL) counts too.
    """
    caught: tuple[type[Exception], ...] = REDIS_ERRORS
    if connecting:
        caught = (*REDIS_ERRORS, ValueError)
    try:
        yield
    except caught as exc:
        raise Unavailable(f"{failed} ({exc}); {then}") from exc
