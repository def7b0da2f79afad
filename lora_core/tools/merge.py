"""``merge A:w1 B:w2 … --out C``: several LoRAs of one family as one file.

By concatenating ranks (default, exact): module by module, the ups scaled by weightᵢ·alphaᵢ/rankᵢ are stacked
beside each other and the downs below each other, so the result applies exactly as applying every input at its
weight (rank = the sum of the inputs' ranks). With ``--rank R`` the summed update is cut to rank R by SVD
(approximate); the error is reported per module. Inputs are checked from their headers first — a mixed-family set
or a DoRA file is refused before any tensor is read.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from .lora_file import (LoraFile, Module, ToolError, UnsupportedAdapterError, check_output, open_lora,
                        same_family, save_tensors)
from .lowrank import decompose_dense, decompose_lora, relative_error, to_module
from .progress import NO_PROGRESS, Progress

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                "sdxl": "stable-diffusion-xl-v1-base/lora"}


def refuse_dora(loras: list[LoraFile], command: str) -> None:
    for lora in loras:
        if any(m.is_dora for m in lora.modules.values()):
            raise UnsupportedAdapterError(f"{lora.path.name}: a DoRA file (dora_scale) — its magnitude rescaling is "
                                          f"not a sum of updates, so `{command}` cannot combine it; bake it into a "
                                          f"model instead")


def lora_metadata(family: str, out: Path, rank, alpha, extra: dict) -> dict[str, str]:
    """Enough sd-scripts/modelspec metadata that the WebUI and civitai place the file (family, rank, title)."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": BASE_VERSION[family], "ss_v2": str(family == "sd2"),
            "ss_output_name": out.stem, "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": ARCHITECTURE[family], "modelspec.title": out.stem}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def _scaled_factors(module: Module, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) whose product is weight·alpha/rank·up@down, the scale split evenly (sign on the up)."""
    s = weight * module.scale()
    root = math.sqrt(abs(s))
    up = module.tensors["lora_up.weight"].float() * (root if s >= 0 else -root)
    return up, module.tensors["lora_down.weight"].float() * root


def concat_module(name: str, parts: list[tuple[Module, float]]) -> Module:
    ups, downs = [], []
    for module, weight in parts:
        if module.kind not in ("lora", "locon") or "lora_mid.weight" in module.tensors:
            raise UnsupportedAdapterError(f"module {name}: {module.kind} weights cannot be concatenated exactly; "
                                          f"merge with --rank R (SVD) instead")
        up, down = _scaled_factors(module, weight)
        ups.append(up)
        downs.append(down)
    if len({tuple(d.shape[1:]) for d in downs}) > 1:
        raise ToolError(f"module {name}: the inputs' factors have different shapes "
                        f"({', '.join(str(tuple(d.shape)) for d in downs)}); merge with --rank R instead")
    up = torch.cat(ups, dim=1)
    down = torch.cat(downs, dim=0)
    rank = down.shape[0]
    return Module(name, {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(rank))})


def svd_module(name: str, parts: list[tuple[Module, float]], rank: int) -> tuple[Module, float]:
    """The weighted sum cut to ``rank``; returns the module and its relative Frobenius error."""
    if all(m.kind in ("lora", "locon") and "lora_mid.weight" not in m.tensors for m, _ in parts) and \
            len({tuple(m.tensors["lora_down.weight"].shape[1:]) for m, _ in parts}) == 1:
        ups, downs = zip(*(_scaled_factors(m, w) for m, w in parts))
        dec = decompose_lora(list(ups), list(downs))
    else:
        dense = None
        for module, weight in parts:
            d = module.delta() * weight
            dense = d if dense is None else dense + d.reshape(dense.shape)
        dec = decompose_dense(dense)
    r = max(1, min(rank, dec.s.numel()))
    return to_module(name, dec, r), relative_error(dec.s, r)


def merge_loras(inputs: list[tuple[str | Path, float]], out: str | Path, rank: Optional[int] = None,
                precision: str = "fp16", force: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    """Write the combination of ``inputs`` ((file, weight) pairs) to ``out``; returns a report (modules, rank,
    per-module error for SVD merges)."""
    if not inputs:
        raise ToolError("merge: give at least one LoRA (FILE or FILE:WEIGHT)")
    if rank is not None and rank < 1:
        raise ToolError(f"--rank {rank}: must be at least 1")
    out = check_output(out, force)
    headers = [open_lora(path, load=False) for path, _ in inputs]
    family = same_family(headers)
    refuse_dora(headers, "merge")
    loras = [open_lora(path) for path, _ in inputs]
    names = sorted({name for lora in loras for name in lora.modules})
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for i, name in enumerate(names):
        parts = [(lora.modules[name], weight) for lora, (_, weight) in zip(loras, inputs) if name in lora.modules]
        if rank is None:
            module = concat_module(name, parts)
        else:
            module, errors[name] = svd_module(name, parts, rank)
        for part, tensor in module.tensors.items():
            tensors[f"{name}.{part}"] = tensor
        progress.update(i + 1, len(names), "merging modules")
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_down.weight")})
    sources = [{"file": Path(p).name, "weight": w, "hash": lora.metadata.get("sshs_model_hash")}
               for (p, w), lora in zip(inputs, loras)]
    shown_rank = ranks[0] if len(ranks) == 1 else max(ranks)
    meta = lora_metadata(family, out, shown_rank, shown_rank,
                         {"lora_tools.merged_from": sources,
                          "lora_tools.method": "concat" if rank is None else f"svd rank {rank}"})
    save_tensors(out, tensors, meta, precision)
    progress.close()
    report = {"output": str(out), "family": family, "modules": len(names),
              "method": "concat" if rank is None else "svd", "rank": ranks[0] if len(ranks) == 1 else ranks}
    if errors:
        report["error_per_module"] = errors
        report["max_relative_error"] = max(errors.values())
        report["mean_relative_error"] = sum(errors.values()) / len(errors)
    return report
