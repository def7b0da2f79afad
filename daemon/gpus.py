"""Which devices the daemon schedules on: one worker slot per GPU, or one CPU slot when there is no GPU.

The daemon itself never imports torch (it would cost seconds of start-up and gigabytes of memory for nothing); it
asks ``nvidia-smi`` or takes the user's list. A slot's id becomes the child's ``CUDA_VISIBLE_DEVICES``.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Optional

log = logging.getLogger(__name__)

CPU = "cpu"


def _nvidia_smi() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed (%s); scheduling on the CPU", e)
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def detect_slots(requested: Optional[str] = None) -> list[str]:
    """Slots from ``--gpus 0,1`` / ``--gpus cpu``, else CUDA_VISIBLE_DEVICES, else nvidia-smi, else one CPU slot."""
    spec = requested if requested is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is not None and spec.strip():
        if spec.strip().lower() == CPU:
            return [CPU]
        slots = [s.strip() for s in spec.split(",") if s.strip()]
        if slots:
            return slots
    return _nvidia_smi() or [CPU]


def child_env(slot: str, base: Optional[dict] = None) -> dict:
    """The environment for a child on `slot`: it sees exactly its one GPU (or none)."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = "" if slot == CPU else slot
    return env
