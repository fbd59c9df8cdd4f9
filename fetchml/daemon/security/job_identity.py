"""Who a job runs as: never above its owner.

A daemon running as root runs each job as its owner, as Slurm does: a job of local root (the
identity of uid 0 on the Unix socket) as root; a job of a user mapped to a uid (the config's
``users: [{name, role, uid}]`` or ``fetchml user add --uid``) as that uid, with its primary
group and supplementary groups from the passwd and group databases when the uid is listed
there (else gid = uid and no groups); a job of a key-only user as the unprivileged
``job_user`` (a name or uid; by default ``fetchml-job`` when that user exists, which
``fetchml install-service`` creates, else ``nobody``). A daemon that is not root cannot switch
users: its jobs run as its own user.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fetchml.daemon.supervise.rundir import PRIVATE_FILES, RunDir
from fetchml.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

DEFAULT_JOB_USER = "fetchml-job"  # the system user install-service creates
NOBODY_UID = 65534  # `nobody` where the passwd database has no entry for it
MAX_ID = 2**32 - 2  # uid_t is 32 bits and -1 means "no id"
# What jobs of other users pass through in the state directory (each run is the job's own,
# the dataset cache is read-only); everything else there is the daemon's alone.
JOB_VISIBLE = frozenset({"runs", "datasets"})
STATE_DIR_MODE = 0o711  # search, never listing: a job reaches its run only by its path
# What a job of another user owns in its run directory: its workspace, outputs and files.
PRIVATE_DIR_MODE, PRIVATE_FILE_MODE = 0o700, 0o600
PROTECTED_HARDLINKS = "/proc/sys/fs/protected_hardlinks"


@dataclass(frozen=True)
class JobCredentials:
    """The uid, gid and supplementary groups a job runs with, and its passwd entry's name and
    home when it has one (they become USER, LOGNAME and HOME)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    name: str | None = None
    home: str | None = None


def credentials_of(uid: int) -> JobCredentials:
    """``uid`` with its groups from the passwd and group databases; gid = uid, no groups and
    no name when the uid is not listed."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return JobCredentials(uid, uid)
    try:  # what initgroups(3) would give a login of this user
        listed = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        listed = {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
    groups = sorted(listed - {entry.pw_gid})
    return JobCredentials(uid, entry.pw_gid, tuple(groups), entry.pw_name, entry.pw_dir)


def resolve_job_user(value: str | None) -> JobCredentials:
    """The ``job_user`` setting (a user name or a uid) as credentials; ConfigError for a name
    the host does not know or for root. Unset: ``fetchml-job`` if it exists, else nobody."""
    if value is None or not str(value).strip():
        try:
            return credentials_of(pwd.getpwnam(DEFAULT_JOB_USER).pw_uid)
        except KeyError:
            try:
                return credentials_of(pwd.getpwnam("nobody").pw_uid)
            except KeyError:
                return credentials_of(NOBODY_UID)
    text = str(value).strip()
    if text.isdigit():
        uid = int(text)
        if uid > MAX_ID:
            raise ConfigError(f"job_user {text} is not a uid; give a user name or a uid from 1 "
                              f"to {MAX_ID}")
    else:
        try:
            uid = pwd.getpwnam(text).pw_uid
        except KeyError:
            raise ConfigError(f"job_user {text!r} is not a user of this host; create it "
                              "(useradd --system fetchml-job) or give a uid") from None
    if uid == 0:
        raise ConfigError("job_user must not be root: it runs the jobs of key-only users; "
                          "name an unprivileged user such as fetchml-job or nobody")
    return credentials_of(uid)


class JobIdentities:
    """Maps a job's owner to the credentials its job runs with (None: the daemon's own user).

    ``mapped_uid(owner)`` is the uid an active user is mapped to, or None; ``root_name`` is the
    name local root's identity carries on the Unix socket.
    """

    def __init__(self, *, daemon_uid: int, root_name: str,
                 mapped_uid: Callable[[str], int | None], job_user: JobCredentials) -> None:
        self.switches = daemon_uid == 0  # only root can run a job as someone else
        self.root_name = root_name
        self.mapped_uid = mapped_uid
        self.job_user = job_user

    def of(self, owner: str) -> JobCredentials | None:
        if not self.switches or owner == self.root_name:
            return None  # the daemon's user: root for local root, or a non-root daemon's own
        uid = self.mapped_uid(owner)
        if uid is None:
            return self.job_user
        if uid == 0:
            return None  # an admin mapped this user to root
        return credentials_of(uid)

    def describe(self) -> str:
        if not self.switches:
            return f"as the daemon's user (uid {os.geteuid()}): only root can switch users"
        user = self.job_user
        who = f"{user.name} (uid {user.uid})" if user.name else f"uid {user.uid}"
        return f"as their owners; key-only users' jobs as {who}"


def guard_state_dir(state_dir: Path) -> None:
    """Before jobs run as other users: the state directory lets them through (0711) and
    nothing in it but runs/ and datasets/ keeps any permission for group or others (the
    secret, users.json, the job database, pins, the audit log, the object store). The dataset
    cache lets them through to the versions their jobs link to, and lists none."""
    os.chmod(state_dir, STATE_DIR_MODE)
    datasets = state_dir / "datasets"
    for passage, mode in ((datasets, STATE_DIR_MODE), (datasets / "cache", STATE_DIR_MODE),
                          (datasets / "seals", 0o700)):
        if passage.is_dir() and not passage.is_symlink():
            os.chmod(passage, mode)
    with os.scandir(state_dir) as entries:
        for entry in entries:
            if entry.name in JOB_VISIBLE:
                continue
            st = entry.stat(follow_symlinks=False)
            if (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) and st.st_mode & 0o077:
                os.chmod(entry.path, stat.S_IMODE(st.st_mode) & 0o700)
    try:
        with open(PROTECTED_HARDLINKS, encoding="ascii") as setting:
            protected = setting.read().strip() == "1"
    except OSError:
        protected = True  # not Linux's /proc: nothing to say
    if not protected:
        log.warning("fs.protected_hardlinks is off: a job could hard-link files of the state "
                    "directory it cannot read into its outputs; set it (sysctl "
                    "fs.protected_hardlinks=1)")


def hand_over_job_files(run_dir: Path, user: JobCredentials) -> None:
    """Give ``user`` what its job writes: the workspace (copies, never links into the object
    store, so owning them changes nothing stored), the outputs directory and the files made
    for it (the metrics file). The run directory itself and the supervisor's files stay the
    daemon's. Refused when ``user`` cannot reach the run directory."""
    blocked = first_unsearchable(run_dir, user)
    if blocked is not None:
        mode = stat.S_IMODE(os.stat(blocked).st_mode)
        raise Unavailable(f"uid {user.uid} cannot reach its run directory: {blocked} (mode "
                          f"{mode:04o}) does not let it through; give that directory o+x "
                          "(search, not read) or choose a state_dir whose parents do")
    layout = RunDir(run_dir)
    for top, dirs, files in os.walk(layout.work):  # never follows a link; only we wrote it
        os.chown(top, user.uid, user.gid, follow_symlinks=False)
        for name in [*dirs, *files]:
            os.chown(os.path.join(top, name), user.uid, user.gid, follow_symlinks=False)
    os.chown(layout.outputs, user.uid, user.gid, follow_symlinks=False)
    for mine in (layout.work, layout.outputs):  # the run directory lets anyone through
        os.chmod(mine, PRIVATE_DIR_MODE)
    with os.scandir(run_dir) as entries:
        for entry in entries:
            if entry.name not in PRIVATE_FILES and entry.is_file(follow_symlinks=False):
                os.chown(entry.path, user.uid, user.gid, follow_symlinks=False)
                os.chmod(entry.path, PRIVATE_FILE_MODE, follow_symlinks=False)


def home_of(user: JobCredentials, work: Path) -> str:
    """The user's home when it has one of its own, else the workspace: caches written under
    $HOME (pip, Hugging Face, Triton) need a directory the job may write."""
    if user.home:
        with contextlib.suppress(OSError):
            st = os.stat(user.home)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == user.uid:
                return user.home
    return str(work)


def first_unsearchable(path: Path, user: JobCredentials) -> Path | None:
    """The first directory from / down to ``path`` that ``user`` may not pass through."""
    groups = {user.gid, *user.groups}
    path = Path(os.path.abspath(path))
    for directory in [*reversed(path.parents), path]:
        st = os.stat(directory)
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return directory
    return None
