"""Per-owner state: pins, user names that cannot pass for local identities, failed logins
counted per credential."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fetchml.daemon.jobs.retention import Pins
from fetchml.daemon.security.ratelimit import FailedLogins
from fetchml.daemon.security.users import MAX_UID, UserRegistry
from fetchml.errors import BadRequest, Conflict, NotFound

SNAP = "ab" * 32


def test_each_user_lists_and_removes_only_their_own_pins(tmp_path: Path) -> None:
    pins = Pins(tmp_path)
    pins.pin(SNAP, "alice")
    pins.pin(SNAP, "bob")
    assert pins.listing("bob") == [{"snapshot": SNAP, "by": "bob"}]
    assert pins.unpin(SNAP, "bob") == ["bob"]
    with pytest.raises(NotFound, match="not pinned by you"):
        pins.unpin(SNAP, "bob")
    assert pins.ids == {SNAP}  # alice's pin still keeps it from collection
    reopened = Pins(tmp_path)
    assert reopened.listing(None) == [{"snapshot": SNAP, "by": "alice"}]
    assert reopened.unpin(SNAP, None) == ["alice"] and reopened.ids == set()


def test_a_pins_file_of_the_older_format_is_read(tmp_path: Path) -> None:
    (tmp_path / "pins.json").write_text(json.dumps({SNAP: "carol"}))
    assert Pins(tmp_path).listing("carol") == [{"snapshot": SNAP, "by": "carol"}]


def _registry(tmp_path: Path) -> UserRegistry:
    return UserRegistry(tmp_path, [], {"admin", "researcher"}, reserved={"root", "fetchml"})


@pytest.mark.parametrize("name", ["root", "fetchml"])
def test_a_key_user_cannot_take_a_local_identitys_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadRequest, match="local identity"):
        _registry(tmp_path).add(name, "researcher")


@pytest.mark.parametrize("uid", [-1, MAX_UID + 1, 2**63])
def test_a_uid_must_be_a_valid_uid(tmp_path: Path, uid: int) -> None:
    with pytest.raises(BadRequest, match="must be a whole number"):
        _registry(tmp_path).add("ada", "researcher", uid)


def test_a_uid_maps_to_one_user_only(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    registry.add("ada", "researcher", 1001)
    with pytest.raises(Conflict, match="uid 1001 already maps to user ada"):
        registry.add("bea", "researcher", 1001)


def test_a_success_with_one_key_keeps_the_failures_of_others() -> None:
    failures = FailedLogins(threshold=3, window_s=600, ban_s=900)
    failures.failed("ip 10.0.0.9", "key guess-1", now=1.0)
    failures.failed("ip 10.0.0.9", "key guess-2", now=2.0)
    failures.succeeded("ip 10.0.0.9", "key valid")
    _, banned = failures.failed("ip 10.0.0.9", "key guess-3", now=3.0)
    assert banned and failures.banned_for("ip 10.0.0.9", now=4.0) > 0


def test_a_success_forgets_the_failures_of_its_own_credential() -> None:
    failures = FailedLogins(threshold=3, window_s=600, ban_s=900)
    failures.failed("uid 1000", "uid 1000", now=1.0)
    failures.failed("uid 1000", "uid 1000", now=2.0)
    failures.succeeded("uid 1000", "uid 1000")
    _, banned = failures.failed("uid 1000", "uid 1000", now=3.0)
    assert not banned
