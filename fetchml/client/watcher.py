"""File-system events for ``fetchml watch``: one non-recursive watch per kept directory.

watchfiles' recursive mode would put an inotify watch on every directory, a 50,000-file
virtualenv included, so the caller lists the directories it keeps (ignored ones pruned) and
each is watched on its own; when directories come or go the caller lists them again and the
watch is replaced. Events only say *that* something changed: the caller's scan says what.
When inotify cannot be used (the watch limit, no inotify at all) the watcher polls the same
directories instead, after one warning.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from watchfiles._rust_notify import RustNotify

from fetchml.errors import NotFound

logger = logging.getLogger(__name__)

# How often the event queue is checked while idle: the first event of a burst is seen at
# most this late. The wait happens in Rust without the GIL, so idling costs next to nothing.
IDLE_STEP_MS = 10
# Checked more often while a burst settles, so that "quiet for the debounce" ends on time.
SETTLE_STEP_MS = 5
# Longest Rust groups a steady stream of events before handing them over, so that the
# caller can read changed files while a burst is still going on.
GROUP_MS = 100
# Polling interval without inotify: each round stats every entry of every kept directory.
POLL_DELAY_MS = 500
# A new poller's first look at its directories happens in its own thread, later: a change
# made before then is in its baseline and never reported, so the caller scans again after this.
POLL_SETTLE_S = 3 * POLL_DELAY_MS / 1000
# A burst that never goes quiet (something writes all the time) still syncs this often.
MAX_BURST_S = 5.0
# A burst naming this many paths may have overflowed the kernel's event queue
# (fs.inotify.max_queued_events, 16384 by default, several events per file), and watchfiles
# drops the overflow notice: such a burst is treated as lossy, so a full scan settles it.
OVERFLOW_RISK_PATHS = 2000
# Registration retries when directories vanish between listing and watching them.
REGISTER_ATTEMPTS = 5


@dataclass
class Batch:
    """Paths reported changed, with the latest moment the last of them can have happened."""

    paths: set[str] = field(default_factory=set)
    last_event_at: float = 0.0  # time.monotonic()
    lost: bool = False  # events may have been missed: only a full scan is safe


class ChangeWatcher:
    """Watches a list of directories (each non-recursively) and reports changed paths.

    ``watch_limit`` caps the inotify watches it will ask for; beyond it, registration fails
    exactly as it does when the kernel's ``fs.inotify.max_user_watches`` is reached.
    """

    def __init__(self, *, force_polling: bool = False, watch_limit: int | None = None) -> None:
        self.polling = force_polling
        self.watch_limit = watch_limit
        self.settled_at: float | None = None  # while polling: when to scan once more
        self._notify: RustNotify | None = None
        self._requested: tuple[str, ...] = ()
        self._watched: tuple[str, ...] = ()

    @property
    def watched(self) -> tuple[str, ...]:
        return self._watched

    def watch(self, dirs: Sequence[str]) -> bool:
        """Watch exactly ``dirs``; True when that replaced a different set.

        Events around the switch may be lost: scan afterwards. A poller takes its first look
        a moment later still, so while polling, scan again once ``settled_at`` has passed.
        """
        requested = tuple(dirs)
        if self._notify is not None and requested == self._requested:
            return False
        wanted = requested
        for _ in range(REGISTER_ATTEMPTS):
            try:
                notify = self._open(wanted)
                break
            except (FileNotFoundError, PermissionError):
                # Removed (or locked) since it was listed: the scan reports what matters.
                wanted = tuple(d for d in wanted if os.access(d, os.R_OK | os.X_OK))
        else:
            raise NotFound("the directories to watch keep disappearing; run fetchml watch "
                           "again once the project holds still")
        # The new watch is in place before the old one goes, so nothing falls in between.
        old, self._notify = self._notify, notify
        self._requested, self._watched = requested, wanted
        if old is not None:
            old.close()
        if self.polling:
            self.settled_at = time.monotonic() + POLL_SETTLE_S
        return True

    def _open(self, dirs: tuple[str, ...]) -> RustNotify:
        if not self.polling:
            try:
                if self.watch_limit is not None and len(dirs) > self.watch_limit:
                    raise OSError(errno.ENOSPC, "OS file watch limit reached")
                # ignore_permission_denied=False: with it, every registration error (the
                # watch limit too) would be dropped silently.
                return RustNotify(list(dirs), False, False, POLL_DELAY_MS, False, False)
            except (FileNotFoundError, PermissionError):
                raise
            except (OSError, RuntimeError) as exc:
                self.polling = True
                logger.warning(
                    "cannot watch %d directories with inotify (%s); polling them every %.1f s "
                    "instead, which costs more CPU: raise fs.inotify.max_user_watches or add "
                    "big directories to .fetchmlignore", len(dirs), exc, POLL_DELAY_MS / 1000)
        return RustNotify(list(dirs), False, True, POLL_DELAY_MS, False, False)

    def wait(self, timeout: float, *, step_ms: int = IDLE_STEP_MS) -> Batch | None:
        """The next batch of changes, or None if none came within ``timeout`` seconds."""
        if self._notify is None:
            raise RuntimeError("watch() must be called before wait()")
        try:
            raw = self._notify.watch(GROUP_MS, step_ms, max(1, int(timeout * 1000)), None)
        except RuntimeError as exc:
            # The kernel's event queue overflowed or the watch broke: start it afresh.
            logger.info("file watch interrupted (%s); watching again", exc)
            dirs, self._requested = self._requested, ()
            self.watch(dirs)
            return Batch(last_event_at=time.monotonic(), lost=True)
        if raw == "signal":
            raise KeyboardInterrupt
        if isinstance(raw, str):
            return None
        # Rust returns once the set of changes held still for one step: the last event
        # came at least one step ago.
        return Batch({path for _, path in raw}, time.monotonic() - step_ms / 1000)

    def collect(self, first: Batch, quiet: float,
                on_batch: Callable[[Batch], None]) -> Batch:
        """Gather a burst: ``first`` and whatever follows until ``quiet`` seconds pass without
        an event (or MAX_BURST_S in all). ``on_batch`` sees each batch as it arrives."""
        burst = Batch(set(first.paths), first.last_event_at,
                      first.lost or _overflow_risk(first))
        first.lost = burst.lost
        on_batch(first)
        give_up_at = time.monotonic() + MAX_BURST_S
        while True:
            now = time.monotonic()
            if now >= give_up_at:
                return burst
            # At least one look: events may have come while on_batch was busy.
            remaining = max(min(burst.last_event_at + quiet, give_up_at) - now, 0.001)
            more = self.wait(remaining, step_ms=SETTLE_STEP_MS)
            if more is None:
                return burst
            burst.paths |= more.paths
            burst.last_event_at = more.last_event_at
            burst.lost = more.lost = burst.lost or more.lost or _overflow_risk(burst)
            on_batch(more)

    def close(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        self._requested = self._watched = ()


def _overflow_risk(batch: Batch) -> bool:
    return len(batch.paths) > OVERFLOW_RISK_PATHS
