"""Request and job ids carried into every log line of the work done for them."""

from __future__ import annotations

import contextvars
import logging

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)
job_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("job", default=None)


class ContextFilter(logging.Filter):
    """Adds ``request`` and ``job`` attributes to records (None when not set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request = request_id.get()
        record.job = job_id.get()
        return True
