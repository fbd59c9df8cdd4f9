"""Fixtures for the content-addressed store tests: real stores and trees in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetchml.cas.objects import ObjectStore


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects")


@pytest.fixture
def snapshots(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "snapshots")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    return root
