"""Token buckets for session opens and submissions, and slow-down/ban of failed logins."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Forget buckets idle this long, so the table cannot grow without bound.
IDLE_FORGET_S = 3600.0


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """``per_minute`` events per key, with bursts up to the same number."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one token; returns 0 when allowed, else the seconds until one is free."""
        now = time.monotonic() if now is None else now
        if len(self._buckets) > 10_000:
            self._buckets = {k: b for k, b in self._buckets.items()
                             if now - b.stamp < IDLE_FORGET_S}
        bucket = self._buckets.setdefault(key, _Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate if self.rate > 0 else float("inf")


@dataclass
class _Failures:
    times: list[tuple[float, str]] = field(default_factory=list)  # (when, which credential)
    banned_until: float = 0.0


class FailedLogins:
    """Failed authentications per source: each one slows the next answer; past ``threshold``
    within ``window_s`` the source is banned for ``ban_s``. A success forgets only the failures
    of the same credential, so a valid key cannot wipe the count of keys being guessed."""

    def __init__(self, threshold: int, window_s: float, ban_s: float) -> None:
        self.threshold, self.window_s, self.ban_s = threshold, window_s, ban_s
        self._by_source: dict[str, _Failures] = {}

    def banned_for(self, source: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        entry = self._by_source.get(source)
        return max(0.0, entry.banned_until - now) if entry else 0.0

    def failed(self, source: str, credential: str = "",
               now: float | None = None) -> tuple[float, bool]:
        """Record a failure; returns (seconds to delay the answer, whether a ban began)."""
        now = time.monotonic() if now is None else now
        entry = self._by_source.setdefault(source, _Failures())
        entry.times = [(t, c) for t, c in entry.times if now - t < self.window_s]
        entry.times.append((now, credential))
        if len(entry.times) >= self.threshold and entry.banned_until <= now:
            entry.banned_until = now + self.ban_s
            entry.times.clear()
            return 1.0, True
        return min(2.0, 0.1 * 2 ** (len(entry.times) - 1)), False

    def succeeded(self, source: str, credential: str = "") -> None:
        entry = self._by_source.get(source)
        if entry is None or entry.banned_until > time.monotonic():
            return
        entry.times = [(t, c) for t, c in entry.times if c != credential]
        if not entry.times:
            self._by_source.pop(source, None)
