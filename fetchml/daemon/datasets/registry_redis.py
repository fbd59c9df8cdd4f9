"""The dataset registry on Redis, shared by every daemon of a cluster.

Layout under ``fetchml:datasets:``: ``names`` (set of dataset names), ``versions:<name>`` (hash:
version number -> JSON of the version), ``generation`` (incremented by every change, so a daemon
re-reads the registry only when someone changed it). Each write is an optimistic transaction:
the name's hash is WATCHed, read, and rewritten in MULTI/EXEC; a concurrent writer makes EXEC
fail and the step is retried from fresh reads, so two pushes never get the same number.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from fetchml.daemon.datasets.registry import Change, DatasetRegistry, DatasetVersion
from fetchml.daemon.store.redis_client import redis_client, redis_errors
from fetchml.errors import InternalError, Unavailable

log = logging.getLogger(__name__)

PREFIX = "fetchml:datasets:"
MAX_RETRIES = 100  # optimistic transactions retried under contention before giving up


class RedisDatasetRegistry(DatasetRegistry):
    shared = True

    def __init__(self, url: str, *, prefix: str = PREFIX) -> None:
        self.url, self.prefix = url, prefix
        self._redis: aioredis.Redis | None = None

    def _errors(self, *, connecting: bool = False) -> contextlib.AbstractContextManager[None]:
        return redis_errors(f"the dataset registry in Redis at {self.url} did not answer",
                            "try again once Redis is back", connecting=connecting)

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise Unavailable("the dataset registry is closed; the daemon is stopping")
        return self._redis

    async def open(self) -> None:
        if self._redis is not None:
            return
        with self._errors(connecting=True):
            self._redis = redis_client(self.url)
            await self._redis.ping()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}versions:{name}"

    @staticmethod
    def _decode(raw: Mapping[Any, Any]) -> list[DatasetVersion]:
        return sorted((DatasetVersion.from_json(v) for v in raw.values()),
                      key=lambda v: v.version)

    async def versions(self, name: str) -> list[DatasetVersion]:
        with self._errors():
            return self._decode(await self.redis.hgetall(self._key(name)))

    async def all_versions(self) -> list[DatasetVersion]:
        with self._errors():
            names = sorted(await self.redis.smembers(self.prefix + "names"))
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._key(str(name)))
                hashes = await pipe.execute()
        return [v for raw in hashes for v in self._decode(raw)]

    async def generation(self) -> int:
        with self._errors():
            return int(await self.redis.get(self.prefix + "generation") or 0)

    async def _write(self, name: str, change: Change) -> Any:
        key = self._key(name)
        with self._errors():
            async with self.redis.pipeline(transaction=True) as transaction:
                pipe: Any = transaction  # redis' pipeline methods are untyped
                for _ in range(MAX_RETRIES):
                    try:
                        await pipe.watch(key)
                        rows, result = change(self._decode(await pipe.hgetall(key)))
                        pipe.multi()
                        if rows:
                            pipe.hset(key, mapping={str(v.version): json.dumps(v.to_wire())
                                                    for v in rows})
                            pipe.sadd(self.prefix + "names", name)
                            pipe.incr(self.prefix + "generation")
                        await pipe.execute()
                        return result
                    except WatchError:
                        continue
        raise InternalError(f"dataset {name} changed {MAX_RETRIES} times while being written; "
                            "try again")
