"""Typed settings for the daemon and the CLI, and where each value came from.

Priority, highest first: command-line flags > ``FETCHML_*`` environment variables > the
project's ``.fetchml/config.yaml`` > the user's ``~/.config/fetchml/config.yaml`` > defaults.
The daemon reads ``--config FILE`` (else ``/etc/fetchml/daemon.yaml`` when it exists) in place
of the two CLI files. An unknown key or a value of the wrong type is a ConfigError naming the
file (or variable) and the key. Nothing here reads the environment by itself: callers pass it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from fetchml.errors import ConfigError

ENV_PREFIX = "FETCHML_"
SYSTEM_DAEMON_CONFIG = Path("/etc/fetchml/daemon.yaml")
SYSTEM_STATE_DIR = Path("/var/lib/fetchml")
PROJECT_DIR_NAME = ".fetchml"
PROJECT_CONFIG = f"{PROJECT_DIR_NAME}/config.yaml"
SOCKET_NAME = "fetchml.sock"

_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                   "w": 604800.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def setting(default: Any, help: str, kind: str = "", *, secret: bool = False,
            choices: tuple[str, ...] = (), env: bool = True) -> Any:
    """Declare one setting: its default, what it means, and how text is parsed into it."""
    meta = {"help": help, "kind": kind, "secret": secret, "choices": choices, "env": env}
    if isinstance(default, (list, dict)):
        factory = default.copy
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ClientSettings:
    socket: Path | None = setting(None, "Unix socket of the daemon to talk to", "path")
    url: str | None = setting(None, "ws:// or wss:// URL of a remote daemon")
    api_key: str | None = setting(None, "API key for a remote daemon", secret=True)
    ca_file: Path | None = setting(None, "CA certificate that signed the daemon's TLS "
                                   "certificate (default: the system's)", "path")
    connect_timeout: float = setting(10.0, "seconds to wait for the daemon to answer", "duration")
    max_file_size: int = setting(1024**3, "sync refuses files larger than this", "bytes")
    debounce: float = setting(0.2, "watch: quiet time before a burst of changes syncs", "duration")


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = setting(Path(), "where the store, runs and database live", "path")
    socket: Path | None = setting(None, "Unix socket path (default <state_dir>/fetchml.sock)",
                                  "path")
    socket_mode: int = setting(0o600, "permission bits of the Unix socket", "mode")
    socket_group: str | None = setting(None, "group that owns the Unix socket")
    listen: str | None = setting(None, "HOST:PORT of the TCP listener (off when unset)")
    tls_cert: Path | None = setting(None, "TLS certificate (PEM) for the TCP listener", "path")
    tls_key: Path | None = setting(None, "TLS private key (PEM) for the TCP listener", "path")
    allow_insecure: bool = setting(False, "allow a non-loopback TCP listener without TLS")
    name: str = setting("", "this host's name in a cluster (default: the hostname)")
    store: str = setting("sqlite", "job store: sqlite, or redis://HOST:PORT/DB")
    isolation: str = setting("none", "how jobs are isolated", choices=("none", "bwrap", "podman"))
    metrics_listen: str | None = setting(None, "HOST:PORT for Prometheus metrics (off when unset)")
    gpus: str | None = setting(None, "GPU indices to use instead of detection, e.g. 0,1 or ''")
    cpus: int | None = setting(None, "CPU slots to offer (default: the CPUs of this process)")
    memory: int | None = setting(None, "memory to offer jobs (default: all)", "bytes")
    log_level: str = setting("info", "log level",
                             choices=("debug", "info", "warning", "error"))
    log_format: str = setting("auto", "log format", choices=("auto", "text", "json"))
    max_frame_bytes: int = setting(8 * 1024**2, "largest WebSocket frame accepted", "bytes")
    max_depth: int = setting(32, "deepest msgpack nesting accepted")
    max_in_flight: int = setting(1024, "pipelined requests one connection may have open")
    handshake_timeout: float = setting(10.0, "seconds a connection has to say hello", "duration")
    idle_timeout: float = setting(600.0, "seconds before an idle connection is closed",
                                  "duration")
    kill_grace: float = setting(10.0, "seconds between SIGTERM and SIGKILL on cancel", "duration")
    aging_interval: float = setting(
        600.0, "a queued job gains one priority step per this many seconds waited", "duration")
    users: list[Any] = setting([], "users: [{name, role, uid?}]", "list", env=False)
    roles: dict[str, Any] = setting({}, "role permission overrides", "dict", env=False)
    ip_allowlist: list[str] = setting(["127.0.0.0/8", "::1/128"],
                                      "CIDR networks TCP clients may come from", "list")
    trusted_proxies: list[str] = setting([], "proxies whose X-Forwarded-For is believed", "list")
    connect_deadline: float = setting(
        10.0, "seconds a TCP connection has for TLS, its request and hello", "duration")
    max_pending_connections: int = setting(
        512, "TCP connections that have not said hello yet, in all")
    max_pending_per_address: int = setting(
        32, "TCP connections that have not said hello yet, per client address")
    allowed_origins: list[str] = setting([], "browser Origins allowed to connect", "list")
    rate_limit_sessions: int = setting(30, "session opens per minute per key and per IP")
    rate_limit_submits: int = setting(30, "job submissions per minute per key and per IP")
    rate_limit_local: bool = setting(False, "also rate-limit sessions authenticated by uid")
    auth_fail_threshold: int = setting(10, "failed logins from one source before a ban")
    auth_fail_window: float = setting(600.0, "window in which failed logins count", "duration")
    auth_ban: float = setting(900.0, "how long a source is banned", "duration")
    audit_log: Path | None = setting(None, "audit log file (default <state_dir>/logs/audit.log)",
                                     "path")
    audit_max_bytes: int = setting(10 * 1024**2, "audit log size before it rotates", "bytes")
    gc_grace: float = setting(3600.0, "objects younger than this are never collected", "duration")
    retention_older_than: float | None = setting(
        None, "prune finished jobs older than this, periodically (off when unset)", "duration")
    retention_keep: int | None = setting(None, "with retention: always keep this many newest")
    retention_interval: float = setting(3600.0, "how often the retention policy runs",
                                        "duration")
    # -- cluster (with a redis:// store) -------------------------------------------------------
    cluster_secret: str | None = setting(None, "shared secret daemons of a cluster present to "
                                         "each other", secret=True)
    advertise: str | None = setting(None, "URL other daemons reach this one at (default: "
                                    "from listen)")
    heartbeat_interval: float = setting(2.0, "seconds between this host's heartbeats",
                                        "duration")
    lease_timeout: float = setting(15.0, "a host silent this long has lost its running jobs",
                                   "duration")
    # -- isolation and per-job limits ----------------------------------------------------------
    isolation_choices: list[str] = setting([], "isolation modes users may ask for per job "
                                           "(besides the default)", "list")
    job_network: bool = setting(
        False, "whether isolated jobs (bwrap, podman) that ask for it (queue --network) get "
        "the network")
    job_user: str | None = setting(
        None, "user (name or uid) that key-only users' jobs run as when the daemon is root "
        "(default: fetchml-job if it exists, else nobody)")
    podman_image: str = setting("docker.io/library/python:3.11-slim",
                                "image podman-isolated jobs run in")
    job_max_processes: int | None = setting(None, "processes (threads) one job may have")
    job_max_log_bytes: int | None = setting(None, "largest output.log a job may write", "bytes")
    job_max_output_bytes: int | None = setting(None, "largest outputs a job may write", "bytes")
    # -- job metrics ------------------------------------------------------------------------
    metrics_max_points: int = setting(10_000, "points kept per metric series of a job")


S = TypeVar("S", ClientSettings, DaemonSettings)


@dataclass(frozen=True)
class Loaded(Generic[S]):
    """Settings plus, for each key, where its value came from ("default", a file, env, flag)."""

    settings: S
    sources: dict[str, str]

    def rows(self) -> list[tuple[str, str, str]]:
        """(key, shown value, source) for every setting; secrets are masked."""
        out = []
        for f in dataclasses.fields(self.settings):
            value = getattr(self.settings, f.name)
            shown = "********" if f.metadata["secret"] and value else _show(value, f.metadata)
            out.append((f.name, shown, self.sources[f.name]))
        return out

    def as_json(self) -> dict[str, Any]:
        return {key: {"value": _jsonable(getattr(self.settings, key), key, self),
                      "source": self.sources[key]} for key, _, _ in self.rows()}


def _show(value: Any, meta: Mapping[str, Any]) -> str:
    if value is None:
        return "-"
    if meta["kind"] == "mode":
        return f"{value:04o}"
    return str(value)


def _jsonable(value: Any, key: str, loaded: Loaded[Any]) -> Any:
    meta = {f.name: f.metadata for f in dataclasses.fields(loaded.settings)}[key]
    if meta["secret"] and value:
        return "********"
    if isinstance(value, Path):
        return str(value)
    return value


MAX_BYTES = 2**63 - 1  # what a job store and the wire carry


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size like 512M or 8GiB")
    value = int(match.group(1)) * _BYTE_UNITS[match.group(2)]
    if value > MAX_BYTES:
        raise ValueError(f"{text.strip()[:40]!r} is more than any machine holds; give a size "
                         "like 512M or 8GiB")
    return value


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m or 7d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or ""]


def _convert(f: dataclasses.Field[Any], value: Any, from_text: bool) -> Any:
    """Turn a YAML value (or, with from_text, an environment string) into the field's type."""
    kind, annotation = f.metadata["kind"], str(f.type)
    if value is None and "None" in annotation:
        return None
    if from_text and isinstance(value, str) and value == "" and "None" in annotation \
            and kind != "":
        return None
    if kind == "bytes":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str):
            return parse_bytes(value)
        raise ValueError("expected a size like 512M")
    if kind == "duration":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return float(value)
        if isinstance(value, str):
            return parse_duration(value)
        raise ValueError("expected a duration like 30s")
    if kind == "mode":
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
            return value
        if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3}", value):
            return int(value[-3:], 8)
        raise ValueError("expected permission bits like 0660")
    if kind == "path":
        if isinstance(value, str) and value:
            return Path(value).expanduser()
        raise ValueError("expected a path")
    if kind == "list":
        if from_text and isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list):
            return value
        raise ValueError("expected a list")
    if kind == "dict":
        if isinstance(value, dict):
            return value
        raise ValueError("expected a mapping")
    if annotation.startswith("bool"):
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("expected true or false")
    if annotation.startswith("int"):
        if from_text and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("expected an integer")
    if annotation.startswith("float"):
        if from_text and isinstance(value, str):
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError("expected a number")
    if isinstance(value, str):
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not from_text:
        return str(value)
    raise ValueError("expected a string")


def read_yaml(path: Path) -> dict[str, Any]:
    """Load one settings file; empty files are empty settings."""
    import yaml  # only when a file exists: keeps CLI start-up fast

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}; "
                          "check the path and its permissions") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it "
                          "as UTF-8") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); fix the file") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not a {type(data).__name__}")
    return data


class _Merger(Generic[S]):
    def __init__(self, cls: type[S]) -> None:
        self.cls: type[S] = cls
        self.fields = {f.name: f for f in dataclasses.fields(cls)}
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {name: "default" for name in self.fields}

    def apply(self, values: Mapping[str, Any], source: str, *, from_text: bool,
              what: str) -> None:
        for key, raw in values.items():
            f = self.fields.get(key)
            if f is None:
                raise ConfigError(f"unknown setting {key!r} in {what}; "
                                  f"known settings: {', '.join(self.fields)}")
            try:
                self.values[key] = _convert(f, raw, from_text)
            except ValueError as exc:
                raise ConfigError(f"setting {key!r} in {what} is invalid: {exc}") from exc
            self.sources[key] = source

    def apply_file(self, path: Path, label: str = "file") -> None:
        self.apply(read_yaml(path), f"{label} {path}", from_text=False, what=str(path))

    def apply_env(self, env: Mapping[str, str]) -> None:
        for name, f in self.fields.items():
            var = ENV_PREFIX + name.upper()
            if f.metadata["env"] and var in env:
                self.apply({name: env[var]}, f"env {var}", from_text=True, what=var)

    def apply_flags(self, flags: Mapping[str, Any]) -> None:
        given = {key: value for key, value in flags.items() if value is not None}
        for key, value in given.items():
            flag = "--" + key.replace("_", "-")
            self.apply({key: value}, f"flag {flag}", from_text=isinstance(value, str),
                       what=f"flag {flag}")

    def build(self) -> Loaded[S]:
        return Loaded(self.cls(**self.values), self.sources)


def find_project_root(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` that holds ``.fetchml/``."""
    for directory in (start, *start.parents):
        if (directory / PROJECT_DIR_NAME).is_dir():
            return directory
    return None


def user_config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "fetchml" / "config.yaml"


def default_state_dir(env: Mapping[str, str]) -> Path:
    """systemd's StateDirectory when set, /var/lib/fetchml for root, else the XDG data dir."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")).expanduser() /
                                           ".local" / "share")
    return Path(base) / "fetchml"


def default_socket_candidates(env: Mapping[str, str]) -> list[Path]:
    """Where a local daemon's socket usually is, most likely first."""
    user_dir = default_state_dir({k: v for k, v in env.items() if k != "STATE_DIRECTORY"})
    return [user_dir / SOCKET_NAME, Path("/run/fetchml") / SOCKET_NAME,
            SYSTEM_STATE_DIR / SOCKET_NAME]


def load_client_settings(*, cwd: Path, env: Mapping[str, str],
                         flags: Mapping[str, Any] | None = None) -> Loaded[ClientSettings]:
    merger = _Merger(ClientSettings)
    user_file = user_config_path(env)
    if user_file.is_file():
        merger.apply_file(user_file, "user-file")
    root = find_project_root(cwd)
    if root is not None and (root / PROJECT_CONFIG).is_file():
        merger.apply_file(root / PROJECT_CONFIG, "project-file")
    merger.apply_env(env)
    merger.apply_flags(flags or {})
    return merger.build()


def load_daemon_settings(*, env: Mapping[str, str], config_file: Path | None = None,
                         flags: Mapping[str, Any] | None = None) -> Loaded[DaemonSettings]:
    merger = _Merger(DaemonSettings)
    merger.values["state_dir"] = default_state_dir(env)
    merger.values["name"] = socket.gethostname()
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file} does not exist; check the --config path")
        merger.apply_file(config_file)
    elif SYSTEM_DAEMON_CONFIG.is_file():
        merger.apply_file(SYSTEM_DAEMON_CONFIG)
    merger.apply_env(env)
    merger.apply_flags(flags or {})
    return merger.build()


def daemon_socket_path(settings: DaemonSettings) -> Path:
    return settings.socket or settings.state_dir / SOCKET_NAME
