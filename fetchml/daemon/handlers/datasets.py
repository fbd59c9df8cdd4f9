"""datasets.*: push, list, info and rm of named, versioned data.

Researchers push datasets and use them in jobs; analysts list and inspect them; a version is
removed by the dataset's owner, the version's pusher, or a role with datasets:delete:all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from fetchml.cas.manifest import summarize_validated
from fetchml.daemon.datasets.registry import REMOVED, DatasetVersion, owner_of
from fetchml.daemon.handlers import Call, handles, resolve_snapshot
from fetchml.daemon.handlers.jobs import may_see
from fetchml.errors import Conflict, NotFound, PermissionDenied
from fetchml.protocol import ops_datasets
from fetchml.protocol.ops_datasets import DatasetRef, parse_ref
from fetchml.protocol.schema import NoArgs

JOBS_NAMED = 5  # job ids a refused removal names: enough to act on, short enough to read


async def _present(call: Call[Any], name: str) -> list[DatasetVersion]:
    versions = await call.core.datasets.registry.versions(name)
    present = [v for v in versions if v.state != REMOVED]
    if not present:
        raise NotFound(f"there is no dataset {name}; `fetchml dataset list` shows them")
    return present


@handles(ops_datasets.DATASETS_PUSH)
async def datasets_push(call: Call[ops_datasets.DatasetsPushArgs]) -> dict[str, Any]:
    core, svc = call.core, call.core.datasets
    name = call.args["name"]
    async with core.gc_guard():  # a collection keeps the snapshot from here on
        snapshot = await resolve_snapshot(call, call.args["snapshot"])
        data = await asyncio.to_thread(core.snapshots.read_bytes, snapshot)
        summary = await asyncio.to_thread(summarize_validated, data)
        draft = DatasetVersion(name=name, version=0, snapshot=snapshot, files=summary.files,
                               bytes=summary.bytes, pushed_by=call.identity.user,
                               pushed_at=time.time(), description=call.args["description"])
        version, created = await svc.record(draft)
        core.gc.protect_snapshot(snapshot)  # a collection that began meanwhile keeps it
    return {**version.to_wire(), "created": created}


@handles(ops_datasets.DATASETS_LIST)
async def datasets_list(call: Call[NoArgs]) -> dict[str, Any]:
    by_name: dict[str, list[DatasetVersion]] = {}
    for version in await call.core.datasets.registry.all_versions():
        if version.state != REMOVED:
            by_name.setdefault(version.name, []).append(version)
    return {"datasets": [
        {"name": name, "owner": owner_of(versions), "versions": len(versions),
         "latest": max(versions, key=lambda v: v.version).to_wire()}
        for name, versions in sorted(by_name.items())]}


async def _named(call: Call[ops_datasets.DatasetArgs]
                 ) -> tuple[DatasetRef, str | None, list[DatasetVersion]]:
    """The dataset the ``name`` argument names: (its ref, its owner, the versions it selects:
    the one named, or all of them when it names none)."""
    ref = parse_ref(call.args["name"], allow_mount=False)
    versions = await _present(call, ref.name)
    owner = owner_of(versions)
    if ref.version is None:
        return ref, owner, versions
    chosen = [v for v in versions if v.version == ref.version]
    if not chosen:
        raise NotFound(f"dataset {ref.name} has no version {ref.version}; `fetchml dataset "
                       f"info {ref.name}` lists its versions")
    return ref, owner, chosen


@handles(ops_datasets.DATASETS_INFO)
async def datasets_info(call: Call[ops_datasets.DatasetArgs]) -> dict[str, Any]:
    ref, owner, versions = await _named(call)
    cache = call.core.datasets.cache
    cached = [await asyncio.to_thread(cache.is_cached, v.snapshot) for v in versions]
    return {"name": ref.name, "owner": owner,
            "versions": [{**v.to_wire(), "cached": c}
                         for v, c in zip(versions, cached, strict=True)]}


def _refusal(call: Call[Any], versions: Sequence[DatasetVersion], users: Sequence[Any]) -> Conflict:
    """Names the caller's own jobs only: other users' job ids are not theirs to learn."""
    visible = [str(job.id) for job in users if may_see(call, job)]
    what = versions[0].ref if len(versions) == 1 else f"dataset {versions[0].name}"
    named = f" (yours: {', '.join(visible[:JOBS_NAMED])})" if visible else ""
    return Conflict(f"{what} is used by {len(users)} held, queued or running jobs{named}; "
                    "cancel them or wait until they end, then remove it",
                    details={"jobs": visible, "count": len(users)})


@handles(ops_datasets.DATASETS_RM)
async def datasets_rm(call: Call[ops_datasets.DatasetArgs]) -> dict[str, Any]:
    ref, owner, versions = await _named(call)
    user = call.identity.user
    if user != owner and not call.identity.allows("datasets:delete:all"):
        foreign = [v for v in versions if v.pushed_by != user]
        if foreign:
            raise PermissionDenied(
                f"user {user} may not remove {foreign[0].ref}: it belongs to {owner} and was "
                f"pushed by {foreign[0].pushed_by}; ask them or an admin (datasets:delete:all)")
    users = await call.core.datasets.remove(versions)
    if users:
        raise _refusal(call, versions, users)
    return {"name": ref.name, "removed": [v.to_wire() | {"state": REMOVED} for v in versions]}
