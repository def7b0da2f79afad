"""The GPU speed habits of a run, resolved once for the device it runs on: each is a setting (``training.compile``,
``fused_optimizer``, ``tf32``, ``channels_last``, ``pin_memory``) whose empty value means "on where it helps".

Why one place: the loop, the image task and the GPU benchmark must agree on what a config means on a given machine,
and a CUDA-only setting asked for on a CPU has to be refused by field name before any model is loaded — not ignored,
so a user who believes TF32 or pinned memory is on is told it cannot be. What each does and where it pays:

- ``compile``: ``torch.compile`` of the UNet. Steps get faster on a GPU once the first compile (minutes) is done; off
  by default because short runs and CPUs lose more to compiling than they win.
- ``fused_optimizer``: AdamW's fused kernel — one launch for all LoRA tensors instead of several per tensor.
- ``tf32``: TF32 tensor-core matmuls and convolutions for the fp32 work (Ampere = compute capability 8.0 and newer);
  bf16/fp16 autocast work is unaffected.
- ``channels_last``: NHWC layout for the UNet's convolutions, which tensor cores want under fp16/bf16.
- ``pin_memory``: cached latents and embeddings in page-locked RAM, so host→GPU copies are asynchronous
  (``non_blocking``) and overlap with compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig
from .errors import InputError

AMPERE = (8, 0)


@dataclass(frozen=True)
class SpeedSettings:
    compile: bool = False
    fused_optimizer: bool = False
    tf32: bool = False
    channels_last: bool = False
    pin_memory: bool = False


def _refuse_on_cpu(name: str, what: str) -> InputError:
    return InputError(f"training.{name}: {what} needs a CUDA GPU and this run is on the CPU; leave it empty "
                      f"(automatic) or set it to false")


def resolve(cfg: TrainConfig, device: torch.device) -> SpeedSettings:
    """The settings this run uses on ``device``; raises InputError naming the field for a CUDA-only setting
    asked for on a CPU (or TF32 on a GPU older than Ampere)."""
    t = cfg.training
    cuda = device.type == "cuda"
    if not cuda:
        if t.tf32:
            raise _refuse_on_cpu("tf32", "TF32")
        if t.pin_memory:
            raise _refuse_on_cpu("pin_memory", "pinned memory")
    capability = torch.cuda.get_device_capability(device) if cuda else (0, 0)
    if t.tf32 and capability < AMPERE:
        raise InputError(f"training.tf32: TF32 needs an Ampere or newer GPU (compute capability 8.0); this one is "
                         f"{capability[0]}.{capability[1]}; leave it empty or set it to false")
    half = t.mixed_precision in ("fp16", "bf16")
    adamw = t.optimizer == "adamw"
    return SpeedSettings(
        compile=t.compile,
        fused_optimizer=adamw and (t.fused_optimizer if t.fused_optimizer is not None else cuda),
        tf32=t.tf32 if t.tf32 is not None else capability >= AMPERE,
        channels_last=t.channels_last if t.channels_last is not None else cuda and half,
        pin_memory=t.pin_memory if t.pin_memory is not None else cuda)


def apply_backend(settings: SpeedSettings) -> None:
    """Process-wide switches (TF32) — set for every run, so one run's choice does not leak into the next."""
    torch.backends.cuda.matmul.allow_tf32 = settings.tf32
    torch.backends.cudnn.allow_tf32 = settings.tf32
