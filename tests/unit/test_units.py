from __future__ import annotations

import pytest

from fetchml.units import human_bytes


@pytest.mark.parametrize(("n", "text"), [
    (None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (5 * 1024**2, "5.0 MiB"), (1.5 * 1024**3, "1.5 GiB"), (3 * 1024**4, "3.0 TiB"),
    (2048 * 1024**4, "2048.0 TiB"), (-2048, "-2.0 KiB"),
])
def test_human_bytes(n: int | float | None, text: str) -> None:
    assert human_bytes(n) == text
