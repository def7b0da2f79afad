"""Low-rank maths shared by merge, resize and extract: the SVD of an update, choosing its rank, and writing the
factors back as a kohya LoRA module.

A LoRA update ``up @ down`` (or a sum of them, as concatenated factors) is decomposed through QR of the two thin
factors and an SVD of an r×r core — exact, and it never builds the full out×in matrix, which keeps SDXL-sized
resizes fast. Dense updates (LoHa, LoKr, checkpoint differences) take a full SVD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .lora_file import Module, ToolError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class Decomposition:
    u: torch.Tensor        # out × k
    s: torch.Tensor        # k singular values, descending
    vh: torch.Tensor       # k × in (flattened kernel)
    in_shape: tuple        # the down factor's shape after its first dim: (in,) or (in, kh, kw)


def svd_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``up @ down`` (out×r, r×in) via QR of both factors: up = Qu Ru, downᵀ = Qd Rd, so
    up @ down = Qu (Ru Rdᵀ) Qdᵀ and only the r×r core needs an SVD."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return (qu @ u).float(), s.float(), (vh @ qd.T).float()


def decompose_lora(ups: list[torch.Tensor], downs: list[torch.Tensor]) -> Decomposition:
    """The SVD of Σ upᵢ @ downᵢ (the scales already folded into the ups); conv factors are flattened."""
    in_shape = tuple(downs[0].shape[1:])
    up = torch.cat([u.float().flatten(1) for u in ups], dim=1)
    down = torch.cat([d.float().flatten(1) for d in downs], dim=0)
    u, s, vh = svd_factors(up, down)
    return Decomposition(u, s, vh, in_shape)


def decompose_dense(delta: torch.Tensor) -> Decomposition:
    """Full SVD of a dense update (out, in[, kh, kw])."""
    u, s, vh = torch.linalg.svd(delta.float().flatten(1), full_matrices=False)
    return Decomposition(u, s, vh, tuple(delta.shape[1:]))


def choose_rank(s: torch.Tensor, rank: Optional[int], method: Optional[str] = None,
                param: Optional[float] = None) -> int:
    """sd-scripts' resize rules: a fixed rank, or the smallest rank with ``sv_ratio`` (keep σ ≥ σ_max / param),
    ``sv_fro`` (retained Frobenius norm ≥ param) or ``sv_cumulative`` (Σσ kept / Σσ ≥ param), capped at ``rank``."""
    n = int((s > 0).sum().item()) or 1
    cap = min(rank or n, n, s.numel())
    if method is None:
        return max(1, cap)
    if method not in DYNAMIC_METHODS:
        raise ToolError(f"--dynamic {method}: one of {', '.join(DYNAMIC_METHODS)}")
    if param is None or param <= 0:
        raise ToolError(f"--param: {method} needs a positive number")
    if method == "sv_ratio":
        keep = int((s >= s[0] / param).sum().item())
    elif method == "sv_fro":
        energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        keep = int((energy.sqrt() < param - 1e-12).sum().item()) + 1
    else:
        cum = torch.cumsum(s.double(), 0) / s.double().sum()
        keep = int((cum < param - 1e-12).sum().item()) + 1
    return max(1, min(keep, cap))


def retained(s: torch.Tensor, r: int) -> float:
    """Share of the update's Frobenius norm kept at rank r (1.0 = exact)."""
    total = float((s.double() ** 2).sum())
    return 1.0 if total == 0 else float(((s[:r].double() ** 2).sum() / total).sqrt())


def relative_error(s: torch.Tensor, r: int) -> float:
    """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F — what the truncation loses, per module."""
    total = float((s.double() ** 2).sum())
    return 0.0 if total == 0 else float(((s[r:].double() ** 2).sum() / total).sqrt())


def to_module(name: str, dec: Decomposition, r: int) -> Module:
    """Rank-r factors split evenly (√σ on each side, which keeps fp16 storage in range) with alpha = r, so every
    loader's alpha/rank scale is 1."""
    root = dec.s[:r].clamp_min(0).sqrt()
    up = dec.u[:, :r] * root
    down = root[:, None] * dec.vh[:r]
    if len(dec.in_shape) == 3:
        down = down.reshape(r, *dec.in_shape)
        up = up.reshape(up.shape[0], r, 1, 1)
    return Module(name, {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
                         "alpha": torch.tensor(float(r))})
