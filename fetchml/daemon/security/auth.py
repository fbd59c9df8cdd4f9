"""Who is asking, and may they come in: identities, roles, keys, peer credentials, network
policy, rate limits and failed-login bans, all decided before the WebSocket upgrade.

On the Unix socket the kernel tells us the peer's uid (SO_PEERCRED): the daemon's own uid and
root are admin, uids mapped to users get their role, anyone else needs an API key. An
``Authorization: Bearer`` key, when sent, takes precedence (an admin can act as a user). TCP
clients need a key, must come from an allowed network, and a browser's Origin must be listed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fetchml.config import DaemonSettings
from fetchml.daemon.security.audit import AuditLog, audit_key
from fetchml.daemon.security.netpolicy import NetworkPolicy
from fetchml.daemon.security.ratelimit import FailedLogins, TokenBuckets
from fetchml.daemon.security.users import MAX_UID, UserRegistry
from fetchml.errors import (
    ConfigError,
    FetchmlError,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)

log = logging.getLogger(__name__)

ALL = "*"
PERMISSIONS = frozenset({
    "host:read", "cas:read", "cas:write", "jobs:create", "jobs:read", "jobs:read:all",
    "jobs:cancel", "jobs:cancel:all", "jobs:prune", "jobs:prune:all", "datasets:read",
    "datasets:write", "datasets:delete:all", "admin:users", "admin:prune", "admin:fsck",
    "admin:audit", "cluster:peer",
})
DEFAULT_ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset({ALL}),
    "researcher": frozenset({
        "host:read", "cas:read", "cas:write", "jobs:create", "jobs:read", "jobs:cancel",
        "jobs:prune", "datasets:read", "datasets:write",
    }),
    "analyst": frozenset({"host:read", "cas:read", "jobs:read", "jobs:read:all",
                          "datasets:read"}),
}


@dataclass(frozen=True)
class Identity:
    user: str
    role: str
    permissions: frozenset[str]
    via: str = "uid"  # "uid" (peer credentials) or "key"
    uid: int | None = None
    source: str = ""  # what rate limits and bans count against: "ip 1.2.3.4" or "uid 1000"

    def allows(self, permission: str) -> bool:
        return ALL in self.permissions or permission in self.permissions


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Knock:
    """What a connection presents before the upgrade."""

    unix: PeerCredentials | None  # set on the Unix socket
    peer: str | None  # TCP peer address
    key: str | None
    forwarded_for: str | None = None
    origin: str | None = None


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connected Unix socket (Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def local_user_name(uid: int) -> str:
    """The name a local uid's identity carries (its passwd name, else ``uid<N>``)."""
    return _user_name(uid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _credential(knock: Knock) -> str:
    """Which credential a connection presents, for counting failed logins per credential
    (a digest: the key itself is never kept)."""
    if knock.key:
        return "key " + hashlib.sha256(knock.key.encode()).hexdigest()[:32]
    return f"uid {knock.unix.uid}" if knock.unix is not None else "none"


def load_roles(overrides: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    roles = dict(DEFAULT_ROLES)
    for name, permissions in overrides.items():
        if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
            raise ConfigError(f"role {name!r} must list permission names")
        unknown = sorted(set(permissions) - PERMISSIONS - {ALL})
        if unknown:
            raise ConfigError(f"role {name!r} names unknown permission {unknown[0]!r}; known: "
                              f"{', '.join(sorted(PERMISSIONS))}")
        roles[name] = frozenset(permissions)
    return roles


def check_users(users: list[Any], roles: Mapping[str, object]) -> list[dict[str, Any]]:
    checked = []
    for user in users:
        if not isinstance(user, dict):
            raise ConfigError(f"each entry of users must be a mapping, not {user!r}")
        name, role, uid = user.get("name"), user.get("role"), user.get("uid")
        if not isinstance(name, str) or not isinstance(role, str) or role not in roles:
            raise ConfigError(f"user entry {user!r} needs a name and one of the roles "
                              f"{', '.join(sorted(roles))}")
        if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool)
                                or not 0 <= uid <= MAX_UID):
            raise ConfigError(f"uid of user {name!r} must be a whole number from 0 to {MAX_UID}")
        checked.append(dict(user))
    return checked


class Authenticator:
    """Decides every connection and remembers what it needs to: users, buckets, bans."""

    def __init__(self, settings: DaemonSettings) -> None:
        self.roles = load_roles(settings.roles)
        config_users = check_users(settings.users, self.roles)
        self.daemon_uid = os.geteuid()
        local_admins = {"root", _user_name(0), _user_name(self.daemon_uid)}
        self.registry = UserRegistry(settings.state_dir, config_users, set(self.roles),
                                     reserved=local_admins)
        self.policy = NetworkPolicy(settings.ip_allowlist, settings.trusted_proxies,
                                    settings.allowed_origins)
        self.session_buckets = TokenBuckets(settings.rate_limit_sessions)
        self.submit_buckets = TokenBuckets(settings.rate_limit_submits)
        self.limit_local = settings.rate_limit_local
        self.failures = FailedLogins(settings.auth_fail_threshold, settings.auth_fail_window,
                                     settings.auth_ban)
        audit_path = settings.audit_log or settings.state_dir / "logs" / "audit.log"
        self.audit = AuditLog(audit_path, audit_key(self.registry.secret),
                              max_bytes=settings.audit_max_bytes)
        self.audit.open()

    def identity(self, user: str, role: str, *, via: str, uid: int | None = None,
                 source: str = "") -> Identity:
        return Identity(user, role, self.roles.get(role, frozenset()), via, uid, source)

    # -- admission --------------------------------------------------------------------------
    def admit(self, knock: Knock) -> Identity:
        """The identity of an incoming connection, or the FetchmlError that refuses it (a
        failed login raises SlowedRefusal: its answer is held back a little longer each time)."""
        if knock.unix is not None:
            source = f"uid {knock.unix.uid}"
            peer = f"unix uid {knock.unix.uid} pid {knock.unix.pid}"
        else:
            address = self.policy.client_address(knock.peer, knock.forwarded_for)
            source, peer = f"ip {address}", f"tcp {address}"
            if not self.policy.allows(address):
                self.audit.record("auth.refused", user=None, peer=peer,
                                  reason="address not in ip_allowlist")
                raise PermissionDenied(f"connections from {address} are not allowed; ask an "
                                       "admin to add your network to ip_allowlist")
            if not self.policy.origin_allowed(knock.origin):
                self.audit.record("auth.refused", user=None, peer=peer,
                                  reason="origin not allowed", origin=knock.origin)
                raise PermissionDenied("this Origin may not connect; ask an admin to add it "
                                       "to allowed_origins")
        banned = self.failures.banned_for(source)
        if banned:
            raise RateLimited(f"too many failed logins from {source}; try again in "
                              f"{banned:.0f} s", retry_after=banned)
        credential = _credential(knock)
        try:
            identity = self._who(knock, source)
        except Unauthenticated as exc:
            delay, ban = self.failures.failed(source, credential)
            self.audit.record("auth.failure", user=None, peer=peer, reason=exc.message,
                              method="key" if knock.key else "uid")
            if ban:
                self.audit.record("auth.ban", user=None, peer=peer,
                                  seconds=self.failures.ban_s)
                log.warning("banning %s after repeated failed logins", source)
            raise SlowedRefusal(exc, delay) from None
        self.failures.succeeded(source, credential)
        if identity.via == "key" or self.limit_local:
            self._take(self.session_buckets, identity, "session opens")
        self.audit.record("auth.success", user=identity.user, peer=peer, role=identity.role,
                          method=identity.via)
        return identity

    def _who(self, knock: Knock, source: str) -> Identity:
        if knock.key:
            user = self.registry.by_key(knock.key)
            if user is None:
                raise Unauthenticated("this API key is not valid (wrong or revoked); ask an "
                                      "admin for a new one")
            return self.identity(user.name, user.role, via="key", source=source)
        if knock.unix is None:
            raise Unauthenticated("this daemon needs an API key; set FETCHML_API_KEY or run "
                                  "`fetchml init --save-key`")
        uid = knock.unix.uid
        if uid in (self.daemon_uid, 0):
            return self.identity(_user_name(uid), "admin", via="uid", uid=uid, source=source)
        mapped = self.registry.by_uid(uid)
        if mapped is None:
            raise Unauthenticated(f"local uid {uid} is not mapped to a fetchml user; ask an "
                                  "admin to add it to the daemon's users, or set "
                                  "FETCHML_API_KEY")
        return self.identity(mapped.name, mapped.role, via="uid", uid=uid, source=source)

    def _take(self, buckets: TokenBuckets, identity: Identity, what: str) -> None:
        wait = max(buckets.take(f"user {identity.user}"), buckets.take(identity.source))
        if wait > 0:
            raise RateLimited(f"too many {what}; retry in {wait:.1f} s", retry_after=wait)

    # -- during a session -------------------------------------------------------------------
    def still_valid(self, identity: Identity) -> bool:
        """False once the user behind a session was revoked (checked at each request)."""
        if identity.via == "uid" and identity.uid in (self.daemon_uid, 0):
            return True
        record = self.registry.get(identity.user)
        return record is not None and record.active and record.role == identity.role

    def charge_submit(self, identity: Identity) -> None:
        if identity.via == "key" or self.limit_local:
            self._take(self.submit_buckets, identity, "job submissions")


class SlowedRefusal(Unauthenticated):
    """An authentication failure whose answer is held back ``delay`` seconds."""

    def __init__(self, inner: FetchmlError, delay: float) -> None:
        super().__init__(inner.message, details=inner.details)
        self.delay = delay
