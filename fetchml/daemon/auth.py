"""Who is asking: identities, roles and their permissions, peer credentials.

On the Unix socket the kernel tells us the peer's uid (SO_PEERCRED): the daemon's own uid and
root are admin, uids mapped in the config get their user's role, anyone else needs an API key.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fetchml.errors import ConfigError, Unauthenticated

log = logging.getLogger(__name__)

ALL = "*"
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
    uid: int | None = None  # set when authenticated by peer credentials

    def allows(self, permission: str) -> bool:
        return ALL in self.permissions or permission in self.permissions


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connected Unix socket (Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


class Authenticator:
    """Turns a connection's credentials into an Identity, or refuses it."""

    def __init__(self, users: Iterable[Mapping[str, Any]], roles: Mapping[str, Any]) -> None:
        self.roles = dict(DEFAULT_ROLES)
        for role_name, permissions in roles.items():
            if not isinstance(permissions, list) or not all(
                isinstance(p, str) for p in permissions
            ):
                raise ConfigError(f"role {role_name!r} must list permission names")
            self.roles[role_name] = frozenset(permissions)
        self.users_by_uid: dict[int, tuple[str, str]] = {}
        for user in users:
            name, role, uid = user.get("name"), user.get("role"), user.get("uid")
            if not isinstance(name, str) or not isinstance(role, str) or role not in self.roles:
                raise ConfigError(
                    f"user entry {dict(user)!r} needs a name and one of the roles "
                    f"{', '.join(sorted(self.roles))}"
                )
            if uid is not None:
                if not isinstance(uid, int):
                    raise ConfigError(f"uid of user {name!r} must be an integer")
                self.users_by_uid[uid] = (name, role)

    def identity(self, user: str, role: str, uid: int | None = None) -> Identity:
        return Identity(user, role, self.roles.get(role, frozenset()), uid)

    def from_peer(self, creds: PeerCredentials) -> Identity:
        if creds.uid in (os.geteuid(), 0):
            return self.identity(_user_name(creds.uid), "admin", creds.uid)
        mapped = self.users_by_uid.get(creds.uid)
        if mapped is None:
            raise Unauthenticated(
                f"local uid {creds.uid} is not mapped to a fetchml user; ask an admin to add "
                "it to the daemon's users, or set FETCHML_API_KEY"
            )
        return self.identity(mapped[0], mapped[1], creds.uid)

    def from_key(self, key: str) -> Identity:
        raise Unauthenticated("this API key is not valid; ask an admin for a new one")
