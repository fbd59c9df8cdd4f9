"""Users and their API keys: the config's users plus those added at run time.

A key is shown once, when it is made, and stored only as HMAC-SHA256 under a daemon secret
(``<state>/secret``, 0600, created at first start), so a copy of the state dir does not reveal
any key. Run-time users live in ``<state>/users.json`` (0600), written atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fetchml.errors import BadRequest, Conflict, InternalError, NotFound

log = logging.getLogger(__name__)

SECRET_NAME = "secret"  # noqa: S105 (a file name, not a secret)
USERS_NAME = "users.json"
KEY_PREFIX = "fml_"
_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


@dataclass(frozen=True)
class UserRecord:
    name: str
    role: str
    key_hash: str | None = None  # hex HMAC-SHA256 of the key; None: no key (uid-only user)
    uid: int | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    from_config: bool = False

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict[str, Any]:
        """What `user list` shows: never the hash."""
        return {"name": self.name, "role": self.role, "uid": self.uid,
                "has_key": self.key_hash is not None, "created_at": self.created_at,
                "revoked_at": self.revoked_at, "source": "config" if self.from_config
                else "state"}


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_secret(state_dir: Path) -> bytes:
    """The daemon's HMAC secret, created (0600) on first use."""
    path = state_dir / SECRET_NAME
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        secret = secrets.token_bytes(32)
        _write_private(path, secret)
        log.info("created the daemon secret %s", path)
        return secret
    if len(secret) < 32:
        raise InternalError(f"{path} is damaged (too short); restore it from a backup, or "
                            "delete it and issue new API keys")
    return secret


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadRequest(f"user name {name[:40]!r} must be 1-32 lowercase letters, digits, "
                         "'_', '.' or '-', starting with a letter or '_'")
    return name


MAX_UID = 2**32 - 2  # uid_t is 32 bits and (uid_t)-1 means "no uid"


def check_uid(uid: object, name: str) -> int:
    if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid <= MAX_UID:
        raise BadRequest(f"uid of user {name} must be a whole number from 0 to {MAX_UID}")
    return uid


class UserRegistry:
    """Thread-safe registry; reads are from memory, every change is written before it returns."""

    def __init__(self, state_dir: Path, config_users: list[dict[str, Any]], roles: set[str],
                 reserved: Collection[str] = ()) -> None:
        self.path = state_dir / USERS_NAME
        self.reserved = frozenset(reserved)  # local identities' names (root, the daemon's)
        self.secret = load_secret(state_dir)
        self.roles = roles
        self._lock = threading.Lock()
        self._users: dict[str, UserRecord] = {}
        for entry in config_users:
            record = UserRecord(name=check_name(str(entry["name"])), role=str(entry["role"]),
                                key_hash=entry.get("key_hash"), uid=entry.get("uid"),
                                from_config=True)
            self._users[record.name] = record
        for raw in self._read():
            record = UserRecord(**raw)
            if record.name in self._users and self._users[record.name].from_config:
                continue  # the config wins for users it names
            self._users[record.name] = record

    def _read(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise InternalError(f"{self.path} is unreadable ({exc}); restore it from a backup"
                                ) from exc
        return [dict(item) for item in data.get("users", [])]

    def _save(self) -> None:
        stored = [asdict(u) for u in self._users.values() if not u.from_config]
        _write_private(self.path, json.dumps({"users": stored}, indent=1).encode())

    def key_hash(self, key: str) -> str:
        return hmac.new(self.secret, key.encode(), hashlib.sha256).hexdigest()

    # -- lookups ----------------------------------------------------------------------------
    def by_key(self, key: str) -> UserRecord | None:
        """The active user holding this key; every stored hash is compared in constant time."""
        wanted = self.key_hash(key)
        found = None
        for user in list(self._users.values()):
            if user.key_hash is not None and hmac.compare_digest(user.key_hash, wanted):
                found = user
        return found if found is not None and found.active else None

    def by_uid(self, uid: int) -> UserRecord | None:
        for user in self._users.values():
            if user.uid == uid and user.active:
                return user
        return None

    def get(self, name: str) -> UserRecord | None:
        return self._users.get(name)

    def uid_of(self, name: str) -> int | None:
        """The local uid an active user is mapped to (its jobs run as it), or None."""
        user = self._users.get(name)
        return user.uid if user is not None and user.active else None

    def all(self) -> list[UserRecord]:
        return sorted(self._users.values(), key=lambda u: u.name)

    # -- changes ----------------------------------------------------------------------------
    def add(self, name: str, role: str, uid: int | None = None) -> tuple[UserRecord, str]:
        """Create a user with a new key; returns the record and the key (shown once)."""
        check_name(name)
        if name in self.reserved:
            raise BadRequest(f"user name {name} is a local identity's (an admin on the Unix "
                             "socket); choose another name")
        if uid is not None:
            check_uid(uid, name)
        if role not in self.roles:
            raise BadRequest(f"role {role!r} does not exist; choose one of "
                             f"{', '.join(sorted(self.roles))}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            current = self._users.get(name)
            if current is not None and current.active:
                raise Conflict(f"user {name} already exists; revoke it first to issue a new key")
            if current is not None and current.from_config:
                raise Conflict(f"user {name} is defined in the daemon config; change it there")
            holder = self.by_uid(uid) if uid is not None else None
            if holder is not None:
                raise Conflict(f"uid {uid} already maps to user {holder.name}; revoke that "
                               "user first or choose another uid")
            record = UserRecord(name=name, role=role, key_hash=self.key_hash(key), uid=uid,
                                created_at=time.time())
            self._users[name] = record
            self._save()
        return record, key

    def revoke(self, name: str) -> UserRecord:
        with self._lock:
            current = self._users.get(name)
            if current is None or not current.active:
                raise NotFound(f"no active user {name}; `fetchml user list` shows them")
            if current.from_config:
                raise Conflict(f"user {name} is defined in the daemon config; remove it there")
            record = replace(current, revoked_at=time.time())
            self._users[name] = record
            self._save()
        return record
