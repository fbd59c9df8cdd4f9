"""What every command shares: settings, the connection, --json, and output helpers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fetchml.config import ClientSettings, Loaded, load_client_settings
from fetchml.errors import Unauthenticated

if TYPE_CHECKING:  # the client is imported when a command connects: --help needs none of it
    from fetchml.client import Connection, Target

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliContext:
    socket_path: str | None
    url: str | None
    as_json: bool
    verbosity: int
    env: dict[str, str]
    cwd: Path
    _loaded: Loaded[ClientSettings] | None = field(default=None, repr=False)
    _conn: Connection | None = field(default=None, repr=False)

    @property
    def loaded(self) -> Loaded[ClientSettings]:
        if self._loaded is None:
            flags = {"socket": self.socket_path, "url": self.url}
            self._loaded = load_client_settings(cwd=self.cwd, env=self.env, flags=flags)
        return self._loaded

    @property
    def settings(self) -> ClientSettings:
        return self.loaded.settings

    def target(self) -> Target:
        from fetchml.client import resolve_target

        return resolve_target(self.loaded, self.env)

    def connect(self) -> Connection:
        from fetchml.client import connect

        if self._conn is None:
            target, settings = self.target(), self.settings
            ca_file = str(settings.ca_file) if settings.ca_file else None
            try:
                self._conn = connect(target, api_key=settings.api_key,
                                     timeout=settings.connect_timeout, ca_file=ca_file)
            except Unauthenticated:
                if target.url is None or settings.api_key or not sys.stdin.isatty():
                    raise
                key = click.prompt(f"API key for {target.url}", hide_input=True).strip()
                self._conn = connect(target, api_key=key, timeout=settings.connect_timeout,
                                     ca_file=ca_file)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- output -----------------------------------------------------------------------------
    def emit_json(self, document: Any) -> None:
        sys.stdout.write(json.dumps(document, default=str) + "\n")
        sys.stdout.flush()

    def say(self, text: str = "") -> None:
        """Human output on stdout (never in --json mode)."""
        if not self.as_json:
            click.echo(text)

    def note(self, text: str) -> None:
        """Progress and hints on stderr, silenced by -q."""
        if self.verbosity >= 0:
            click.echo(text, err=True)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(CliContext).as_json = True  # type: ignore[union-attr]


def json_option(fn: F) -> F:
    """``--json`` after the sub-command too (``fetchml status --json``)."""
    return click.option("--json", "as_json", is_flag=True, expose_value=False,
                        callback=_set_json, help="Print one JSON document.")(fn)


pass_cli = click.make_pass_decorator(CliContext)


# Control characters (a newline, an escape sequence) in names people chose are shown escaped,
# so that they cannot break a table's lines or drive the terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def printable(text: str) -> str:
    return text.translate(_CONTROL)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned table, column widths from the content."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
