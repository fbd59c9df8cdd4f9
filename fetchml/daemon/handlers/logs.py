"""jobs.logs: a job's output from a byte offset, and with follow, as it is written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fetchml.daemon.handlers import Call, handles
from fetchml.daemon.handlers.jobs import visible_job
from fetchml.daemon.store.base import TERMINAL_STATES, Job

# Largest piece of log in one event; well under the frame limit.
LOG_CHUNK = 1 << 20
# How often a follower looks for new output: new lines reach the user within ~this long.
FOLLOW_POLL_S = 0.05


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""


@handles("jobs.logs")
async def jobs_logs(call: Call) -> dict[str, Any]:
    call.require("jobs:read")
    job: Job = await visible_job(call, call.args["job"])
    fixed_attempt = call.args["attempt"]
    attempt = fixed_attempt or job.attempt
    offset, follow = call.args["offset"], call.args["follow"]
    runner = call.core.runner
    with call.core.events.subscribe() as sub:
        while True:
            path = runner.run_dir(job.id, attempt) / "output.log"
            data = _read_from(path, offset) if attempt else b""
            if data:
                await call.emit("log", data)
                offset += len(data)
                continue
            while not sub.queue.empty():
                changed = sub.queue.get_nowait()
                if changed.id == job.id:
                    job = changed
            if not follow:
                break
            if fixed_attempt is None and job.attempt > attempt:
                attempt, offset = job.attempt, 0  # a retry began: follow the new attempt
                await call.emit("attempt", attempt)
                continue
            if job.state in TERMINAL_STATES and (fixed_attempt is not None or
                                                 job.attempt == attempt):
                if not _read_from(path, offset):
                    break
                continue
            await asyncio.sleep(FOLLOW_POLL_S)
    return {"offset": offset, "state": job.state.value, "attempt": attempt}
