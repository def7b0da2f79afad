"""``extract TUNED BASE --rank R --out FILE``: a LoRA from the difference of two checkpoints of one family.

For every layer a LoRA can name — the UNet's attention/transformer linears (and, with ``--conv-rank``, its 3×3
convolutions as LoCon) and the text encoders' attention/MLP linears — the difference ``tuned − base`` is cut to rank
R by SVD and written with the names sd-scripts uses for the family. Both files are streamed one tensor pair at a
time; layers that did not change (max |Δ| ≤ ``--min-diff``) are left out, as sd-scripts does for an untrained text
encoder. The reported error per module is the relative Frobenius norm the truncation loses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .ckpt_keys import checkpoint_family, module_map, single_file_checkpoint
from .lora_file import MixedFamiliesError, ToolError, check_output, save_tensors
from .lowrank import decompose_dense, relative_error, to_module
from .merge import lora_metadata
from .progress import NO_PROGRESS, Progress
from .stream import TensorReader


EDGE_CONVS = ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_input_blocks_0_0", "lora_unet_out_2")


def _wanted(name: str, target, conv: bool, text_encoder: bool) -> bool:
    """sd-scripts' extraction targets: transformer-block linears (and 1×1 projections), 3×3 convs of the
    resnets/samplers with ``--conv-rank``, the text encoders' attention/MLP linears."""
    if target.part == "te":
        return text_encoder
    if target.kind == "conv":
        return conv and name not in EDGE_CONVS
    return "_transformer_blocks_" in name or name.endswith(("_proj_in", "_proj_out"))


def extract_lora(tuned: str | Path, base: str | Path, out: str | Path, rank: int = 16,
                 conv_rank: Optional[int] = None, min_diff: float = 1e-6, text_encoder: bool = True,
                 precision: str = "fp16", force: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ToolError("--rank/--conv-rank: must be at least 1")
    out = check_output(out, force)
    with single_file_checkpoint(tuned, out.parent, "tuned model") as tuned_file, \
            single_file_checkpoint(base, out.parent, "base model") as base_file:
        tuned_family, tuned_header, _ = checkpoint_family(tuned_file, "tuned model")
        base_family, base_header, _ = checkpoint_family(base_file, "base model")
        if tuned_family != base_family:
            raise MixedFamiliesError(f"tuned model {Path(tuned).name} is {tuned_family} but base model "
                                     f"{Path(base).name} is {base_family}; extract from two models of one family")
        shapes = {k: v["shape"] for k, v in base_header.items()}
        mapping = module_map(shapes, base_family)
        jobs = [(name, target) for target, name in mapping.canonical.items()
                if _wanted(name, target, conv_rank is not None, text_encoder)]
        for name, target in jobs:
            if tuned_header.get(target.key, {}).get("shape") != shapes[target.key]:
                raise ToolError(f"tuned model {Path(tuned).name}: {target.key} is missing or shaped differently "
                                f"from the base; were both made from the same architecture?")
        tensors: dict[str, torch.Tensor] = {}
        errors: dict[str, float] = {}
        cache: dict[str, tuple] = {}
        with TensorReader(tuned_file) as t_reader, TensorReader(base_file) as b_reader:
            for i, (name, target) in enumerate(sorted(jobs, key=lambda j: j[1].key)):
                if target.key not in cache:
                    cache.clear()  # fused q/k/v share one tensor pair: keep only the current one
                    cache[target.key] = (t_reader.get(target.key).float(), b_reader.get(target.key).float())
                t_w, b_w = cache[target.key]
                diff = (t_w - b_w)[target.slice()]
                progress.update(i + 1, len(jobs), "extracting modules")
                if diff.numel() == 0 or float(diff.abs().max()) <= min_diff:
                    continue
                dec = decompose_dense(diff)
                r = min(conv_rank if target.kind == "conv" else rank, dec.s.numel())
                module = to_module(name, dec, r)
                for part, tensor in module.tensors.items():
                    tensors[f"{name}.{part}"] = tensor
                errors[name] = relative_error(dec.s, r)
    if not tensors:
        raise ToolError(f"{Path(tuned).name} and {Path(base).name}: no layer differs by more than --min-diff "
                        f"{min_diff}; nothing to extract")
    meta = lora_metadata(base_family, out, rank, rank,
                         {"lora_tools.extracted_from": {"tuned": Path(tuned).name, "base": Path(base).name,
                                                        "rank": rank, "conv_rank": conv_rank}})
    if conv_rank is not None:
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = f'{{"algo": "locon", "conv_dim": "{conv_rank}", "conv_alpha": "{conv_rank}"}}'
    save_tensors(out, tensors, meta, precision)
    progress.close()
    return {"output": str(out), "family": base_family, "modules": len(errors), "rank": rank,
            "conv_rank": conv_rank, "error_per_module": errors,
            "max_relative_error": max(errors.values()), "mean_relative_error": sum(errors.values()) / len(errors)}
