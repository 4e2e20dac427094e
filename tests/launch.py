"""Running a polyadapt command under `accelerate launch` with several CPU processes (DDP over gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def accelerate_launch(arguments: list[str], processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch -m polyadapt ARGUMENTS`` with ``processes`` CPU processes; returns the finished process."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = Path(shutil.which("accelerate") or "accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "polyadapt", *arguments,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
