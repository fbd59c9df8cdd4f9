"""The README's layout section and ARCHITECTURE's module map name the packages that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fetchml"


def _layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def _daemon_packages() -> set[str]:
    return {p.name for p in (PACKAGE / "daemon").iterdir()
            if p.is_dir() and (p / "__init__.py").exists()}


def test_the_readme_layout_names_every_package_and_only_those() -> None:
    block = _layout_block()
    listed = re.findall(r"^  (\w+)(/|\.py)", block, re.M)
    for name, kind in listed:  # what it names exists
        assert (PACKAGE / (name + ".py" if kind == ".py" else name)).exists(), name
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages <= {name for name, kind in listed if kind == "/"}  # and none is missing
    assert set(re.findall(r"^    (\w+)/", block, re.M)) == _daemon_packages()


def test_the_module_map_has_a_line_per_daemon_package() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    mapped = set(re.findall(r"^\| `daemon/(\w+)/`", text, re.M))
    assert mapped == _daemon_packages()
