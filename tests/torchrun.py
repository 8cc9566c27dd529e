"""Launch a 2-process ``torchrun`` job (gloo, CPU) for the distributed tests, with a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(worker: Path | str, args: list[str], log_dir: Path, timeout: int) -> None:
    """Run ``worker`` (a script, or ``"-m"`` with the module first in ``args``) with ``args`` on 2
    processes; fail the test (with every rank's log) on an error or after ``timeout`` seconds (a
    hang in a collective)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # per-rank stdout/stderr files under log_dir; a session of its own, for the last-resort kill below
    cmd = [*launcher, "--log-dir", str(log_dir), "--redirects", "3", str(worker), *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers
        try:
            proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a hang in a collective?)\n{rank_logs(log_dir)}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{out[-3000:]}\n{rank_logs(log_dir)}")


def rank_log(log_dir: Path, rank: int, stream: str) -> str:
    return "".join(p.read_text(errors="replace") for p in log_dir.glob(f"**/attempt_0/{rank}/{stream}.log"))


def rank_logs(log_dir: Path) -> str:
    return "\n".join(
        f"--- rank {r} {s} ---\n{rank_log(log_dir, r, s)[-3000:]}" for r in (0, 1) for s in ("stdout", "stderr")
    )
