"""Check GPU assignment on a real NVIDIA machine: a 1-GPU job sees exactly its GPU.

Starts a throwaway daemon with real GPU detection (NVML or nvidia-smi), queues a job asking for
one GPU and one asking for none, and prints what each job saw: CUDA_VISIBLE_DEVICES,
`nvidia-smi -L` and, when PyTorch is installed, torch.cuda.device_count(). Exits non-zero if a
job saw the wrong GPUs.  Usage: python scripts/gpu_check.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fetchml.client.local_daemon import LocalDaemon, clean_env  # noqa: E402
from fetchml.errors import DaemonUnreachable  # noqa: E402

PROBE = r"""
import json, os, subprocess
seen = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "NVIDIA_VISIBLE_DEVICES": os.environ.get("NVIDIA_VISIBLE_DEVICES"),
        "FETCHML_GPU_IDS": os.environ.get("FETCHML_GPU_IDS")}
try:
    seen["nvidia-smi -L"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                                           text=True).stdout.strip()
except OSError as exc:
    seen["nvidia-smi -L"] = f"unavailable: {exc}"
try:
    import torch
    seen["torch.cuda.device_count"] = torch.cuda.device_count()
    if torch.cuda.device_count():
        seen["torch device 0"] = torch.cuda.get_device_name(0)
        x = torch.ones(1024, 1024, device="cuda")
        seen["matmul ok"] = float((x @ x).sum()) == 1024.0 ** 3
except ImportError:
    seen["torch.cuda.device_count"] = "torch not installed"
print("PROBE " + json.dumps(seen))
"""


def fetchml(*args: str, env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "fetchml", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    print(f"$ fetchml {' '.join(args)}\n{done.stdout}{done.stderr}", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"fetchml {args[0]} failed with {done.returncode}")
    return done.stdout


def probe_of(job: str, env: dict[str, str], cwd: Path) -> dict[str, object]:
    out = fetchml("logs", job, env=env, cwd=cwd)
    line = next(line for line in out.splitlines() if line.startswith("PROBE "))
    return dict(json.loads(line[6:]))


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="fml-gpu-", dir="/tmp"))
    daemon = LocalDaemon(root / "state", clean_env(), log_path=root / "daemon.log")
    try:
        try:
            daemon.start()
        except DaemonUnreachable as exc:
            print(exc.message)
            return 1
        env = daemon.cli_env()
        project = root / "project"
        project.mkdir()
        (project / "probe.py").write_text(PROBE)
        info = json.loads(fetchml("info", "--json", env=env, cwd=project))
        gpus = info["host"]["gpus"]
        if not gpus:
            print("no GPU detected on this machine")
            return 1
        one = json.loads(fetchml("queue", "--json", "--gpus", "1", "--", "python3", "probe.py",
                                 env=env, cwd=project))["jobs"][0]["id"]
        none = json.loads(fetchml("queue", "--json", "--", "python3", "probe.py", env=env,
                                  cwd=project))["jobs"][0]["id"]
        fetchml("wait", str(one), str(none), env=env, cwd=project)
        status = json.loads(fetchml("status", str(one), "--json", env=env, cwd=project))
        with_gpu, without = probe_of(str(one), env, project), probe_of(str(none), env, project)
        expected_uuid = next(g["uuid"] for g in gpus if g["index"] == status["gpus"][0])
        checks = {
            "1-GPU job got one GPU id": len(status["gpus"]) == 1,
            "1-GPU job sees exactly its GPU (CUDA_VISIBLE_DEVICES)":
                with_gpu["CUDA_VISIBLE_DEVICES"] == expected_uuid,
            "0-GPU job sees no GPU (CUDA_VISIBLE_DEVICES)": without["CUDA_VISIBLE_DEVICES"] == "",
        }
        if isinstance(with_gpu["torch.cuda.device_count"], int):
            checks["torch in the 1-GPU job: device_count == 1"] = (
                with_gpu["torch.cuda.device_count"] == 1)
            checks["torch in the 0-GPU job: device_count == 0"] = (
                without["torch.cuda.device_count"] == 0)
        for name, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
        return 0 if all(checks.values()) else 1
    finally:
        if daemon.running:
            daemon.stop(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
