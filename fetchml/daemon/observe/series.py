"""A job's metric series: parsing the lines a job writes, bounded series, the kept copy.

A job appends JSON lines such as ``{"step": 100, "loss": 0.31, "acc": 0.9}`` to its metrics
file. Every numeric key but ``step`` feeds a series of (step, value) points; a line without
``step`` takes its record number. Lines that are not JSON objects, carry a non-numeric step, or
run past MAX_LINE_BYTES are counted as malformed and skipped; keys that are not numbers are
ignored.

A series keeps at most ``capacity`` points: when full, every other point goes and from then on
only every 2nd (4th, ...) new point is kept, so what is kept stays evenly spread over the run;
the latest point is always kept besides. A job has at most MAX_SERIES series. The kept copy
(``metrics.msgpack``) holds the same bounded points.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import stat
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger(__name__)

STEP_KEY = "step"
MAX_SERIES = 100  # series per job: per-layer norms fit, a key per step does not
MAX_NAME = 128  # characters in a series name
MAX_LINE_BYTES = 64 * 1024  # a metrics line longer than this is malformed
READ_CHUNK = 256 * 1024  # bytes parsed per step: bounds the memory a burst of lines takes
MIN_POINTS = 2  # a series needs a first and a last point
FILE_FORMAT = 1

Point = tuple[float, float]


def evenly(count: int, wanted: int) -> list[int]:
    """Indices of ``wanted`` of ``count`` items, evenly spread, first and last included."""
    if count <= wanted:
        return list(range(count))
    if wanted <= 1:
        return [count - 1] if wanted == 1 else []
    return [round(i * (count - 1) / (wanted - 1)) for i in range(wanted)]


def wire_point(step: float, value: float) -> list[float | int]:
    """A point as the protocol carries it: whole steps as integers."""
    whole = step.is_integer() and abs(step) < 2**53
    return [int(step) if whole else step, value]


@dataclass
class Series:
    """One metric's points, at most ``capacity`` of them, evenly spread plus the latest."""

    capacity: int
    steps: array[float] = field(default_factory=lambda: array("d"))
    values: array[float] = field(default_factory=lambda: array("d"))
    stride: int = 1  # every stride-th point offered is kept
    offered: int = 0  # points the job wrote
    last: Point | None = None
    last_kept: bool = False

    def add(self, step: float, value: float) -> None:
        self.last = (step, value)
        self.last_kept = self.offered % self.stride == 0
        if self.last_kept:
            self.steps.append(step)
            self.values.append(value)
            if len(self.steps) >= self.capacity:  # thin to every other point, keep spacing
                del self.steps[1::2]
                del self.values[1::2]
                self.stride *= 2
                self.last_kept = self.offered % self.stride == 0
        self.offered += 1

    def points(self) -> tuple[array[float], array[float]]:
        """Every kept point, the latest included (at most ``capacity``)."""
        steps, values = array("d", self.steps), array("d", self.values)
        if self.last is not None and not self.last_kept:
            steps.append(self.last[0])
            values.append(self.last[1])
        return steps, values


def series_to_wire(steps: array[float], values: array[float], wanted: int) -> list[list[Any]]:
    return [wire_point(steps[i], values[i]) for i in evenly(len(steps), wanted)]


@dataclass
class AttemptMetrics:
    """The series of one attempt of one job, and what was skipped while reading them."""

    job_id: int
    attempt: int
    capacity: int
    series: dict[str, Series] = field(default_factory=dict)
    records: int = 0  # valid lines
    malformed: int = 0
    dropped: int = 0  # values of series past MAX_SERIES or with over-long names

    def add(self, step: float | None, values: Mapping[str, float],
            into: dict[str, list[Point]] | None = None) -> None:
        """Record one line; its points are also appended to ``into`` (by series)."""
        at = float(self.records) if step is None else step
        self.records += 1
        for name, value in values.items():
            series = self.series.get(name)
            if series is None:
                if len(self.series) >= MAX_SERIES or len(name) > MAX_NAME:
                    self.dropped += 1
                    continue
                series = self.series[name] = Series(self.capacity)
            series.add(at, value)
            if into is not None:
                into.setdefault(name, []).append((at, value))

    def points(self) -> dict[str, tuple[array[float], array[float]]]:
        return {name: series.points() for name, series in self.series.items()}

    def counts(self) -> dict[str, int]:
        return {name: series.offered for name, series in self.series.items()}


@dataclass
class StoredMetrics:
    """What a client is sent about one attempt: its points and its counters."""

    attempt: int
    points: dict[str, tuple[array[float], array[float]]]
    counts: dict[str, int]
    records: int
    malformed: int
    dropped: int

    @classmethod
    def of(cls, metrics: AttemptMetrics) -> StoredMetrics:
        return cls(metrics.attempt, metrics.points(), metrics.counts(), metrics.records,
                   metrics.malformed, metrics.dropped)

    @classmethod
    def empty(cls, attempt: int) -> StoredMetrics:
        return cls(attempt, {}, {}, 0, 0, 0)

    def to_wire(self, wanted: int, names: set[str] | None = None) -> dict[str, Any]:
        chosen = {n: p for n, p in self.points.items() if names is None or n in names}
        return {"attempt": self.attempt, "records": self.records, "malformed": self.malformed,
                "dropped": self.dropped,
                "counts": {n: self.counts.get(n, 0) for n in chosen},
                "series": {n: series_to_wire(*p, wanted) for n, p in chosen.items()}}


# -- reading what the job writes --------------------------------------------------------------
_DECODER = json.JSONDecoder()  # on str: skips the encoding sniffing of json.loads(bytes)


def parse_line(line: bytes) -> tuple[float | None, dict[str, float]] | None:
    """(step, values) of one metrics line, or None when it is malformed."""
    try:
        record = _DECODER.decode(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get(STEP_KEY)
    if step is not None and (type(step) not in (int, float) or not math.isfinite(step)):
        return None
    values: dict[str, float] = {}
    for name, value in record.items():
        if name != STEP_KEY and type(value) in (int, float):
            try:
                values[name] = float(value)
            except OverflowError:  # an integer beyond any float
                continue
    return (None if step is None else float(step)), values


@dataclass
class TailState:
    """Where reading a metrics file stands."""

    offset: int = 0
    partial: bytes = b""  # the start of a line whose newline has not been written yet
    skipping: bool = False  # inside an over-long line: drop bytes up to its newline


@dataclass
class ReadBatch:
    records: list[tuple[float | None, dict[str, float]]]
    malformed: int
    more: bool  # the file has more to read right now
    restarted: bool  # the file shrank (rewritten by the job): start over


def _open_regular(path: Path) -> int | None:
    """A read fd for ``path`` if it is a regular file (never through a symlink), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: the job made it a symlink; not followed
        log.warning("metrics file %s not read: %s", path, exc.strerror or exc)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        log.warning("metrics file %s is not a regular file; not read", path)
        return None
    return fd


def read_new_lines(path: Path, state: TailState, *, final: bool) -> ReadBatch:
    """Parse what was appended since ``state`` (at most READ_CHUNK bytes); blocking.

    With ``final`` (the attempt ended), a last line without its newline counts too.
    """
    fd = _open_regular(path)
    if fd is None:
        return ReadBatch([], 0, more=False, restarted=False)
    try:
        size = os.fstat(fd).st_size
        restarted = size < state.offset
        if restarted:
            state.offset, state.partial, state.skipping = 0, b"", False
        chunk = os.pread(fd, READ_CHUNK, state.offset)
    finally:
        os.close(fd)
    state.offset += len(chunk)
    more = len(chunk) == READ_CHUNK
    lines = (state.partial + chunk).split(b"\n")
    state.partial = lines.pop()
    malformed = 0
    if state.skipping:
        if lines:
            lines.pop(0)  # the end of the over-long line
            state.skipping = False
        else:  # still inside it
            state.partial = b""
            state.skipping = not (final and not more)
    if len(state.partial) > MAX_LINE_BYTES:
        malformed += 1
        state.partial, state.skipping = b"", True
    if final and not more and state.partial:
        lines.append(state.partial)
        state.partial = b""
    records = []
    for line in lines:
        if not line.strip():
            continue
        parsed = parse_line(line) if len(line) <= MAX_LINE_BYTES else None
        if parsed is None:
            malformed += 1
        else:
            records.append(parsed)
    return ReadBatch(records, malformed, more, restarted)


# -- the bounded copy in the run directory ----------------------------------------------------
def _little_endian(values: array[float]) -> bytes:
    if sys.byteorder == "big":
        values = array("d", values)
        values.byteswap()
    return values.tobytes()


def _from_little_endian(data: bytes) -> array[float]:
    values = array("d")
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def write_series_file(path: Path, metrics: AttemptMetrics) -> None:
    """Write the attempt's series beside its metrics file, atomically; blocking."""
    document = {
        "format": FILE_FORMAT, "job": metrics.job_id, "attempt": metrics.attempt,
        "records": metrics.records, "malformed": metrics.malformed,
        "dropped": metrics.dropped,
        "series": {name: {"steps": _little_endian(steps), "values": _little_endian(values),
                          "count": metrics.series[name].offered}
                   for name, (steps, values) in metrics.points().items()},
    }
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)  # the daemon's: other users' jobs may pass through the run directory
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(msgpack.packb(document, use_bin_type=True))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def series_file_limit(capacity: int) -> int:
    """The largest series file a daemon with this capacity writes (with room for names)."""
    return MAX_SERIES * (capacity * 16 + MAX_NAME * 4 + 64) + 4096


def read_series_file(path: Path, capacity: int) -> StoredMetrics | None:
    """The stored series, or None when the file is missing or not one this daemon wrote."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(series_file_limit(capacity) + 1)
        if len(data) > series_file_limit(capacity):
            raise ValueError("too large")
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        points, counts = {}, {}
        for name, entry in doc["series"].items():
            steps, values = (_from_little_endian(entry["steps"]),
                             _from_little_endian(entry["values"]))
            if len(steps) != len(values):
                raise ValueError("steps and values differ in length")
            points[str(name)], counts[str(name)] = (steps, values), int(entry["count"])
        return StoredMetrics(int(doc["attempt"]), points, counts, int(doc["records"]),
                             int(doc["malformed"]), int(doc["dropped"]))
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
        log.warning("series file %s unreadable (%s); reading the metrics file again", path, exc)
        return None


def metrics_of_file(path: Path, job_id: int, attempt: int, capacity: int) -> AttemptMetrics:
    """Every line of a finished attempt's metrics file, in bounded memory; blocking."""
    metrics, state = AttemptMetrics(job_id, attempt, capacity), TailState()
    while True:
        batch = read_new_lines(path, state, final=True)
        metrics.malformed += batch.malformed
        for step, values in batch.records:
            metrics.add(step, values)
        if not batch.more:
            return metrics
