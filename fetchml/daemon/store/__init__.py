"""Job stores: the JobStore contract and its implementations (SQLite, Redis, in-memory).

``store.redis`` is imported only by ``open_job_store`` for a ``redis://`` store, so that a
SQLite daemon never imports redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fetchml.daemon.jobs.model import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    AttemptResult,
    Claim,
    Job,
    JobSpec,
    JobState,
    Resources,
)
from fetchml.daemon.store.contract import JobStore
from fetchml.daemon.store.memory import MemoryJobStore
from fetchml.daemon.store.sqlite import SqliteJobStore

if TYPE_CHECKING:
    from fetchml.config import DaemonSettings


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(store: str) -> bool:
    """Whether the ``store`` setting names Redis (a cluster's shared job store)."""
    return store.startswith(REDIS_SCHEMES)


def open_job_store(settings: DaemonSettings) -> JobStore:
    """The store the settings name: the embedded SQLite database unless a Redis URL is given."""
    if settings.store in ("sqlite", ""):
        return SqliteJobStore(settings.state_dir / "jobs.db")
    if is_redis_url(settings.store):
        from fetchml.daemon.store.redis import RedisJobStore

        return RedisJobStore(settings.store)
    from fetchml.errors import ConfigError

    raise ConfigError(f"unknown job store {settings.store!r}; use sqlite or redis://HOST:PORT/DB")


__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "AttemptResult",
    "Claim",
    "Job",
    "JobSpec",
    "JobState",
    "JobStore",
    "MemoryJobStore",
    "Resources",
    "SqliteJobStore",
    "open_job_store",
]
