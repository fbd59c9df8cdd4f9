"""fetchml's exceptions: one root, one subclass per protocol error code.

Every error a user sees is one sentence that says what to do. Foreign exceptions (OSError,
aiosqlite, redis, msgpack) are translated into these at the boundary that calls the foreign
code, with ``raise ... from exc``, so callers only ever catch ``FetchmlError``.

Each class carries the protocol error code it travels as (``code``) and the CLI exit status
it ends a command with (``exit_code``): 2 usage, 3 cannot reach the daemon, 4 auth, 1 other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4


class FetchmlError(Exception):
    """Root of every error fetchml raises on purpose."""

    code: ClassVar[str] = "internal"
    exit_code: ClassVar[int] = EXIT_OTHER

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return self.message


class BadRequest(FetchmlError):
    """The request is malformed or names something impossible (bad path, bad argument)."""

    code = "bad_request"


class ProtocolViolation(BadRequest):
    """A frame broke the wire rules; the connection that sent it is closed.

    ``close_code`` is the WebSocket close code the daemon ends the connection with.
    """

    def __init__(
        self,
        message: str,
        *,
        close_code: int = 1002,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.close_code = close_code


class ConfigError(BadRequest):
    """A configuration file, environment variable or flag holds an unknown key or bad value."""

    exit_code = EXIT_USAGE


class Unauthenticated(FetchmlError):
    code = "unauthenticated"
    exit_code = EXIT_AUTH


class PermissionDenied(FetchmlError):
    code = "permission_denied"
    exit_code = EXIT_AUTH


class NotFound(FetchmlError):
    code = "not_found"


class Conflict(FetchmlError):
    """The thing exists but is in a state that forbids the request (stale attempt, in use)."""

    code = "conflict"


class RateLimited(FetchmlError):
    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details={**(details or {}), "retry_after": retry_after})
        self.retry_after = retry_after


class TooLarge(FetchmlError):
    code = "too_large"


class IntegrityError(FetchmlError):
    """Stored bytes do not hash to their name, or a manifest names an object that is gone."""

    code = "integrity"


class Unavailable(FetchmlError):
    """A component the request needs (the daemon, Redis, a peer) cannot be reached right now."""

    code = "unavailable"


class DaemonUnreachable(Unavailable):
    """The CLI could not open a connection to the daemon."""

    exit_code = EXIT_UNREACHABLE


class DaemonStopped(Unavailable):
    """The daemon closed the connection while a request was in flight."""

    exit_code = EXIT_UNREACHABLE


class InternalError(FetchmlError):
    code = "internal"


# The closed set of protocol error codes, each with the class a client raises for it.
ERROR_CLASSES: dict[str, type[FetchmlError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        Conflict,
        RateLimited,
        TooLarge,
        IntegrityError,
        Unavailable,
        InternalError,
    )
}
ERROR_CODES: frozenset[str] = frozenset(ERROR_CLASSES)


def error_from_wire(code: str, message: str, details: Mapping[str, Any] | None) -> FetchmlError:
    """Rebuild the exception a daemon's error reply stands for (unknown codes become internal)."""
    cls = ERROR_CLASSES.get(code, InternalError)
    if cls is RateLimited:
        retry_after = float((details or {}).get("retry_after", 1.0))
        return RateLimited(message, retry_after=retry_after, details=details)
    return cls(message, details=details)
