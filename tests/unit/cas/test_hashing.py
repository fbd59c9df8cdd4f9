from __future__ import annotations

import os
from pathlib import Path

import pytest
from blake3 import blake3

from fetchml.cas.hashing import OID_HEX_LEN, Hasher, hash_bytes, hash_file, is_oid
from fetchml.errors import NotFound


def test_is_oid_accepts_only_64_lowercase_hex() -> None:
    good = "0123456789abcdef" * 4
    assert OID_HEX_LEN == 64
    assert is_oid(good)
    assert not is_oid(good.upper())
    assert not is_oid(good[:-1])
    assert not is_oid(good + "0")
    assert not is_oid(good[:-1] + "g")
    assert not is_oid("")
    assert not is_oid(b"0" * 64)  # type: ignore[arg-type]


def test_hash_bytes_is_blake3_hex() -> None:
    assert hash_bytes(b"") == blake3(b"").hexdigest()
    assert hash_bytes(b"fetchml") == blake3(b"fetchml").hexdigest()
    big = os.urandom(3 << 20)  # takes the multi-threaded path
    assert hash_bytes(big) == blake3(big).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 65536, (1 << 20) - 1, 1 << 20, (9 << 20) + 7])
def test_hash_file_matches_hash_bytes_at_every_size(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert hash_file(path) == (hash_bytes(data), size)
    assert hash_file(str(path)) == (hash_bytes(data), size)


def test_hash_file_of_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        hash_file(tmp_path / "missing")


def test_hasher_counts_bytes_and_matches_one_shot() -> None:
    for multithreaded in (False, True):
        hasher = Hasher(multithreaded=multithreaded)
        hasher.update(b"abc")
        hasher.update(bytearray(b"def"))
        hasher.update(memoryview(b"ghi"))
        assert hasher.size == 9
        assert hasher.hexdigest() == hash_bytes(b"abcdefghi")
