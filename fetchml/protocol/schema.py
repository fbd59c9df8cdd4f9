"""Each op declared once: its arguments (checked here), their types, and its policy.

An ``OpSpec`` is everything that varies per op: the arguments it takes (``Arg``, checked by
``validate`` before a handler sees them) and their static type (``params``, a ``TypedDict``
whose keys are the arguments, every one present once defaults are filled in); the permissions
its caller needs; whether successful calls go to the audit log, whether calls are rate limited
and whether a connection's calls run one at a time in arrival order. The daemon's session
enforces the policy for every op in one place; handlers register against the spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar, cast

from fetchml.errors import BadRequest

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    bytes: "binary data",
    list: "a list",
    dict: "a map",
}


def _is_instance(value: Any, expected: type) -> bool:
    # bool is an int in Python but never on our wire; ints are accepted where floats are.
    if expected is int:
        return type(value) is int
    if expected is float:
        return type(value) in (int, float)
    return isinstance(value, expected)


@dataclass(frozen=True)
class Arg:
    """One argument of an op: its type, whether it is required, and what it means."""

    name: str
    kind: type
    doc: str
    required: bool = False
    default: Any = None
    items: type | None = None  # element type of a list, value type of a map
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None

    def describe(self) -> str:
        kind = _TYPE_NAMES[self.kind]
        if self.items is not None:
            kind += f" of {_TYPE_NAMES[self.items]}"
        need = "required" if self.required else f"optional, default {self.default!r}"
        return f"{self.name}: {kind}, {need}. {self.doc}"


A = TypeVar("A", bound=Mapping[str, Any])


class NoArgs(TypedDict):
    """The arguments of an op that takes none."""


@dataclass(frozen=True)
class OpSpec(Generic[A]):
    """An op's name, arguments and their type, policy, whether it streams, and its docs."""

    name: str
    doc: str
    args: tuple[Arg, ...] = ()
    stream: bool = False
    result: str = ""
    events: str = ""
    # The arguments as handlers read them (a TypedDict keyed by the names in ``args``).
    params: type[A] = field(kw_only=True)
    # Permissions the caller's role needs, all of them, checked after the arguments; () for
    # ops that any authenticated identity may call.
    permissions: tuple[str, ...] = field(kw_only=True)
    audited: bool = field(default=False, kw_only=True)  # successful calls are audited
    rate_limited: bool = field(default=False, kw_only=True)  # charged to the caller's bucket
    ordered: bool = field(default=False, kw_only=True)  # one at a time, in arrival order
    _by_name: dict[str, Arg] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {arg.name: arg for arg in self.args})

    def validate(self, args: Mapping[str, Any]) -> A:
        """Return the arguments with defaults filled in, or raise BadRequest naming the bad one."""
        unknown = sorted(set(args) - set(self._by_name))
        if unknown:
            raise BadRequest(
                f"{self.name} does not take argument {unknown[0]!r}; "
                f"it takes {', '.join(self._by_name) or 'no arguments'}"
            )
        checked: dict[str, Any] = {}
        for arg in self.args:
            if arg.name not in args:
                if arg.required:
                    raise BadRequest(f"{self.name} needs argument {arg.name!r} ({arg.doc})")
                checked[arg.name] = arg.default
                continue
            checked[arg.name] = self._check(arg, args[arg.name])
        return cast(A, checked)

    def _check(self, arg: Arg, value: Any) -> Any:
        if value is None:
            if arg.nullable:
                return None
            if not arg.required:
                return arg.default
            raise BadRequest(f"argument {arg.name!r} of {self.name} must not be null")
        if not _is_instance(value, arg.kind):
            raise BadRequest(
                f"argument {arg.name!r} of {self.name} must be {_TYPE_NAMES[arg.kind]}, "
                f"not {type(value).__name__}"
            )
        if arg.items is not None:
            members = value.values() if isinstance(value, dict) else value
            if arg.kind is dict and not all(isinstance(k, str) for k in value):
                raise BadRequest(f"argument {arg.name!r} of {self.name} must have string keys")
            for member in members:
                if not _is_instance(member, arg.items):
                    raise BadRequest(
                        f"every item of argument {arg.name!r} of {self.name} must be "
                        f"{_TYPE_NAMES[arg.items]}"
                    )
        if arg.kind is float and type(value) is int:
            value = float(value)
        if arg.check is not None:
            complaint = arg.check(value)
            if complaint:
                raise BadRequest(f"argument {arg.name!r} of {self.name} {complaint}")
        return value

    def policy(self) -> str:
        """The policy in words, e.g. ``requires jobs:create; audited; rate limited``."""
        parts = [f"requires {' and '.join(self.permissions)}" if self.permissions
                 else "any authenticated user"]
        parts += [word for flag, word in ((self.audited, "audited"),
                                          (self.rate_limited, "rate limited"),
                                          (self.ordered, "in arrival order")) if flag]
        return "; ".join(parts)

    def describe(self) -> str:
        lines = [f"{self.name}{' (stream)' if self.stream else ''}: {self.doc}"]
        lines.append(f"    policy: {self.policy()}")
        lines += [f"    {arg.describe()}" for arg in self.args]
        if self.result:
            lines.append(f"    result: {self.result}")
        if self.events:
            lines.append(f"    events: {self.events}")
        return "\n".join(lines)


def in_range(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must not be negative"
