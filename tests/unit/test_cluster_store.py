"""The cluster's use of a real redis-server: the Lua claim racing across stores, published
events and their bridge, the host registry, and the scheduler's view of a job another host
gave back while an attempt of it still runs here."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fetchml.daemon.cluster.events import EventBridge
from fetchml.daemon.cluster.membership import advertised_address
from fetchml.daemon.cluster.registry import HostRecord, HostRegistry
from fetchml.daemon.events import JobEvents
from fetchml.daemon.jobs.scheduler import Capacity, Scheduler
from fetchml.daemon.store import AttemptResult, Claim, Job, JobSpec, JobState, MemoryJobStore
from fetchml.daemon.store.redis import RedisJobStore, event_message
from fetchml.errors import ConfigError, Conflict, Unavailable
from tests.conftest import RedisServer

SNAPSHOT = "ab" * 32


def spec(name: str = "j", max_attempts: int = 1) -> JobSpec:
    return JobSpec(name=name, owner="alice", snapshot=SNAPSHOT, argv=("true",),
                   max_attempts=max_attempts)


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisJobStore, RedisJobStore]]:
    """Two daemons' stores over one key space, as two hosts of a cluster have."""
    prefix = f"c{uuid.uuid4().hex[:10]}:"
    first = RedisJobStore(redis_server.url, prefix=prefix, origin="host-a")
    second = RedisJobStore(redis_server.url, prefix=prefix, origin="host-b")
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


async def test_racing_lua_claims_start_each_job_once_and_record_the_winner(
        stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    a, b = stores
    jobs = await a.submit([spec(f"j{i}") for i in range(50)], 100.0)
    won_a, won_b = await asyncio.gather(
        a.claim([Claim(j.id, 0, "a") for j in jobs], 200.0),
        b.claim([Claim(j.id, 0, "b") for j in reversed(jobs)], 200.0))
    assert sorted(j.id for j in won_a + won_b) == [j.id for j in jobs]
    assert not {j.id for j in won_a} & {j.id for j in won_b}
    for job in won_a + won_b:
        stored = await a.get(job.id)
        assert stored == job and stored.state is JobState.RUNNING and stored.attempt == 1
        assert await a.attempt_host(job.id, 1) == job.host
    assert (await a.counts())[JobState.RUNNING] == 50
    seen = await a.redis.hgetall(a.key("host_seen"))
    assert {"a", "b"} >= set(seen) and seen  # each claim renews its host's lease
    # a stale claim (attempt 0 again) and an unknown job start nothing
    assert await b.claim([Claim(jobs[0].id, 0, "b"), Claim(9999, 0, "b")], 300.0) == []


async def test_a_deleted_job_takes_its_attempt_hosts_along(
        stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    a, _ = stores
    (job,) = await a.submit([spec()], 1.0)
    assert await a.claim([Claim(job.id, 0, "a")], 2.0)
    await a.finish(job.id, 1, AttemptResult(JobState.SUCCEEDED), 3.0)
    assert await a.delete([job.id]) == 1
    assert await a.attempt_host(job.id, 1) is None


async def test_changes_are_published_with_their_writer(
        stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    a, b = stores
    pubsub: Any = a.redis.pubsub()
    await pubsub.subscribe(a.channel)
    (job,) = await a.submit([spec()], 1.0)
    await b.claim([Claim(job.id, 0, "b")], 2.0)
    messages: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + 5
    while len(messages) < 2:  # get_message answers None for the subscription's confirmation
        assert asyncio.get_running_loop().time() < deadline, "no event published"
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            messages.append(json.loads(message["data"]))
    await pubsub.aclose()
    assert [(m["origin"], [j["state"] for j in m["jobs"]]) for m in messages] == [
        ("host-a", ["queued"]), ("host-b", ["running"])]
    assert Job.from_dict(messages[1]["jobs"][0]) == await a.get(job.id)


async def test_the_bridge_skips_its_own_echoes_and_catches_up_after_a_gap(
        stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    a, b = stores
    events = JobEvents()
    remote: list[Job] = []
    gaps: list[bool] = []
    bridge = EventBridge(a, events, "host-a", on_remote=remote.append,
                         on_gap=lambda: gaps.append(True))
    with events.subscribe() as sub:
        (job,) = await a.submit([spec()], 1.0)
        events.publish(job)  # what the daemon does with its own change
        bridge.deliver(event_message("host-a", [json.dumps(job.to_dict())]))  # its echo
        bridge.deliver("not json")
        bridge.deliver(json.dumps({"origin": "host-b", "jobs": [{"id": "nonsense"}]}))
        assert sub.drain() == [job] and remote == []
        # while disconnected, another host starts the job: the gap is filled from the store
        (running,) = await b.claim([Claim(job.id, 0, "b")], 2.0)
        await bridge._fill_gap()
        assert sub.drain() == [running] and remote == [running] and gaps == [True]
        # and a live message from another host goes through
        done = await b.finish(job.id, 1, AttemptResult(JobState.SUCCEEDED), 3.0)
        bridge.deliver(event_message("host-b", [json.dumps(done.to_dict())]).encode())
        assert sub.drain() == [done]
    assert job.id not in bridge.active  # ended: no longer looked after


async def test_the_bridge_follows_the_channel_and_survives_a_bad_store(
        stores: tuple[RedisJobStore, RedisJobStore], redis_server: RedisServer) -> None:
    a, b = stores
    events = JobEvents()
    bridge = EventBridge(a, events, "host-a", on_remote=lambda job: None, on_gap=lambda: None)
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.wait_for(bridge.connected.wait(), 5)
        with events.subscribe() as sub:
            (job,) = await b.submit([spec()], 1.0)
            assert await asyncio.wait_for(sub.next(), 5) == job
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    down = RedisJobStore("redis://127.0.0.1:1/0", prefix="x:")
    with pytest.raises(Unavailable, match="cannot reach Redis"):
        await down.open()


def record(name: str, instance: str) -> HostRecord:
    return HostRecord(name=name, address=f"ws://{name}:9101/ws",
                      resources={"cpus": 4, "memory": 1 << 30, "gpus": []},
                      free={"cpus": 4, "memory": 1 << 30, "gpus": []}, instance=instance,
                      started_at=1.0)


async def test_registry_refuses_a_second_live_daemon_with_the_same_name(
        stores: tuple[RedisJobStore, RedisJobStore]) -> None:
    a, b = stores
    first, second = HostRegistry(a), HostRegistry(b)
    seen = await first.register(record("gpu1", "one"), lease_timeout=5.0)
    assert abs(seen - await first.server_time()) < 1.0
    await first.heartbeat(record("gpu1", "one"))  # the same daemon again: fine
    with pytest.raises(Conflict, match="already part of this cluster"):
        await second.register(record("gpu1", "two"), lease_timeout=5.0)
    await asyncio.sleep(0.3)
    await second.register(record("gpu1", "two"), lease_timeout=0.2)  # the old one went silent
    await second.register(record("gpu2", "three"), lease_timeout=5.0)
    hosts = {h.name: h for h in await first.hosts()}
    assert set(hosts) == {"gpu1", "gpu2"} and hosts["gpu1"].instance == "two"
    assert hosts["gpu1"].last_seen > seen and hosts["gpu2"].address == "ws://gpu2:9101/ws"
    await a.redis.hset(first.hosts_key, "broken", "{not json")
    assert {h.name for h in await first.hosts()} == {"gpu1", "gpu2"}


def test_the_advertised_address() -> None:
    assert advertised_address(None, None) is None
    assert advertised_address(None, "ws://127.0.0.1:9101/ws") == "ws://127.0.0.1:9101/ws"
    assert advertised_address("wss://gpu1.lab:9101", None) == "wss://gpu1.lab:9101/ws"
    wildcard = advertised_address(None, "ws://0.0.0.0:9101/ws")
    assert wildcard is not None and "0.0.0.0" not in wildcard and wildcard.endswith(":9101/ws")
    with pytest.raises(ConfigError, match="ws:// or wss://"):
        advertised_address("http://gpu1:9101", None)


async def test_a_job_given_back_while_its_attempt_runs_here_waits_for_that_attempt() -> None:
    store = MemoryJobStore()
    await store.open()
    events = JobEvents()
    started: list[Job] = []

    async def start(job: Job, claimed: asyncio.Future[Job | None]) -> None:
        if (await claimed) is not None:
            started.append(job)

    scheduler = Scheduler(store, "here", Capacity(2, 1 << 30, ()), 600.0, start,
                          events=events)
    (job,) = await store.submit([spec(max_attempts=3)], 1.0)
    events.publish(job)
    (running,) = await scheduler.dispatch()
    assert running.state is JobState.RUNNING and scheduler.running[job.id] == running
    # another host reaped it: it is queued again while our attempt winds down
    requeued = await store.finish(job.id, 1, AttemptResult(JobState.LOST, reason="r"), 2.0)
    assert requeued.state is JobState.QUEUED
    events.publish(requeued)
    assert await scheduler.dispatch() == []  # not while our attempt of it still runs
    scheduler.ended(job.id)
    assert [j.id for j in scheduler.queued_jobs()] == [job.id]
    await store.close()
