"""fetchml daemon: run the daemon in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from fetchml.cli.context import CliContext, pass_cli
from fetchml.config import DaemonSettings, load_daemon_settings
from fetchml.logctx import ContextFilter


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("job", "request"):
            if getattr(record, key, None) is not None:
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextLogFormatter(logging.Formatter):
    """Readable lines for a terminal, with the job or request they concern."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{key}={getattr(record, key)}" for key in ("job", "request")
                if getattr(record, key, None) is not None]
        return f"{text} [{' '.join(tags)}]" if tags else text


def configure_logging(settings: DaemonSettings, env: dict[str, str]) -> None:
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "json" if ("JOURNAL_STREAM" in env or not sys.stderr.isatty()) else "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(TextLogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Config file (default /etc/fetchml/daemon.yaml when it exists).")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Where state lives.")
@click.option("--listen", metavar="HOST:PORT", help="Also listen on TCP (port 0 picks one).")
@click.option("--store", metavar="URL", help="Job store: sqlite (default) or redis://host:port/db.")
@click.option("--name", metavar="NAME", help="This host's name in a cluster.")
@click.option("--isolation", type=click.Choice(["none", "bwrap", "podman"]), help="Job isolation.")
@click.option("--metrics-listen", metavar="HOST:PORT", help="Serve Prometheus metrics here.")
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
@pass_cli
def daemon(cli: CliContext, config_file: Path | None, state_dir: Path | None, listen: str | None,
           store: str | None, name: str | None, isolation: str | None,
           metrics_listen: str | None, check_config: bool) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C."""
    flags = {"state_dir": str(state_dir) if state_dir else None, "listen": listen,
             "store": store, "name": name, "isolation": isolation,
             "metrics_listen": metrics_listen}
    loaded = load_daemon_settings(env=cli.env, config_file=config_file, flags=flags)
    if check_config:
        from fetchml.daemon.server import check_settings

        check_settings(loaded.settings)
        click.echo("configuration is valid")
        return
    configure_logging(loaded.settings, cli.env)
    from fetchml.daemon.server import run

    sys.exit(run(loaded.settings))
