"""A metric series drawn as a line in braille dots (2x4 per character), and the series the
dashboard keeps for the watched job (bounded: thinned evenly, the latest point kept)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

BRAILLE_BASE = 0x2800
# The bit of each dot of a braille cell, by (column, row) inside the 2x4 cell.
DOT_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
MAX_POINTS = 4000  # points kept per series: more than a wide terminal has dots across

Point = tuple[float, float]


def thin(points: list[Point], wanted: int) -> list[Point]:
    """At most ``wanted`` points, evenly spread, the first and the last included."""
    count = len(points)
    if count <= wanted:
        return points
    return [points[round(i * (count - 1) / (wanted - 1))] for i in range(wanted)]


def value_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:  # a flat line sits in the middle
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def _line(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """The dots from (x0, y0) to (x1, y1) (Bresenham)."""
    dots = []
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        dots.append((x0, y0))
        if x0 == x1 and y0 == y1:
            return dots
        twice = 2 * err
        if twice >= dy:
            err += dy
            x0 += sx
        if twice <= dx:
            err += dx
            y0 += sy


def braille_lines(points: Sequence[Point], width: int, height: int,
                  y_range: tuple[float, float] | None = None) -> list[str]:
    """``height`` strings of ``width`` braille characters drawing the points joined by lines
    (x: step, y: value, up is larger); non-finite values are left out."""
    if width <= 0 or height <= 0:
        return []
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    cells = [[0] * width for _ in range(height)]
    if finite:
        xs, ys = [x for x, _ in finite], [y for _, y in finite]
        x_low, x_high = min(xs), max(xs)
        y_low, y_high = y_range or value_range(ys)
        dots_x, dots_y = width * 2 - 1, height * 4 - 1

        def to_dot(x: float, y: float) -> tuple[int, int]:
            fx = 0.5 if x_high == x_low else (x - x_low) / (x_high - x_low)
            fy = (y - y_low) / (y_high - y_low)
            return round(fx * dots_x), round((1 - min(1.0, max(0.0, fy))) * dots_y)

        previous: tuple[int, int] | None = None
        for x, y in finite:
            dot = to_dot(x, y)
            for px, py in (_line(*previous, *dot) if previous else [dot]):
                cells[py // 4][px // 2] |= DOT_BITS[px % 2][py % 4]
            previous = dot
    return ["".join(chr(BRAILLE_BASE + bits) for bits in row) for row in cells]


def format_number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


@dataclass
class WatchedMetrics:
    """The series of the watched job, as ``jobs.metrics`` events bring them."""

    job_id: int | None = None
    series: dict[str, list[Point]] = field(default_factory=dict)
    malformed: int = 0
    selected: str | None = None  # the series plotted

    def clear(self, job_id: int | None) -> None:
        self.job_id, self.series, self.malformed = job_id, {}, 0

    def apply(self, event: dict[str, Any]) -> None:
        """Take in one jobs.metrics event (a reset replaces what was kept)."""
        if event.get("reset"):
            self.series = {}
        for name, points in event.get("series", {}).items():
            kept = self.series.setdefault(name, [])
            kept.extend((float(step), float(value)) for step, value in points)
            if len(kept) > MAX_POINTS:
                self.series[name] = thin(kept, MAX_POINTS // 2)
        self.malformed = int(event.get("malformed", self.malformed))
        if self.selected not in self.series:  # the first series the job wrote
            self.selected = next(iter(self.series), None)

    def names(self) -> list[str]:
        """In the order the job first wrote them."""
        return list(self.series)

    def cycle(self) -> str | None:
        """Plot the next series."""
        names = self.names()
        if names:
            at = names.index(self.selected) if self.selected in names else -1
            self.selected = names[(at + 1) % len(names)]
        return self.selected

    def points(self, name: str | None = None) -> list[Point]:
        return self.series.get(name or self.selected or "", [])
