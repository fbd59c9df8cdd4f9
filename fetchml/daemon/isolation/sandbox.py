"""The command lines that run a job inside bubblewrap or a Podman container.

Both keep the paths the job knows: its workspace and outputs are mounted at the same absolute
paths as on the host, so ``FETCHML_OUTPUT_DIR`` and the dataset links stay valid inside.
Nothing a user sent ever becomes an option of bwrap or podman: user values appear only after
``--`` (bwrap) or the image name (podman), or inside a file the daemon writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fetchml.daemon.supervise.rundir import OUTPUTS_DIR, PRIVATE_FILES, WORK_DIR, RunDir
from fetchml.errors import BadRequest

# The system a sandboxed job sees, read-only; home directories, /root, /srv, /mnt, /media,
# /var and /run stay out of sight.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
                "/sys")
# Inside those, what a job must not read: the daemon's config, and credentials readable by a
# daemon running as root. Directories are covered by an empty tmpfs, files by /dev/null.
HIDDEN_PATHS = ("/etc/fetchml", "/etc/shadow", "/etc/gshadow", "/etc/ssh")
# Device nodes every GPU job needs besides its own /dev/nvidiaN.
GPU_SHARED_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                    "/dev/nvidia-caps")
CDI_SPECS = ("/etc/cdi/nvidia.yaml", "/var/run/cdi/nvidia.yaml", "/etc/cdi/nvidia.json",
             "/var/run/cdi/nvidia.json")
BWRAP_WRAPPER_DEPTH = 2  # bwrap, then its pid 1 in the new pid namespace, then the command
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Layout:
    """The paths of one attempt, as the job sees them (the same on both sides)."""

    run_dir: Path
    cwd: str
    state_dir: Path

    @property
    def work(self) -> Path:
        return RunDir(self.run_dir).work

    @property
    def outputs(self) -> Path:
        return RunDir(self.run_dir).outputs

    @property
    def datasets(self) -> Path:
        return self.state_dir / "datasets"

    def read_only_views(self) -> list[Path]:
        """Directories of the run besides work and outputs (the dataset links' data/)."""
        return [p for p in self._entries() if p.name not in (WORK_DIR, OUTPUTS_DIR) and p.is_dir()]

    def job_files(self) -> list[Path]:
        """Files made for the job in its run directory before it starts (a metrics file it
        appends to): writable. The supervisor's own files do not exist yet."""
        return [p for p in self._entries() if p.is_file() and p.name not in PRIVATE_FILES]

    def _entries(self) -> list[Path]:
        try:
            return sorted(p for p in self.run_dir.iterdir() if not p.is_symlink())
        except OSError:
            return []


def gpu_device_nodes(gpu_ids: Sequence[int], dev: Path = Path("/dev")) -> list[str]:
    """The device nodes a job with these GPUs needs: /dev/nvidiaN (N = the index, which is
    the minor number on a standard driver install) and the shared control nodes present."""
    if not gpu_ids:
        return []
    nodes = [str(dev / f"nvidia{i}") for i in sorted(gpu_ids)]
    shared = [str(dev / Path(n).name) for n in GPU_SHARED_NODES]
    return [n for n in nodes + shared if os.path.exists(n)]


def bwrap_argv(bwrap: str, layout: Layout, argv: Sequence[str], *, network: bool,
               gpu_ids: Sequence[int], hidden: Sequence[str] = HIDDEN_PATHS,
               dev: Path = Path("/dev")) -> list[str]:
    """bwrap's command line: a read-only system, a private /tmp, a minimal /dev with the job's
    GPUs only, the daemon's state hidden, the workspace and outputs writable, then argv."""
    args = [bwrap, "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL", "--new-session",
            "--die-with-parent"]  # the parent is the job's supervisor, never the daemon
    if not network:
        args.append("--unshare-net")
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in hidden:
        if os.path.isdir(path) and not os.path.islink(path):
            args += ["--tmpfs", path]
        elif os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm"]
    for node in gpu_device_nodes(gpu_ids, dev):
        args += ["--dev-bind", node, f"/dev/{Path(node).name}"]
    args += ["--tmpfs", "/tmp", "--tmpfs", "/run", "--tmpfs", "/var/tmp"]
    # An empty tmpfs over the state dir, should it lie in a visible tree; then only this run.
    args += ["--tmpfs", str(layout.state_dir)]
    if layout.datasets.is_dir():
        args += ["--ro-bind", str(layout.datasets), str(layout.datasets)]
    args += ["--bind", str(layout.work), str(layout.work)]
    args += ["--bind", str(layout.outputs), str(layout.outputs)]
    for file in layout.job_files():
        args += ["--bind", str(file), str(file)]
    for view in layout.read_only_views():
        args += ["--ro-bind", str(view), str(view)]
    # The sandbox's root is a tmpfs holding the mount points: read-only too, once they exist.
    args += ["--remount-ro", "/", "--chdir", layout.cwd, "--", *argv]
    return args


def command_visible(command: str, env: Mapping[str, str], visible: Sequence[str],
                    cwd: str) -> bool:
    """Whether the sandbox can find ``command``: a bare name must be on the job's PATH in a
    directory the sandbox shows; a path must lie in one."""
    if "/" in command:
        path = os.path.normpath(os.path.join(cwd, command))
        return _under(path, visible) and os.path.exists(path)
    for directory in os.get_exec_path(dict(env)):
        candidate = os.path.join(directory, command)
        if _under(candidate, visible) and os.path.isfile(candidate) \
                and os.access(candidate, os.X_OK):
            return True
    return False


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@dataclass(frozen=True)
class PodmanOptions:
    podman: str
    image: str
    name: str  # the container's name: fetchml-<daemon tag>-<job>-<attempt>
    network: bool
    rootless: bool
    memory: int | None = None
    pids: int | None = None
    cpus: tuple[int, ...] | None = None
    user: tuple[int, int, tuple[int, ...]] | None = None  # uid, gid, groups of the job


def podman_argv(options: PodmanOptions, layout: Layout, argv: Sequence[str],
                gpu_ids: Sequence[int]) -> list[str]:
    """``podman run`` for one attempt. The job's environment travels in an env file, so no
    user value is ever an argument before the image; the container runs with no capability,
    no new privileges and a read-only root."""
    args = [options.podman, "run", "--rm", "--init", f"--name={options.name}",
            "--cap-drop=all", "--security-opt=no-new-privileges", "--read-only",
            f"--env-file={RunDir(layout.run_dir).podman_env}", f"--workdir={layout.cwd}",
            f"--volume={layout.work}:{layout.work}:rw",
            f"--volume={layout.outputs}:{layout.outputs}:rw"]
    if options.rootless:
        args.append("--userns=keep-id")  # the job's files stay the daemon user's
    elif options.user is not None:  # rootful: the job's own uid, as without a container
        uid, gid, groups = options.user
        args.append(f"--user={uid}:{gid}")
        args += [f"--group-add={g}" for g in groups]
    if not options.network:
        args.append("--network=none")
    if layout.datasets.is_dir():
        args.append(f"--volume={layout.datasets}:{layout.datasets}:ro")
    args += [f"--volume={view}:{view}:ro" for view in layout.read_only_views()]
    args += [f"--volume={file}:{file}:rw" for file in layout.job_files()]
    if options.memory is not None:
        args += [f"--memory={options.memory}", f"--memory-swap={options.memory}"]
    if options.pids is not None:
        args.append(f"--pids-limit={options.pids}")
    if options.cpus is not None:
        args.append(f"--cpuset-cpus={','.join(str(c) for c in options.cpus)}")
    if gpu_ids and any(os.path.exists(spec) for spec in CDI_SPECS):
        args += [f"--device=nvidia.com/gpu={i}" for i in sorted(gpu_ids)]
    else:
        args += [f"--device={node}" for node in gpu_device_nodes(gpu_ids)]
    return [*args, options.image, *argv]


def podman_env_file(env: Mapping[str, str]) -> str:
    """The job's environment as podman's --env-file reads it: one NAME=VALUE per line."""
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise BadRequest(f"environment variable {name!r} cannot be passed into a container; "
                             "use letters, digits and underscores")
        if "\n" in value or "\r" in value:
            raise BadRequest(f"environment variable {name} holds a line break, which a "
                             "container's environment file cannot carry; remove it")
    return "".join(f"{name}={value}\n" for name, value in env.items())
