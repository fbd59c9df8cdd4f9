"""The ``store`` fixture: every JobStore implementation, each test run against each.

``make_store()`` builds another store over the same backing storage, so a test can close its
store and open another on the same data; ``persistent`` says whether that data survives.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fetchml.daemon.store import JobStore, MemoryJobStore, SqliteJobStore
from fetchml.daemon.store.redis import RedisJobStore
from tests.conftest import RedisServer


@dataclass(frozen=True)
class StoreFactory:
    name: str
    persistent: bool  # whether a store made later sees what an earlier one stored
    make: Callable[[], JobStore]


def _memory(tmp_path: Path) -> StoreFactory:
    return StoreFactory("memory", persistent=False, make=MemoryJobStore)


def _sqlite(tmp_path: Path) -> StoreFactory:
    return StoreFactory(
        "sqlite", persistent=True, make=lambda: SqliteJobStore(tmp_path / "jobs.db")
    )


def _redis(tmp_path: Path, server: RedisServer) -> StoreFactory:
    prefix = f"t{uuid.uuid4().hex[:12]}:"  # each test its own key space on the shared server
    return StoreFactory("redis", persistent=True,
                        make=lambda: RedisJobStore(server.url, prefix=prefix))


IMPLEMENTATIONS: dict[str, Callable[..., StoreFactory]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if request.param == "redis":
        return _redis(tmp_path, request.getfixturevalue("redis_server"))
    return IMPLEMENTATIONS[request.param](tmp_path)


@pytest.fixture(params=["redis", "sqlite"])
def durable_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Only the implementations that keep their data once closed."""
    if request.param == "redis":
        return _redis(tmp_path, request.getfixturevalue("redis_server"))
    return IMPLEMENTATIONS[request.param](tmp_path)


@pytest.fixture
def persistent(store_factory: StoreFactory) -> bool:
    return store_factory.persistent


@pytest.fixture
def make_store(store_factory: StoreFactory) -> Callable[[], JobStore]:
    """Builds another (unopened) store over the same backing storage as ``store``."""
    return store_factory.make


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[JobStore]:
    store = store_factory.make()
    await store.open()
    yield store
    await store.close()
