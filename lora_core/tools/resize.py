"""``resize FILE --rank R | --dynamic sv_ratio|sv_fro|sv_cumulative --param X``: a LoRA at a lower rank by SVD.

sd-scripts' ``resize_lora.py`` methods: a fixed rank, or per module the smallest rank that keeps σ ≥ σ_max/X
(``sv_ratio``), X of the Frobenius norm (``sv_fro``, also ``--fro-ratio X``) or X of the sum of singular values
(``sv_cumulative``), never above ``--rank``. Each module's retained energy is reported. LoHa/LoKr modules come out
as plain LoRA factors of their update.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .lora_file import ToolError, check_output, open_lora, save_tensors
from .lowrank import choose_rank, decompose_dense, decompose_lora, relative_error, retained, to_module
from .merge import _scaled_factors, lora_metadata, refuse_dora
from .progress import NO_PROGRESS, Progress


def resize_lora(path: str | Path, out: str | Path, rank: Optional[int] = None, method: Optional[str] = None,
                param: Optional[float] = None, precision: str = "fp16", force: bool = False,
                progress: Progress = NO_PROGRESS) -> dict:
    if rank is None and method is None:
        raise ToolError("resize: give --rank R, or --dynamic METHOD --param X (e.g. --fro-ratio 0.9)")
    if rank is not None and rank < 1:
        raise ToolError(f"--rank {rank}: must be at least 1")
    out = check_output(out, force)
    header = open_lora(path, load=False)
    refuse_dora([header], "resize")
    lora = open_lora(path)
    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, dict] = {}
    names = sorted(lora.modules)
    for i, name in enumerate(names):
        module = lora.modules[name]
        if module.kind in ("lora", "locon") and "lora_mid.weight" not in module.tensors:
            up, down = _scaled_factors(module, 1.0)
            dec = decompose_lora([up], [down])
        else:
            dec = decompose_dense(module.delta())
        r = choose_rank(dec.s, rank, method, param)
        new = to_module(name, dec, r)
        for part, tensor in new.tensors.items():
            tensors[f"{name}.{part}"] = tensor
        per_module[name] = {"rank_before": module.rank, "rank": r, "retained": retained(dec.s, r),
                            "relative_error": relative_error(dec.s, r)}
        progress.update(i + 1, len(names), "resizing modules")
    ranks = sorted({m["rank"] for m in per_module.values()})
    how = f"rank {rank}" if method is None else f"{method} {param} (max rank {rank or 'any'})"
    meta = dict(lora.metadata)
    meta.pop("sshs_model_hash", None)
    meta.update(lora_metadata(lora.family, out, max(ranks), max(ranks),
                              {"lora_tools.resized_from": {"file": Path(path).name, "method": how},
                               "ss_network_module": "networks.lora"}))
    if len(ranks) > 1:
        meta["ss_network_args"] = '{"dynamic": "' + how + '"}'
    save_tensors(out, tensors, meta, precision)
    progress.close()
    errors = [m["relative_error"] for m in per_module.values()]
    return {"output": str(out), "family": lora.family, "modules": len(names), "method": how,
            "rank": ranks[0] if len(ranks) == 1 else ranks, "per_module": per_module,
            "min_retained": min(m["retained"] for m in per_module.values()),
            "max_relative_error": max(errors), "mean_relative_error": sum(errors) / len(errors)}
