from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetchml.cas.ignore import TEMPLATE, IgnoreRules
from fetchml.errors import BadRequest
from tests.unit.cas.cas_helpers import make_tree, scan


def test_defaults() -> None:
    rules = IgnoreRules.load(Path("/nonexistent-project"))
    for path, is_dir in [
        (".git", True),
        (".git/config", False),
        (".fetchml", True),
        ("pkg/__pycache__", True),
        ("pkg/__pycache__/m.cpython-311.pyc", False),
        ("m.pyc", False),
        (".mypy_cache", True),
        ("sub/.pytest_cache", True),
        (".train.py.swp", False),
        ("x.swx", False),
        ("notes.txt~", False),
        ("4913", False),
        ("src/.#train.py", False),
    ]:
        assert rules.is_ignored(path, is_dir), path
    for path, is_dir in [
        ("train.py", False),
        ("venv", True),
        ("data", True),
        ("data/x.csv", False),
        (".gitignore", False),
        ("git", True),
        ("pyc", False),
        ("", True),
    ]:
        assert not rules.is_ignored(path, is_dir), path


def test_fetchmlignore_and_root_gitignore(project: Path) -> None:
    make_tree(
        project,
        {
            ".fetchmlignore": b"# comment\n/checkpoints/\n*.ckpt\n",
            ".gitignore": b"*.log\nbuild/\n",
        },
    )
    rules = IgnoreRules.load(project)
    assert rules.is_ignored("checkpoints", True)
    assert not rules.is_ignored("src/checkpoints", True)  # anchored to the root
    assert rules.is_ignored("deep/model.ckpt", False)
    assert rules.is_ignored("train.log", False)
    assert rules.is_ignored("pkg/build", True)
    assert rules.is_ignored("pkg/build/lib.so", False)  # under an ignored directory
    assert not rules.is_ignored("build", False)  # "build/" matches directories only


def test_nested_gitignore_is_scoped_to_its_directory(project: Path) -> None:
    make_tree(
        project,
        {
            "sub/.gitignore": b"*.tmp\n/local.txt\n!keep.tmp\n",
            ".gitignore": b"*.bak\nkeep.tmp\n",
        },
    )
    rules = IgnoreRules.load(project)
    assert rules.is_ignored("sub/a.tmp", False)
    assert rules.is_ignored("sub/deeper/a.tmp", False)
    assert not rules.is_ignored("a.tmp", False)  # outside sub/
    assert rules.is_ignored("sub/local.txt", False)
    assert not rules.is_ignored("sub/deeper/local.txt", False)  # anchored to sub/
    assert not rules.is_ignored("local.txt", False)
    assert rules.is_ignored("sub/x.bak", False)  # the root's rules still apply below
    # The deeper file wins: sub/ re-includes what the root ignores.
    assert not rules.is_ignored("sub/keep.tmp", False)
    assert rules.is_ignored("keep.tmp", False)


def test_negations_re_include_defaults_and_gitignored_files(project: Path) -> None:
    make_tree(
        project,
        {
            ".gitignore": b"data/\nsecret.env\n",
            ".fetchmlignore": b"!*.pyc\n!data/\n",
        },
    )
    rules = IgnoreRules.load(project)
    assert not rules.is_ignored("compiled.pyc", False)
    assert not rules.is_ignored("data", True)
    assert not rules.is_ignored("data/train.csv", False)
    assert rules.is_ignored("secret.env", False)
    # Git cannot re-include a file inside an ignored directory; neither can we.
    assert rules.is_ignored("__pycache__/m.pyc", False)


def test_extra_patterns_come_last(project: Path) -> None:
    make_tree(project, {".fetchmlignore": b"!keep.log\n"})
    rules = IgnoreRules.load(project, ["*.log", "!keep.log", "wandb/"])
    assert rules.is_ignored("run.log", False)
    assert not rules.is_ignored("keep.log", False)
    assert rules.is_ignored("wandb", True)


def test_a_virtualenv_is_found_by_pyvenv_cfg_not_by_name(project: Path) -> None:
    make_tree(
        project,
        {
            "myenv/pyvenv.cfg": b"home = /usr/bin\n",
            "myenv/lib/python3.11/site-packages/big.py": b"x",
            "venv/__init__.py": b"# a package that happens to be called venv\n",
            "data/__init__.py": b"# and one called data\n",
            "train.py": b"print('hi')\n",
        },
    )
    rules = IgnoreRules.load(project)
    assert rules.is_ignored("myenv", True)
    assert rules.is_ignored("myenv/lib/python3.11/site-packages/big.py", False)
    assert not rules.is_ignored("venv", True)
    assert not rules.is_ignored("data", True)
    paths = {entry.path for entry in scan(project).manifest.entries}
    assert paths == {"venv/__init__.py", "data/__init__.py", "train.py"}


def test_the_scanner_never_descends_into_ignored_directories(project: Path) -> None:
    make_tree(project, {"keep.py": b"", "junk/inner.py": b""})
    # A name that is not UTF-8: a scan that descended into junk/ would refuse it.
    (project / "junk").joinpath(os.fsdecode(b"bad-\xff")).write_bytes(b"")
    with pytest.raises(BadRequest, match="UTF-8"):
        scan(project)
    make_tree(project, {".fetchmlignore": b"junk/\n"})
    assert {e.path for e in scan(project).manifest.entries} == {".fetchmlignore", "keep.py"}


def test_invalid_pattern_files_are_reported(project: Path) -> None:
    make_tree(project, {".fetchmlignore": b"[z-a]\n"})
    with pytest.raises(BadRequest, match=r"\.fetchmlignore"):
        IgnoreRules.load(project)


def test_template_is_all_comments() -> None:
    lines = [line for line in TEMPLATE.splitlines() if line.strip()]
    assert lines and all(line.startswith("#") for line in lines)
