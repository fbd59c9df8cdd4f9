"""fetchml init: make the current directory a fetchml project that knows its daemon."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.config import PROJECT_CONFIG, PROJECT_DIR_NAME, read_yaml
from fetchml.errors import ConfigError, FetchmlError

IGNORE_FILE = ".fetchmlignore"
IGNORE_TEMPLATE = """\
# Files fetchml does not snapshot, in .gitignore syntax. .gitignore is honoured too.
# Always ignored: .git/ .fetchml/ __pycache__/ *.pyc .mypy_cache/ .pytest_cache/, editor swap
# files, and any directory holding pyvenv.cfg (a virtualenv, whatever its name).
#
# Large data belongs in `fetchml dataset push`, not in every snapshot:
# data/raw/
# *.ckpt
# wandb/
"""


def _git_work_tree(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        if (directory / ".git").exists():
            return directory
    return None


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold an API key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def _config_text(values: dict[str, Any]) -> str:
    import yaml

    header = "# fetchml project settings; `fetchml config show` lists every setting.\n"
    return header + yaml.safe_dump(values, sort_keys=True)


@click.command()
@click.option("--url", metavar="URL", help="Remote daemon (ws[s]://host:port).")
@click.option("--socket", "socket_path", metavar="PATH", help="Local daemon's Unix socket.")
@click.option("--save-key", is_flag=True,
              help="Store the API key (from FETCHML_API_KEY or a prompt) in the project, 0600.")
@json_option
@pass_cli
def init(cli: CliContext, url: str | None, socket_path: str | None, save_key: bool) -> None:
    """Create .fetchml/ and .fetchmlignore here, check the daemon, and show who you are."""
    if url and socket_path:
        raise click.UsageError("give either --url or --socket, not both")
    root = cli.cwd
    project_dir = root / PROJECT_DIR_NAME
    config_path = root / PROJECT_CONFIG
    existing = read_yaml(config_path) if config_path.is_file() else {}
    wanted = dict(existing)
    url = url or cli.url
    socket_path = socket_path or cli.socket_path
    if url or socket_path:
        wanted.pop("url", None)
        wanted.pop("socket", None)
        wanted["url" if url else "socket"] = url or str(Path(socket_path or "").absolute())
    elif "url" not in wanted and "socket" not in wanted:
        target = cli.target()
        if target.url:
            wanted["url"] = target.url
        else:
            wanted["socket"] = str(Path(target.socket_path or "").absolute())
    if save_key:
        key = cli.env.get("FETCHML_API_KEY") or click.prompt("API key", hide_input=True)
        if not key.strip():
            raise ConfigError("the API key is empty; set FETCHML_API_KEY or type the key")
        wanted["api_key"] = key.strip()

    changes: list[str] = []
    if not project_dir.is_dir():
        project_dir.mkdir(mode=0o700)
        changes.append(f"created {PROJECT_DIR_NAME}/")
    if wanted != existing or not config_path.is_file():
        _write_private(config_path, _config_text(wanted))
        changes.append(f"{'updated' if existing else 'wrote'} {PROJECT_CONFIG}")
    if not (root / IGNORE_FILE).exists():
        (root / IGNORE_FILE).write_text(IGNORE_TEMPLATE)
        changes.append(f"wrote {IGNORE_FILE}")
    git_root = _git_work_tree(root)
    if git_root is not None:
        gitignore = root / ".gitignore"
        lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
        if not {f"{PROJECT_DIR_NAME}/", PROJECT_DIR_NAME, f"/{PROJECT_DIR_NAME}/"} & set(lines):
            with gitignore.open("a") as handle:
                if lines and lines[-1] != "":
                    handle.write("\n")
                handle.write(f"{PROJECT_DIR_NAME}/\n")
            changes.append("added .fetchml/ to .gitignore")

    cli._loaded = None  # re-read settings: the project file may be new
    cli.socket_path = cli.url = None
    try:
        hello = cli.connect().hello
    except FetchmlError:
        cli.note(f"{'; '.join(changes) or 'nothing changed'}; the daemon did not answer:")
        raise
    if cli.as_json:
        cli.emit_json({"project": str(root), "changes": changes, "user": hello["user"],
                       "role": hello["role"], "daemon": hello["daemon"],
                       "target": cli.target().describe()})
        return
    for change in changes:
        cli.say(change)
    if not changes:
        cli.say("already initialised: nothing changed")
    cli.say(f"connected to {hello['daemon']} at {cli.target().describe()} as "
            f"{hello['user']} ({hello['role']})")
