"""admin.prune and snapshot pins: reclaiming space without losing what is still in use."""

from __future__ import annotations

import asyncio
from typing import Any

from fetchml.daemon.handlers import Call, handles, resolve_snapshot
from fetchml.daemon.jobs.model import TERMINAL_STATES, JobState
from fetchml.daemon.jobs.retention import PruneReport, prune_jobs
from fetchml.errors import BadRequest
from fetchml.protocol import ops
from fetchml.protocol.schema import NoArgs


def _states(names: list[str] | None) -> set[JobState] | None:
    if not names:
        return None
    try:
        states = {JobState(name) for name in names}
    except ValueError:
        raise BadRequest(f"states must be among {', '.join(sorted(TERMINAL_STATES))}") from None
    if not states <= TERMINAL_STATES:
        raise BadRequest("only finished jobs (succeeded, failed, cancelled, lost) can be pruned")
    return states


@handles(ops.ADMIN_PRUNE)
async def admin_prune(call: Call[ops.AdminPruneArgs]) -> dict[str, Any]:
    args, core = call.args, call.core
    owner = args["user"] or call.identity.user
    if args["all_users"] or owner != call.identity.user:
        call.require("jobs:prune:all")
    grace = core.settings.gc_grace
    if args["gc_grace"] is not None:
        call.require("admin:prune")
        grace = args["gc_grace"]
    jobs, runs, run_bytes = await prune_jobs(
        core.jobs, core.runner.runs_dir, owner=None if args["all_users"] else owner,
        states=_states(args["states"]), older_than=args["older_than"], keep=args["keep"],
        dry_run=args["dry_run"])
    objects = object_bytes = manifests = 0
    if args["collect"]:
        objects, object_bytes, manifests = await core.gc.collect(
            grace, dry_run=args["dry_run"], ignore_jobs=set(jobs) if args["dry_run"] else ())
    if not args["dry_run"]:
        core.runner.retry_outputs_soon()  # outputs a full disk kept back may fit now
    return PruneReport(len(jobs), runs, objects, run_bytes + object_bytes, manifests,
                       args["dry_run"]).to_dict()


@handles(ops.SNAPSHOT_PIN)
async def snapshot_pin(call: Call[ops.SnapshotArgs]) -> dict[str, Any]:
    snapshot = await resolve_snapshot(call, call.args["snapshot"])
    await asyncio.to_thread(call.core.pins.pin, snapshot, call.identity.user)
    return {"snapshot": snapshot}


@handles(ops.SNAPSHOT_UNPIN)
async def snapshot_unpin(call: Call[ops.SnapshotArgs]) -> dict[str, Any]:
    snapshot = await resolve_snapshot(call, call.args["snapshot"])
    # an admin (who may prune everyone's jobs) removes every pin; anyone else only their own
    owner = None if call.identity.allows("admin:prune") else call.identity.user
    removed = await asyncio.to_thread(call.core.pins.unpin, snapshot, owner)
    return {"snapshot": snapshot, "by": removed}


@handles(ops.SNAPSHOT_PINS)
async def snapshot_pins(call: Call[NoArgs]) -> dict[str, Any]:
    owner = None if call.identity.allows("admin:prune") else call.identity.user
    return {"pins": call.core.pins.listing(owner)}
