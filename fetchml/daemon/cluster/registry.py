"""The hosts of a cluster, in Redis beside the jobs: who is there, where, with what, and when
each was last heard from.

``<prefix>hosts`` maps a host's name to its record (JSON: address, resources, free resources,
the instance id of the daemon process, when it started); ``<prefix>host_seen`` maps the name
to the Redis server's time of its last heartbeat or claim. Times come from Redis's clock, not
the hosts', so one host's clock running late cannot make another look silent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from fetchml.daemon.store.redis import HOST_SEEN, RedisJobStore
from fetchml.errors import Conflict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostRecord:
    name: str
    address: str | None  # ws:// or wss:// URL of its protocol endpoint; None: not reachable
    resources: dict[str, Any]  # {"cpus", "memory", "gpus": [{"index", "uuid", "name", ...}]}
    free: dict[str, Any]  # {"cpus", "memory", "gpus": [index]}
    instance: str  # changes each time the daemon starts
    started_at: float
    last_seen: float = 0.0  # Redis time, seconds

    def to_json(self) -> str:
        record = asdict(self)
        del record["last_seen"]  # kept in host_seen, renewed without rewriting the record
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str, last_seen: float) -> HostRecord:
        data = json.loads(text)
        return cls(name=str(data["name"]), address=data.get("address"),
                   resources=dict(data.get("resources") or {}),
                   free=dict(data.get("free") or {}), instance=str(data.get("instance", "")),
                   started_at=float(data.get("started_at", 0.0)), last_seen=last_seen)

    def gpu_count(self) -> int:
        return len(self.resources.get("gpus") or ())


class HostRegistry:
    """Reads and writes host records through a RedisJobStore's connection."""

    def __init__(self, store: RedisJobStore) -> None:
        self.store = store
        self.hosts_key = store.key("hosts")
        self.seen_key = store.key(HOST_SEEN)

    async def server_time(self) -> float:
        seconds, micros = await self.store.call(lambda: self.store.redis.time())
        return float(seconds) + float(micros) / 1e6

    async def register(self, record: HostRecord, lease_timeout: float) -> float:
        """Announce this host; Conflict when a live daemon elsewhere already uses its name."""
        hosts = {host.name: host for host in await self.hosts()}
        now = await self.server_time()
        other = hosts.get(record.name)
        if (other is not None and other.instance != record.instance
                and now - other.last_seen < lease_timeout):
            raise Conflict(f"a daemon named {record.name!r} is already part of this cluster "
                           f"(seen {now - other.last_seen:.1f} s ago at {other.address}); "
                           "give each daemon its own --name")
        return await self.heartbeat(record)

    async def heartbeat(self, record: HostRecord) -> float:
        """Store the record and renew the host's lease; returns the Redis time it was seen."""
        redis = self.store.redis

        async def write() -> float:
            seconds, micros = await redis.time()
            seen = float(seconds) + float(micros) / 1e6
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.hosts_key, record.name, record.to_json())
                pipe.hset(self.seen_key, record.name, f"{seen:.6f}")
                await pipe.execute()
            return seen

        return await self.store.call(write)

    async def hosts(self) -> list[HostRecord]:
        """Every host ever registered, by name."""
        redis = self.store.redis

        async def read() -> tuple[dict[str, str], dict[str, str]]:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.hosts_key)
                pipe.hgetall(self.seen_key)
                records, seen = await pipe.execute()
            return records, seen

        records, seen = await self.store.call(read)
        found = []
        for name, text in sorted(records.items()):
            try:
                found.append(HostRecord.from_json(text, float(seen.get(name, 0.0))))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring the unreadable record of host %s: %s", name, exc)
        return found
