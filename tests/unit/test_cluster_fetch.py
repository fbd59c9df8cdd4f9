"""Fetching a snapshot from another daemon: from a real daemon (cluster of one on a real
redis-server) over the protocol, and from a lying peer, whose bytes must never be stored."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.cas.objects import ObjectStore
from fetchml.client.transfer import sync_tree
from fetchml.daemon.cluster.fetch import Peer, SnapshotFetcher
from fetchml.daemon.cluster.peers import PeerPool
from fetchml.daemon.jobs.gc import GarbageCollector, SweepGate
from fetchml.daemon.jobs.retention import Pins
from fetchml.daemon.store import MemoryJobStore
from fetchml.errors import Unavailable
from fetchml.protocol import Limits, decode, encode
from tests.conftest import DaemonProcess, RedisServer, make_daemon

SECRET = "fetch-test-secret"


@pytest.fixture
def peer_daemon(short_tmp: Path, redis_server: RedisServer) -> Iterator[DaemonProcess]:
    # a database of its own on the shared server: daemons use the default key prefix
    daemon = make_daemon(short_tmp / "peer", "--listen", "127.0.0.1:0", "--name",
                         f"peer-{uuid.uuid4().hex[:8]}", "--store",
                         redis_server.url.replace("/0", "/3"),
                         FETCHML_CLUSTER_SECRET=SECRET)
    (short_tmp / "peer").mkdir()
    daemon.start()
    yield daemon
    daemon.stop()


def fetcher(root: Path, peers: list[Peer], secret: str = SECRET) -> SnapshotFetcher:
    objects, snapshots = ObjectStore(root / "objects"), ObjectStore(root / "snapshots")
    gc = GarbageCollector(objects, snapshots, MemoryJobStore(), Pins(root), SweepGate())

    async def ask(prefer: Any) -> list[Peer]:
        return peers

    return SnapshotFetcher(objects, snapshots, gc, PeerPool(secret), ask)


def project(root: Path) -> Path:
    tree = root / "project"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "train.py").write_text("print('train')\n")
    (tree / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # more than one 4 MiB chunk
    (tree / "empty").write_bytes(b"")
    return tree


async def test_a_snapshot_comes_whole_and_verified_from_a_real_peer(
        short_tmp: Path, peer_daemon: DaemonProcess) -> None:
    tree = project(short_tmp)
    with peer_daemon.connect() as conn:
        snapshot = sync_tree(conn, tree, max_file_size=1 << 30).snapshot
    peer = Peer("peer", str(peer_daemon.runtime_info["url"]))
    here = fetcher(short_tmp / "here", [peer])
    try:
        report = await here.ensure(snapshot)
        assert (report.objects, report.source) == (3, "peer")
        assert report.bytes == 5 * 1024 * 1024 + len("print('train')\n")
        manifest = SnapshotManifest.decode(here.snapshots.read_bytes(snapshot))
        for entry in manifest:
            if entry.oid is not None:
                assert here.objects.read_bytes(entry.oid) == (tree / entry.path).read_bytes()
        assert (await here.ensure(snapshot)).objects == 0  # here now: nothing to fetch
        # a damaged copy on the peer is refused, and nothing of it is stored here
        big = next(e for e in manifest if e.path == "big.bin")
        assert big.oid is not None
        path = peer_daemon.state_dir / "objects" / big.oid[:2] / big.oid[2:]
        os.chmod(path, stat.S_IWUSR | stat.S_IRUSR)
        with path.open("r+b") as damaged:
            damaged.write(b"X")
        elsewhere = fetcher(short_tmp / "elsewhere", [peer])
        with pytest.raises(Unavailable, match="1 objects of snapshot"):
            await elsewhere.ensure(snapshot)
        assert elsewhere.objects.missing([big.oid]) == [big.oid]
        assert not elsewhere.snapshots.contains(snapshot)
        await elsewhere.pool.close()
        # a wrong secret gets nothing at all
        intruder = fetcher(short_tmp / "intruder", [peer], secret="guess")
        with pytest.raises(Unavailable, match="refused this daemon"):
            await intruder.ensure(snapshot)
        await intruder.pool.close()
    finally:
        await here.pool.close()


class LyingPeer:
    """Speaks the protocol but sends a manifest or object bytes other than those asked for."""

    def __init__(self, manifest: bytes, objects: dict[str, bytes]) -> None:
        self.manifest, self.objects = manifest, objects

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type != WSMsgType.BINARY:
                continue
            frame = decode(message.data, Limits())
            rid, op, args = frame["id"], frame["op"], frame.get("args", {})
            if op == "snapshot.get":
                await ws.send_bytes(encode({"id": rid, "ok": True, "result": {
                    "snapshot": args["snapshot"], "manifest": self.manifest}}))
            elif op == "cas.get":
                await ws.send_bytes(encode({"id": rid, "event": "chunk",
                                            "data": self.objects[args["oid"]]}))
                await ws.send_bytes(encode({"id": rid, "ok": True, "result": {}}))
            else:
                await ws.send_bytes(encode({"id": rid, "ok": True, "result": {}}))
        return ws


@pytest.fixture
async def lying_peer() -> AsyncIterator[tuple[LyingPeer, str]]:
    liar = LyingPeer(b"", {})
    app = web.Application()
    app.router.add_get("/ws", liar.ws)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield liar, f"ws://127.0.0.1:{port}/ws"
    await runner.cleanup()


async def test_a_lying_peer_gets_nothing_stored(short_tmp: Path,
                                                lying_peer: tuple[LyingPeer, str]) -> None:
    liar, url = lying_peer
    data = b"the real contents\n"
    oid = hash_bytes(data)
    manifest = SnapshotManifest([ManifestEntry.file("a.txt", oid, len(data))]).encode()
    snapshot = hash_bytes(manifest)
    here = fetcher(short_tmp, [Peer("liar", url)])
    try:
        liar.manifest = manifest + b"\x00"  # not the snapshot asked for
        with pytest.raises(Unavailable, match="no reachable host"):
            await here.ensure(snapshot)
        liar.manifest, liar.objects = manifest, {oid: b"the fake contents!\n"[:len(data)]}
        with pytest.raises(Unavailable, match="1 objects of snapshot"):
            await here.ensure(snapshot)
        assert here.objects.missing([oid]) == [oid] and not here.snapshots.contains(snapshot)
        liar.objects = {oid: data}  # honest at last
        assert (await here.ensure(snapshot)).objects == 1
        assert here.objects.read_bytes(oid) == data
    finally:
        await here.pool.close()
