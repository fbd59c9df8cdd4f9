"""fetchml install-service: write the systemd unit for this installation and say what to run."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import click

from fetchml.cli.context import CliContext, pass_cli
from fetchml.errors import BadRequest, PermissionDenied

UNITS = Path(__file__).resolve().parent.parent / "units"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# The unprivileged user a root daemon runs key-only users' jobs as (its job_user default).
JOB_USER_COMMAND = ("useradd --system --no-create-home --shell /usr/sbin/nologin "
                    "fetchml-job")


def fetchml_command() -> str:
    """How systemd should start this very installation of fetchml."""
    if sys.argv and sys.argv[0].endswith(".pyz"):
        return f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(sys.argv[0]).resolve()))}"
    script = Path(sys.executable).parent / "fetchml"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m fetchml"


def render_unit(user: bool, command: str | None = None) -> str:
    name = "fetchml-user.service" if user else "fetchml.service"
    return (UNITS / name).read_text().replace("@FETCHML@", command or fetchml_command())


@click.command(name="install-service")
@click.option("--user", "per_user", is_flag=True, help="A user service (systemctl --user).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write the unit into this directory instead of systemd's.")
@click.option("--print", "print_only", is_flag=True, help="Print the unit; write nothing.")
@pass_cli
def install_service(cli: CliContext, per_user: bool, output: Path | None,
                    print_only: bool) -> None:
    """Write fetchml.service for this installation and print the systemctl commands."""
    unit = render_unit(per_user)
    if print_only:
        click.echo(unit, nl=False)
        return
    if output is not None:
        directory = output
    elif per_user:
        config = cli.env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        directory = Path(config) / "systemd" / "user"
    else:
        directory = SYSTEM_UNIT_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "fetchml.service").write_text(unit)
    except PermissionError as exc:
        raise PermissionDenied(f"cannot write {directory}/fetchml.service; run with sudo, or "
                               "install a user service with --user") from exc
    except OSError as exc:
        raise BadRequest(f"cannot write {directory}/fetchml.service: {exc.strerror}") from exc
    cli.say(f"wrote {directory / 'fetchml.service'}")
    if per_user:
        cli.say("now run:\n  systemctl --user daemon-reload\n"
                "  systemctl --user enable --now fetchml\n"
                "  loginctl enable-linger \"$USER\"   # keep it running after you log out")
        return
    example = Path("/etc/fetchml/daemon.yaml.example")
    if output is None and not example.exists():
        example.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(UNITS / "daemon.example.yaml", example)
        cli.say(f"wrote {example} (copy it to daemon.yaml to configure the daemon)")
    cli.say("now run:\n"
            "  sudo useradd --system --home-dir /var/lib/fetchml --shell /usr/sbin/nologin "
            "fetchml   # once\n"
            f"  sudo {JOB_USER_COMMAND}   # once: the jobs of key-only users run as it "
            "when the daemon runs as root\n"
            "  sudo systemctl daemon-reload\n  sudo systemctl enable --now fetchml\n"
            "users talk to it through /run/fetchml/fetchml.sock (add them to the daemon's "
            "users, with socket_group/socket_mode, or give them API keys)")
