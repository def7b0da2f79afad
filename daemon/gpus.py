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


def _nvidia_smi_memory() -> dict[str, float]:
    """Total memory per GPU index in MB, from nvidia-smi (empty when there is none)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed (%s); device memory unknown, so one run per device", e)
        return {}
    memory = {}
    for line in out.splitlines():
        index, _, total = line.partition(",")
        try:
            memory[index.strip()] = float(total.strip())
        except ValueError:
            continue
    return memory


def device_memory(slots: list[str], spec: Optional[str] = None) -> dict[str, float]:
    """Each slot's memory in MB, which decides how many runs share it (`lora_daemon.fair`): ``--device-memory-mb``
    as one number for every slot (``24000``) or per slot (``0=80000,1=24000``; how a CPU test gives its one slot a
    made-up card), else nvidia-smi's total for GPU slots. Slots left unknown run one job at a time."""
    if not spec:
        found = _nvidia_smi_memory() if any(s != CPU for s in slots) else {}
        return {s: found[s] for s in slots if s in found}
    memory: dict[str, float] = {}
    for part in spec.split(","):
        slot, sep, value = part.strip().rpartition("=")
        try:
            mb = float(value)
        except ValueError:
            raise ValueError(f"--device-memory-mb: {part.strip()!r} is not a size in MB (e.g. 24000 or 0=24000)") \
                from None
        if mb <= 0:
            raise ValueError(f"--device-memory-mb: {part.strip()!r}: the size must be above 0 MB")
        if not sep:
            return {s: mb for s in slots}
        if slot not in slots:
            raise ValueError(f"--device-memory-mb: {slot!r} is not one of this daemon's devices ({', '.join(slots)})")
        memory[slot] = mb
    return memory
