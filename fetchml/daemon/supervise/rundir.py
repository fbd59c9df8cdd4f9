"""``RunDir``: one attempt's run directory, ``<state>/runs/<job>/<attempt>/``, and the name of
everything in it. Nothing else spells these names.

The daemon writes ``spec.json`` and makes ``work/`` (the materialised snapshot, the job's
cwd), ``outputs/`` (``$FETCHML_OUTPUT_DIR``), ``metrics.jsonl`` (``$FETCHML_METRICS_FILE``),
``data/`` (dataset links, when the job asked for datasets) and, for podman, ``podman.env``;
the supervisor writes ``supervisor.json`` once the job started, the job's output to
``output.log`` with its timestamps in ``output.idx``, its own diagnostics to
``supervisor.log``, and ``status.json`` last of all (into the space it set aside in
``.status.reserve`` when it started, should the disk be full by then); the daemon keeps the
training metrics in ``metrics.msgpack`` once the attempt ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPEC_FILE = "spec.json"
SUPERVISOR_FILE = "supervisor.json"
STATUS_FILE = "status.json"
STATUS_RESERVE = ".status.reserve"  # space set aside for status.json on a full disk
SUPERVISOR_LOG = "supervisor.log"
DEFAULT_LOG = "output.log"
INDEX_FILE_SUFFIX = ".idx"  # output.log -> output.idx
WORK_DIR = "work"
OUTPUTS_DIR = "outputs"
DATA_DIR = "data"
METRICS_FILE = "metrics.jsonl"  # what the job writes
SERIES_FILE = "metrics.msgpack"  # the daemon's bounded copy, written when the attempt ends
PODMAN_ENV_FILE = "podman.env"
# What the daemon and the supervisor keep there for themselves: never the job's to write.
PRIVATE_FILES = frozenset({SPEC_FILE, SUPERVISOR_FILE, STATUS_FILE, STATUS_RESERVE,
                           SUPERVISOR_LOG, DEFAULT_LOG,
                           Path(DEFAULT_LOG).with_suffix(INDEX_FILE_SUFFIX).name,
                           PODMAN_ENV_FILE})


def index_of(log: Path) -> Path:
    """The timestamp index kept beside a log: ``output.log`` -> ``output.idx``."""
    return log.with_suffix(INDEX_FILE_SUFFIX)


@dataclass(frozen=True)
class RunDir:
    """The paths of what one attempt's run directory, ``path``, holds."""

    path: Path

    @classmethod
    def of(cls, runs_dir: Path, job_id: int, attempt: int) -> RunDir:
        return cls(runs_dir / str(job_id) / str(attempt))

    @property
    def spec(self) -> Path:
        return self.path / SPEC_FILE

    @property
    def status_reserve(self) -> Path:
        return self.path / STATUS_RESERVE

    @property
    def supervisor(self) -> Path:
        return self.path / SUPERVISOR_FILE

    @property
    def status(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def supervisor_log(self) -> Path:
        return self.path / SUPERVISOR_LOG

    @property
    def log(self) -> Path:
        return self.path / DEFAULT_LOG

    @property
    def work(self) -> Path:
        return self.path / WORK_DIR

    @property
    def outputs(self) -> Path:
        return self.path / OUTPUTS_DIR

    @property
    def data(self) -> Path:
        return self.path / DATA_DIR

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def series(self) -> Path:
        return self.path / SERIES_FILE

    @property
    def podman_env(self) -> Path:
        return self.path / PODMAN_ENV_FILE
