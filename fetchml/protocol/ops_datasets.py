"""Ops of datasets: named, versioned data (see ops.py for the rest).

A dataset is a snapshot recorded under a name as version 1, 2, ...; jobs name the versions they
read. A reference is ``NAME``, ``NAME@V``, ``NAME:MOUNT`` or ``NAME@V:MOUNT``: without ``@V``
the latest version; with ``:MOUNT`` the job sees the data at that path inside its workspace,
otherwise at ``$FETCHML_DATA_DIR/NAME``. The daemon stores each job's references resolved
(``NAME@V`` or ``NAME@V:MOUNT``), so a job always reads the version it was queued with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypedDict

from fetchml.errors import BadRequest
from fetchml.protocol.schema import Arg, NoArgs, OpSpec

# Names become directory names in a job's data dir: no separators, dots or spaces up front.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_DESCRIPTION = 1000  # characters: a sentence or two, shown by `dataset info`
MAX_VERSION = 10**9

VERSION_FIELDS = ('"name", "version", "snapshot" (64 hex), "files", "bytes", "pushed_by", '
                  '"pushed_at" (epoch s), "description", "state"')


@dataclass(frozen=True)
class DatasetRef:
    """A parsed reference: which dataset, which version (None: the latest), where to mount."""

    name: str
    version: int | None = None
    mount: str | None = None

    def resolved(self, version: int) -> str:
        """The form stored with a job: ``NAME@V`` or ``NAME@V:MOUNT``."""
        return f"{self.name}@{version}" + (f":{self.mount}" if self.mount else "")

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise BadRequest(f"{name[:120]!r} is not a dataset name; use letters, digits, '.', '_' "
                         "and '-', starting with a letter or digit (at most 100)")
    return name


def parse_ref(text: str, *, allow_mount: bool = True) -> DatasetRef:
    """``NAME[@V][:MOUNT]`` as a DatasetRef; the mount is checked by the daemon's path rules."""
    ref, colon, mount = text.partition(":")
    name, at, version_text = ref.partition("@")
    check_name(name)
    version = None
    if at:
        if not version_text.isdigit() or not 0 < int(version_text) <= MAX_VERSION:
            raise BadRequest(f"{text[:120]!r} names version {version_text[:20]!r}; a version is "
                             "a positive number, as `fetchml dataset info NAME` lists them")
        version = int(version_text)
    if colon and not allow_mount:
        raise BadRequest(f"{text[:120]!r} has a mount point; give NAME or NAME@VERSION here")
    if colon and mount.startswith("/"):
        raise BadRequest(f"{text[:120]!r} has an absolute mount point; write NAME@V:PATH with "
                         "a path relative to the workspace")
    if colon and not mount.strip("/"):
        raise BadRequest(f"{text[:120]!r} has an empty mount point; write NAME@V:PATH with a "
                         "path inside the workspace")
    return DatasetRef(name, version, mount.strip("/") if colon else None)


def _name_ref(value: str) -> str | None:
    try:
        parse_ref(value, allow_mount=False)
    except BadRequest as exc:
        return f"is not NAME or NAME@VERSION ({exc.message})"
    return None


def _description(value: str) -> str | None:
    return None if len(value) <= MAX_DESCRIPTION else f"must be at most {MAX_DESCRIPTION} long"


class DatasetsPushArgs(TypedDict):
    name: str
    snapshot: str
    description: str


class DatasetArgs(TypedDict):
    name: str  # NAME or NAME@VERSION


DATASETS_PUSH = OpSpec(
    "datasets.push",
    "Records a stored snapshot (sync it first) as the next version of a dataset, created on its "
    "first push. When the latest version has the same snapshot, nothing new is recorded and "
    "that version is returned with created false.",
    args=(
        Arg("name", str, "dataset name: letters, digits, . _ -", required=True,
            check=lambda v: None if NAME_PATTERN.fullmatch(v) else "is not a dataset name"),
        Arg("snapshot", str, "snapshot id or unique prefix", required=True),
        Arg("description", str, "what this version holds", default="", check=_description),
    ),
    result=f'{{{VERSION_FIELDS} ("ready"), "created": bool}}',
    params=DatasetsPushArgs, permissions=("datasets:write",), audited=True,
)

DATASETS_LIST = OpSpec(
    "datasets.list",
    "Every dataset with at least one version: its owner, how many versions, the latest one.",
    result='{"datasets": [{"name", "owner", "versions": int, "latest": version}]}',
    params=NoArgs, permissions=("datasets:read",),
)

DATASETS_INFO = OpSpec(
    "datasets.info",
    "A dataset's versions, oldest first (or only the one named), and whether each is "
    "materialised on this host.",
    args=(Arg("name", str, "NAME or NAME@VERSION", required=True, check=_name_ref),),
    result=f'{{"name", "owner", "versions": [{{{VERSION_FIELDS} ("ready" or "removing"), '
           '"cached": bool}]}',
    params=DatasetArgs, permissions=("datasets:read",),
)

DATASETS_RM = OpSpec(
    "datasets.rm",
    "Removes one version (NAME@VERSION) or every version (NAME) of a dataset; refused with "
    "conflict while a held, queued or running job uses one. Its data is freed by the next "
    "garbage collection. Allowed to the dataset's owner, the version's pusher, and roles "
    "with datasets:delete:all.",
    args=(Arg("name", str, "NAME or NAME@VERSION", required=True, check=_name_ref),),
    result=f'{{"name", "removed": [{{{VERSION_FIELDS} ("removed")}}]}}',
    params=DatasetArgs, permissions=("datasets:write",), audited=True,
)

OPS: tuple[OpSpec[Any], ...] = (DATASETS_PUSH, DATASETS_LIST, DATASETS_INFO, DATASETS_RM)
