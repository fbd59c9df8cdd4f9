"""outputs.store: store the outputs a job left in its run directory when they could not be."""

from __future__ import annotations

from typing import Any

from fetchml.daemon.handlers import Call, handles
from fetchml.daemon.handlers.jobs import job_for, visible_job
from fetchml.protocol import ops


@handles(ops.OUTPUTS_STORE)
async def outputs_store(call: Call[ops.JobArgs]) -> dict[str, Any]:
    job = await visible_job(call, call.args["job"])
    if job.owner != call.identity.user:
        call.require("admin:prune")
    already = job.outputs is not None
    updated = await call.core.runner.outputs.store_now(job)
    return {"job": job_for(call, updated), "stored": not already}
