"""Hardening against a real daemon: per-owner pins and user names."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetchml.errors import BadRequest, NotFound
from tests.conftest import make_daemon
from tests.integration.test_security import stored_snapshot


def test_pins_are_listed_and_removed_per_owner(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            keys = {name: admin.call("admin.users.add", {"name": name, "role": "researcher"}
                                     )["key"] for name in ("alice", "bob")}
            snapshot = stored_snapshot(admin)
        with daemon.connect(api_key=keys["alice"]) as alice, \
                daemon.connect(api_key=keys["bob"]) as bob:
            alice.call("snapshot.pin", {"snapshot": snapshot})
            assert bob.call("snapshot.pins")["pins"] == []
            with pytest.raises(NotFound, match="not pinned by you"):
                bob.call("snapshot.unpin", {"snapshot": snapshot})
            assert alice.call("snapshot.pins")["pins"] == [{"snapshot": snapshot,
                                                             "by": "alice"}]
            bob.call("snapshot.pin", {"snapshot": snapshot})
            assert bob.call("snapshot.unpin", {"snapshot": snapshot})["by"] == ["bob"]
        with daemon.connect() as admin:  # an admin sees and removes everyone's
            assert [p["by"] for p in admin.call("snapshot.pins")["pins"]] == ["alice"]
            assert admin.call("snapshot.unpin", {"snapshot": snapshot})["by"] == ["alice"]
    finally:
        daemon.stop()


def test_user_add_refuses_local_identity_names_and_bad_uids(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp).start()
    try:
        with daemon.connect() as admin:
            with pytest.raises(BadRequest, match="local identity"):
                admin.call("admin.users.add", {"name": "root", "role": "admin"})
            with pytest.raises(BadRequest, match="must be a whole number"):
                admin.call("admin.users.add", {"name": "ada", "role": "researcher",
                                               "uid": -5})
        done = daemon.cli("user", "add", "root", "--role", "researcher")
        assert done.returncode == 1 and "local identity" in done.stderr, done.stderr
    finally:
        daemon.stop()
