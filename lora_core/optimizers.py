"""The optimizers people pick for LoRAs, built from maintained packages, and what each one costs in memory.

Why a table: every optimizer has a package to name when it is missing (a field error, not an ImportError at step 1),
a learning rate that makes sense for it (Prodigy and D-adaptation want 1.0, Adafactor with relative steps ignores
it), a device it needs, and a state size the memory plan must count. The loop only calls `make_optimizer`; sampling
and saving go through `evaluation_weights` so schedule-free optimizers show and save their averaged weights without
disturbing the training iterate (which keeps resume bit-exact). Optional packages are the ``optim`` extra:
``pip install lora-scripts[optim]``.
"""
from __future__ import annotations

import importlib.util
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from .errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used: the config (and so the daemon) reads this table
    import torch


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    package: Optional[str]  # the PyPI name to install, None for torch's own
    module: Optional[str]  # the import name that must be present
    default_lr: float  # the learning rate hint the form and the README show
    cuda_only: bool
    note: str


OPTIMIZERS: dict[str, OptimizerInfo] = {o.name: o for o in (
    OptimizerInfo("adamw", None, None, 1e-4, False, "torch AdamW; the safe default"),
    OptimizerInfo("adamw8bit", "bitsandbytes", "bitsandbytes", 1e-4, True,
                  "bitsandbytes AdamW8bit: a quarter of AdamW's state, CUDA only"),
    OptimizerInfo("prodigy", "prodigyopt", "prodigyopt", 1.0, False,
                  "Prodigy estimates the step size itself: keep learning_rate 1.0 (d_coef scales it)"),
    OptimizerInfo("adafactor", "transformers", "transformers", 1e-4, False,
                  "transformers Adafactor: factored second moments (tiny state); adafactor_relative_step ignores "
                  "learning_rate"),
    OptimizerInfo("lion", "lion-pytorch", "lion_pytorch", 3e-5, False,
                  "Lion (sign updates, one state tensor): use 3-10x lower learning_rate than AdamW"),
    OptimizerInfo("lion8bit", "bitsandbytes", "bitsandbytes", 3e-5, True, "bitsandbytes Lion8bit, CUDA only"),
    OptimizerInfo("schedulefree_adamw", "schedulefree", "schedulefree", 1e-3, False,
                  "schedule-free AdamW: no LR schedule (use constant + lr_warmup_steps); samples and saved files "
                  "use its averaged weights"),
    OptimizerInfo("came", "came-pytorch", "came_pytorch", 1e-4, False,
                  "CAME (confidence-guided Adafactor): factored state, AdamW-like learning rates"),
)}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def default_learning_rate(name: str) -> float:
    return OPTIMIZERS[name].default_lr


def optimizer_problems(cfg) -> list[str]:
    """Config-time checks, standard library only (before any model loads): the package is installed and the LR
    schedule suits the optimizer. CUDA-only optimizers are checked for the device when training starts
    (`make_optimizer`), where torch is loaded anyway."""
    t = cfg.training
    info = OPTIMIZERS.get(t.optimizer)
    if info is None:
        return []  # the choice check reports it
    problems = []
    if info.module and not info.cuda_only and importlib.util.find_spec(info.module) is None:
        problems.append(f"training.optimizer: {t.optimizer} needs the package {info.package} "
                        f"(pip install {info.package}, or pip install lora-scripts[optim]), got {t.optimizer!r}")
    if t.optimizer == "schedulefree_adamw" and t.lr_scheduler != "constant":
        problems.append(f"training.lr_scheduler: schedulefree_adamw schedules itself; use constant (warm-up comes "
                        f"from training.lr_warmup_steps), got {t.lr_scheduler!r}")
    return problems


def make_optimizer(cfg, groups: list[dict]) -> "torch.optim.Optimizer":
    """The configured optimizer over ``groups`` (each with its own ``lr``); schedule-free ones start in train mode."""
    import torch

    t = cfg.training
    name, lr, wd = t.optimizer, t.learning_rate, t.weight_decay
    info = OPTIMIZERS[name]
    if info.cuda_only and (t.device == "cpu" or not torch.cuda.is_available()):
        raise InputError(f"training.optimizer: {name} needs bitsandbytes and a CUDA GPU; use "
                         f"{'lion' if 'lion' in name else 'adamw'} on CPU, got {name!r}")
    if info.module and importlib.util.find_spec(info.module) is None:
        raise InputError(f"training.optimizer: {name} needs the package {info.package} "
                         f"(pip install {info.package}, or pip install lora-scripts[optim]), got {name!r}")
    problems = optimizer_problems(cfg)
    if problems:
        raise InputError("\n".join(problems))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    if name in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit
        return cls(groups, lr=lr, weight_decay=wd)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, weight_decay=wd, d_coef=t.prodigy_d_coef,
                       use_bias_correction=t.prodigy_use_bias_correction, safeguard_warmup=t.prodigy_safeguard_warmup)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        if t.adafactor_relative_step:
            # Adafactor's own step size (1/sqrt(step)); the group lr is kept only so LR schedulers have a number to
            # scale — Adafactor ignores it in this mode
            opt = Adafactor(groups, lr=None, relative_step=True, scale_parameter=True, warmup_init=False,
                            weight_decay=wd)
            for g in opt.param_groups:
                g["lr"] = g.get("lr") or lr
            return opt
        return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=wd)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, weight_decay=wd)
    if name == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(groups, lr=lr, weight_decay=wd, warmup_steps=t.lr_warmup_steps)
        opt.train()
        return opt
    if name == "came":
        from came_pytorch import CAME

        return CAME(groups, lr=lr, weight_decay=wd)
    raise InputError(f"training.optimizer: unknown optimizer {name!r}; one of {', '.join(OPTIMIZER_NAMES)}")


def _inner(optimizer):
    """accelerate wraps optimizers; schedule-free's train()/eval() live on the wrapped one."""
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer) -> bool:
    inner = _inner(optimizer)
    return hasattr(inner, "eval") and hasattr(inner, "train") and any("train_mode" in g for g in inner.param_groups)


@contextmanager
def evaluation_weights(optimizer) -> Iterator[None]:
    """Inside, the parameters hold the weights to show and save (a schedule-free optimizer's average x); after, they
    are put back bit for bit (copied, not re-interpolated), so sampling or saving never changes the training run."""
    if optimizer is None or not is_schedule_free(optimizer):
        yield
        return
    import torch

    inner = _inner(optimizer)
    params = [p for g in inner.param_groups for p in g["params"]]
    saved = [p.detach().clone() for p in params]
    modes = [g["train_mode"] for g in inner.param_groups]
    inner.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for g, mode in zip(inner.param_groups, modes):
            g["train_mode"] = mode


def _factored_bytes(shape: "torch.Size") -> int:
    """Adafactor/CAME's factored second moment: a row vector (all dims but the last) and a column vector (all but
    the second to last) for tensors of two or more dimensions, a full copy otherwise."""
    if len(shape) >= 2:
        return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])
    return 4 * math.prod(shape)


def optimizer_state_bytes(name: str, shapes: Sequence["torch.Size"]) -> int:
    """Bytes of optimizer state for trainable tensors of these shapes, as each implementation allocates it (tests
    compare it with the state a real step leaves behind). 8-bit states are one byte per element plus block scales."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if name == "adamw":
            total += 8 * n + 4  # exp_avg + exp_avg_sq + a 0-dim step tensor
        elif name == "schedulefree_adamw":
            total += 8 * n  # z + exp_avg_sq
        elif name == "prodigy":
            total += 16 * n  # p0, s, exp_avg, exp_avg_sq
        elif name == "lion":
            total += 4 * n
        elif name == "adamw8bit":
            total += 2 * n + 8 * math.ceil(n / 256)
        elif name == "lion8bit":
            total += n + 4 * math.ceil(n / 256)
        elif name == "adafactor":  # no first moment (beta1=None); RMS is a 0-dim tensor
            total += _factored_bytes(shape) + 4
        elif name == "came":  # exp_avg + factored exp_avg_sq + factored residual (matrices) + RMS
            total += 4 * n + _factored_bytes(shape) + (_factored_bytes(shape) if len(shape) >= 2 else 0) + 4
        else:
            raise KeyError(name)
    return total
