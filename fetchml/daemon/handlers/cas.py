"""cas.* and snapshot.*: uploads and downloads of objects and snapshot manifests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fetchml.cas import delta, gc
from fetchml.cas.gc_pause import gc_paused
from fetchml.cas.hashing import hash_bytes, is_oid
from fetchml.cas.manifest import ManifestSummary, SnapshotManifest, summarize_validated
from fetchml.cas.objects import ObjectStore, PendingObject
from fetchml.daemon.handlers import (
    Call,
    grant_objects,
    handles,
    may_read_object,
    may_read_snapshot,
    resolve_snapshot,
)
from fetchml.errors import BadRequest, IntegrityError, NotFound, TooLarge
from fetchml.protocol import CHUNK_BYTES, ops

UPLOADS_KEY = "cas.uploads"
# Session state: the manifest this connection last sent and was refused for missing objects.
VALIDATED_KEY = "cas.validated"
# The manifest this connection stored last (the base its next delta will likely name), and the
# one being stored now.
LAST_MANIFEST_KEY = "cas.last_manifest"
PENDING_MANIFEST_KEY = "cas.pending_manifest"
DELTA_BASE_KEY = "cas.delta_base"  # (snapshot, its base, the base's objects) of a delta put
# Object bytes this connection sent since it last stored a snapshot: the rest of that
# snapshot's bytes did not need uploading (fetchml_sync_deduplicated_bytes).
RECEIVED_KEY = "cas.received"
# How many missing oids a refused snapshot.put lists (a client uploads exactly those).
MISSING_LISTED = 10_000
# Upper bound on a single object; a sync refuses bigger files long before this.
MAX_OBJECT_BYTES = 1 << 40


def _check_oids(oids: list[str]) -> None:
    for oid in oids:
        if not is_oid(oid):
            raise BadRequest(f"{oid[:80]!r} is not an object id (64 lowercase hex digits)")


def _blob_fields(blob: dict[str, Any]) -> tuple[str, int, int, bytes]:
    oid, size, offset, data = (blob.get(k) for k in ("oid", "size", "offset", "data"))
    if not isinstance(oid, str) or not is_oid(oid):
        raise BadRequest("each blob needs an oid of 64 lowercase hex digits")
    if type(size) is not int or not 0 <= size <= MAX_OBJECT_BYTES:
        raise BadRequest(f"blob {oid[:12]} needs a size between 0 and {MAX_OBJECT_BYTES}")
    if type(offset) is not int or not 0 <= offset <= size:
        raise BadRequest(f"blob {oid[:12]} needs an offset between 0 and its size")
    if not isinstance(data, bytes) or offset + len(data) > size:
        raise BadRequest(f"blob {oid[:12]} needs binary data that ends within its size")
    if set(blob) - {"oid", "size", "offset", "data"}:
        raise BadRequest("a blob holds only oid, size, offset and data")
    return oid, size, offset, data


def _store_blobs(store: ObjectStore, uploads: dict[str, PendingObject],
                 blobs: list[dict[str, Any]]) -> list[str]:
    """Append each chunk to its object's pending upload; commit the objects it completes."""
    done: list[PendingObject] = []
    stored: list[str] = []
    for blob in blobs:
        oid, size, offset, data = _blob_fields(blob)
        pending = uploads.get(oid)
        if offset == 0:
            if pending is not None:
                pending.discard()
            if len(data) == size and store.contains(oid):
                uploads.pop(oid, None)
                stored.append(oid)  # already here: content addressing makes it identical
                continue
            pending = uploads[oid] = store.begin(oid, size)
        elif pending is None or pending.received != offset:
            expected = 0 if pending is None else pending.received
            raise BadRequest(f"chunk of {oid[:12]} at offset {offset} does not follow the "
                             f"previous one (expected {expected}); resend it from offset 0")
        pending.write(data)
        if pending.complete:
            done.append(uploads.pop(oid))
    try:
        store.commit(done)
    finally:
        stored.extend(p.oid for p in done)
    return stored


def _uploads(call: Call[Any]) -> dict[str, PendingObject]:
    uploads: dict[str, PendingObject] | None = call.session.state.get(UPLOADS_KEY)
    if uploads is None:
        uploads = call.session.state[UPLOADS_KEY] = {}

        def discard_all() -> None:
            for pending in uploads.values():
                pending.discard()
            uploads.clear()

        call.session.cleanups.append(discard_all)
    return uploads


@handles(ops.CAS_MISSING)
async def cas_missing(call: Call[ops.CasMissingArgs]) -> dict[str, Any]:
    oids: list[str] = call.args["oids"]  # ObjectStore.missing refuses malformed ids
    # Under the collector's lock: what is reported present is protected before a collection
    # can delete it, since the client will not upload it.
    async with call.core.gc_guard():
        missing = await asyncio.to_thread(call.core.objects.missing, oids)
        absent = set(missing)
        call.core.gc.protect_objects(oid for oid in oids if oid not in absent)
    return {"missing": missing}


@handles(ops.CAS_PUT)
async def cas_put(call: Call[ops.CasPutArgs]) -> dict[str, Any]:
    blobs: list[dict[str, Any]] = call.args["blobs"]
    total = sum(len(b.get("data", b"")) for b in blobs if isinstance(b.get("data"), bytes))
    if total > CHUNK_BYTES:
        raise TooLarge(f"cas.put carries {total} bytes of data; send at most {CHUNK_BYTES} "
                       "per request")
    stored = await asyncio.to_thread(_store_blobs, call.core.objects, _uploads(call), blobs)
    call.core.gc.protect_objects(stored)  # some were stored already, and may be old
    call.core.metrics.count_upload(total)
    call.session.state[RECEIVED_KEY] = call.session.state.get(RECEIVED_KEY, 0) + total
    return {"stored": stored}


@handles(ops.CAS_GET)
async def cas_get(call: Call[ops.CasGetArgs]) -> dict[str, Any]:
    oid: str = call.args["oid"]
    _check_oids([oid])
    store = call.core.objects
    if not may_read_object(call, oid):  # as if it were not stored
        raise store.not_found(oid)
    size = await asyncio.to_thread(store.size, oid)
    chunks: Iterator[bytes] = store.iter_chunks(oid, CHUNK_BYTES)
    try:
        while True:
            # read and sent under the connection's budget: a reader that does not keep up
            # holds a few chunks of our memory, whatever it asked for
            async with call.session.large_sends:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                await call.emit("chunk", chunk)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return {"oid": oid, "size": size}


@dataclass(frozen=True)
class _PutOutcome:
    snapshot: str
    summary: ManifestSummary
    missing: list[str]


def _summary(call: Call[Any], data: bytes, snapshot: str) -> tuple[ManifestSummary, bool]:
    """(summary of the manifest, whether it is stored already), validating it at most once."""
    if call.core.snapshots.contains(snapshot):
        # The same digest means the same bytes, and those were validated when first stored.
        return summarize_validated(data), True
    validated: dict[str, ManifestSummary] = call.session.state.setdefault(VALIDATED_KEY, {})
    summary = validated.get(snapshot)
    if summary is None:
        with gc_paused():
            manifest = SnapshotManifest.decode(data)
            summary = manifest.summary()
        call.session.state[PENDING_MANIFEST_KEY] = (snapshot, manifest)
        # A client retries the same manifest once it has uploaded what was missing.
        validated.clear()
        validated[snapshot] = summary
    return summary, False


def _to_check(call: Call[Any], snapshot: str, oids: tuple[str, ...]) -> Sequence[str]:
    """The objects whose presence must be checked. A delta's base is a stored manifest, and
    while the sweep gate is held a stored manifest's objects are all present (a collection
    deletes manifests before their objects), so only the objects the base lacks are."""
    based = call.session.state.pop(DELTA_BASE_KEY, None)
    if based is None or based[0] != snapshot or not call.core.snapshots.contains(based[1]):
        return oids
    known: set[str] = based[2]
    return [oid for oid in oids if oid not in known]


def _put_snapshot(call: Call[Any], data: bytes) -> _PutOutcome:
    snapshot = hash_bytes(data)
    summary, stored = _summary(call, data, snapshot)
    objects = call.core.objects
    missing = objects.missing(_to_check(call, snapshot, summary.oids))
    if missing:
        return _PutOutcome(snapshot, summary, missing)
    objects.flush()  # every object the manifest names is durable before the manifest exists
    if stored:
        gc.touch(call.core.snapshots, snapshot)  # used again: young for one more grace period
    else:
        call.core.snapshots.put_bytes(data)
        call.session.state.get(VALIDATED_KEY, {}).pop(snapshot, None)
    return _PutOutcome(snapshot, summary, [])


def _apply_delta(call: Call[Any]) -> bytes:
    """The encoded manifest the base snapshot plus the changes give (validated changes)."""
    args = call.args
    base_id = args["base"]
    cached = call.session.state.get(LAST_MANIFEST_KEY)
    if cached is not None and cached[0] == base_id:
        base = cached[1]
    else:
        if not is_oid(base_id) or not call.core.snapshots.contains(base_id) or \
                not may_read_snapshot(call, base_id):
            raise NotFound(f"base snapshot {base_id[:12]} is not stored; send the whole "
                           "manifest")
        base = delta.load_stored(call.core.snapshots.read_bytes(base_id))
    with gc_paused():
        manifest = delta.apply(base, args["upsert"] or [], args["remove"] or [])
        data = manifest.encode()
    snapshot = hash_bytes(data)
    if args["expect"] is not None and args["expect"] != snapshot:
        raise BadRequest("the changes do not give the snapshot the client expected; send the "
                         "whole manifest")
    validated: dict[str, ManifestSummary] = call.session.state.setdefault(VALIDATED_KEY, {})
    validated.clear()
    validated[snapshot] = manifest.summary()
    call.session.state[PENDING_MANIFEST_KEY] = (snapshot, manifest)
    call.session.state[DELTA_BASE_KEY] = (snapshot, base_id, base.oids())
    return data


def _manifest_bytes(call: Call[ops.SnapshotPutArgs]) -> bytes:
    if call.args["manifest"] is not None:
        if call.args["base"] is not None:
            raise BadRequest("send either a whole manifest or a base and changes, not both")
        return bytes(call.args["manifest"])
    if call.args["base"] is None:
        raise BadRequest("snapshot.put needs a manifest, or a base snapshot and changes")
    return _apply_delta(call)


def _remember(call: Call[Any], snapshot: str) -> None:
    """Keep the manifest just stored, as the likely base of this connection's next delta."""
    pending = call.session.state.pop(PENDING_MANIFEST_KEY, None)
    if pending is not None and pending[0] == snapshot:
        call.session.state[LAST_MANIFEST_KEY] = pending


@handles(ops.SNAPSHOT_PUT)
async def snapshot_put(call: Call[ops.SnapshotPutArgs]) -> dict[str, Any]:
    async with call.core.gc_guard():
        data = await asyncio.to_thread(_manifest_bytes, call)
        outcome = await asyncio.to_thread(_put_snapshot, call, data)
        missing = outcome.missing
        if missing:
            absent = set(missing)
            # The client uploads only what is listed and relies on the rest staying.
            call.core.gc.protect_objects(o for o in outcome.summary.oids if o not in absent)
        else:
            call.core.gc.protect_snapshot(outcome.snapshot, outcome.summary.oids)
    if missing:
        raise IntegrityError(
            f"{len(missing)} objects of this snapshot are not stored (first {missing[0][:12]}); "
            "upload them before the manifest, or run the sync again",
            details={"missing": missing[:MISSING_LISTED], "missing_count": len(missing)},
        )
    _remember(call, outcome.snapshot)
    await asyncio.to_thread(call.core.snapshot_owners.record, outcome.snapshot,
                            call.identity.user)
    summary = outcome.summary
    call.core.metrics.count_deduplicated(summary.bytes - call.session.state.pop(RECEIVED_KEY, 0))
    return {"snapshot": outcome.snapshot, "files": summary.files, "bytes": summary.bytes}


@handles(ops.SNAPSHOT_GET)
async def snapshot_get(call: Call[ops.SnapshotArgs]) -> dict[str, Any]:
    snapshot = await resolve_snapshot(call, call.args["snapshot"])
    call.core.gc.protect_snapshot(snapshot)  # the client may be about to use it
    data = await asyncio.to_thread(call.core.snapshots.read_bytes, snapshot)  # verified
    summary = await asyncio.to_thread(summarize_validated, data)
    if not call.core.reads_everything(call.identity):  # its objects, for the pull that follows
        grant_objects(call, await asyncio.to_thread(lambda: SnapshotManifest.decode(data).oids()))
    return {"snapshot": snapshot, "manifest": data, "files": summary.files,
            "bytes": summary.bytes}
