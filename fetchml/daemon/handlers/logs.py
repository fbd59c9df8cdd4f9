"""jobs.logs: a job's output from a byte offset, and with follow, as it is written."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fetchml.daemon.handlers import Call, handles
from fetchml.daemon.handlers.jobs import visible_job
from fetchml.daemon.runner import logs_path
from fetchml.daemon.store.base import TERMINAL_STATES, Job, JobState
from fetchml.errors import NotFound

# Largest piece of log in one event; well under the frame limit.
LOG_CHUNK = 1 << 20
# How often a follower looks for new output: new lines reach the user within ~this long.
FOLLOW_POLL_S = 0.05
# A follower also re-reads its job from the store this often, should an event be missed.
REFRESH_S = 1.0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""


def _attempt_over(job: Job, attempt: int, *, fixed: bool) -> bool:
    """Whether no more output can come: the job ended (or, for a fixed attempt, moved on)."""
    if job.state in TERMINAL_STATES and job.attempt == attempt:
        return True
    return fixed and (job.attempt > attempt or job.state is not JobState.RUNNING)


@handles("jobs.logs")
async def jobs_logs(call: Call) -> dict[str, Any]:
    call.require("jobs:read")
    job: Job = await visible_job(call, call.args["job"])
    fixed_attempt: int | None = call.args["attempt"]
    if fixed_attempt is not None and not 1 <= fixed_attempt <= max(job.attempt, 1):
        raise NotFound(f"job {job.id} has no attempt {fixed_attempt}; it is at attempt "
                       f"{job.attempt}")
    attempt = fixed_attempt or job.attempt
    offset, follow = call.args["offset"], call.args["follow"]
    runner = call.core.runner
    refresh_at = time.monotonic() + REFRESH_S
    with call.core.events.subscribe() as sub:
        while True:
            path = logs_path(runner.run_dir(job.id, attempt))
            data = _read_from(path, offset) if attempt else b""
            if data:
                await call.emit("log", data)
                offset += len(data)
                continue
            if not follow:
                break
            for changed in sub.drain():
                if changed.id == job.id:
                    job = changed
            if sub.overflowed or time.monotonic() >= refresh_at:
                job = await call.core.jobs.get(job.id) or job
                refresh_at = time.monotonic() + REFRESH_S
            if fixed_attempt is None and job.attempt > attempt:
                if attempt:  # a retry began: say so, then follow the new attempt
                    await call.emit("attempt", job.attempt)
                attempt, offset = job.attempt, 0
                continue
            if _attempt_over(job, attempt, fixed=fixed_attempt is not None):
                if not _read_from(path, offset):  # the last words, written before it ended
                    break
                continue
            await asyncio.sleep(FOLLOW_POLL_S)
    return {"offset": offset, "state": job.state.value, "attempt": attempt}
