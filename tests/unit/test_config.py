"""Settings: precedence, provenance, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetchml.client import Target, resolve_target
from fetchml.config import (
    load_client_settings,
    load_daemon_settings,
    parse_bytes,
    parse_duration,
)
from fetchml.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    home = tmp_path / "home"
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    env = {"HOME": str(home)}
    return home, project, env


def test_precedence_flag_env_project_user_default(layout: tuple[Path, Path, dict[str, str]]
                                                  ) -> None:
    home, project, env = layout
    write(home / ".config/fetchml/config.yaml", "max_file_size: 1M\ndebounce: 1s\n"
          "connect_timeout: 3\napi_key: user-key\n")
    write(project / ".fetchml/config.yaml", "max_file_size: 2M\ndebounce: 2s\n")
    env["FETCHML_DEBOUNCE"] = "300ms"
    loaded = load_client_settings(cwd=project / "sub", env=env,
                                  flags={"connect_timeout": None})
    s, src = loaded.settings, loaded.sources
    assert s.max_file_size == 2 * 1024**2 and src["max_file_size"].startswith("project-file")
    assert s.debounce == pytest.approx(0.3) and src["debounce"] == "env FETCHML_DEBOUNCE"
    assert s.connect_timeout == 3 and src["connect_timeout"].startswith("user-file")
    assert s.url is None and src["url"] == "default"
    loaded = load_client_settings(cwd=project, env=env, flags={"debounce": "5s"})
    assert loaded.settings.debounce == 5 and loaded.sources["debounce"] == "flag --debounce"
    rows = {key: (value, source) for key, value, source in loaded.rows()}
    assert rows["api_key"][0] == "********"
    assert loaded.as_json()["api_key"]["value"] == "********"


def test_unknown_key_names_file_and_key(layout: tuple[Path, Path, dict[str, str]]) -> None:
    _, project, env = layout
    path = write(project / ".fetchml/config.yaml", "urll: ws://x\n")
    with pytest.raises(ConfigError) as info:
        load_client_settings(cwd=project, env=env)
    assert "'urll'" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [("connect_timeout: soon\n", "connect_timeout"), ("max_file_size: [1]\n", "max_file_size"),
     ("socket: 12\n", "socket")],
)
def test_wrong_type_names_file_and_key(layout: tuple[Path, Path, dict[str, str]], text: str,
                                       key: str) -> None:
    _, project, env = layout
    path = write(project / ".fetchml/config.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_client_settings(cwd=project, env=env)
    assert repr(key) in str(info.value) and str(path) in str(info.value)


def test_bad_env_value_names_the_variable(layout: tuple[Path, Path, dict[str, str]]) -> None:
    _, project, env = layout
    env["FETCHML_CONNECT_TIMEOUT"] = "whenever"
    with pytest.raises(ConfigError, match="FETCHML_CONNECT_TIMEOUT"):
        load_client_settings(cwd=project, env=env)


def test_not_yaml_and_not_a_mapping(layout: tuple[Path, Path, dict[str, str]]) -> None:
    _, project, env = layout
    write(project / ".fetchml/config.yaml", "a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_client_settings(cwd=project, env=env)
    write(project / ".fetchml/config.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_client_settings(cwd=project, env=env)


def test_daemon_settings_file_env_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path / "daemon.yaml", "listen: 127.0.0.1:9101\nsocket_mode: '0660'\n"
                "kill_grace: 30s\nisolation: bwrap\n")
    loaded = load_daemon_settings(env={"FETCHML_KILL_GRACE": "5", "HOME": str(tmp_path)},
                                  config_file=cfg, flags={"listen": "127.0.0.1:0"})
    s = loaded.settings
    assert s.listen == "127.0.0.1:0" and loaded.sources["listen"] == "flag --listen"
    assert s.socket_mode == 0o660 and s.kill_grace == 5 and s.isolation == "bwrap"
    with pytest.raises(ConfigError, match="isolation"):
        load_daemon_settings(env={}, flags={"isolation": "docker"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_daemon_settings(env={}, config_file=tmp_path / "missing.yaml")


def test_gpus_override_keeps_empty_string() -> None:
    loaded = load_daemon_settings(env={"FETCHML_GPUS": ""})
    assert loaded.settings.gpus == ""


def test_units() -> None:
    assert parse_bytes("8MiB") == 8 * 1024**2 and parse_bytes("1g") == 1024**3
    assert parse_duration("7d") == 7 * 86400 and parse_duration("250ms") == 0.25
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_connection_target_is_one_choice_by_level(layout: tuple[Path, Path, dict[str, str]]
                                                  ) -> None:
    home, project, env = layout
    write(home / ".config/fetchml/config.yaml", "url: wss://box:9101/ws\n")
    write(project / ".fetchml/config.yaml", "socket: /tmp/project.sock\n")
    loaded = load_client_settings(cwd=project, env=env)
    assert resolve_target(loaded, env) == Target(socket_path="/tmp/project.sock")
    env["FETCHML_URL"] = "ws://127.0.0.1:1/ws"
    loaded = load_client_settings(cwd=project, env=env)
    assert resolve_target(loaded, env) == Target(url="ws://127.0.0.1:1/ws")
    loaded = load_client_settings(cwd=project, env=env, flags={"socket": "/tmp/flag.sock"})
    assert resolve_target(loaded, env) == Target(socket_path="/tmp/flag.sock")
    write(project / ".fetchml/config.yaml", "socket: /tmp/a.sock\nurl: ws://x:1/ws\n")
    with pytest.raises(ConfigError, match="keep only one"):
        resolve_target(load_client_settings(cwd=project, env={"HOME": str(home)}), env)
