"""FLUX.1 LoRA files in the kohya format that Forge, ComfyUI and sd-scripts load (the FLUX task's export).

The trainer runs diffusers' ``FluxTransformer2DModel`` and peft adapts its layers under diffusers names, with
``to_q``/``to_k``/``to_v`` as separate layers. The files people load name Black Forest Labs' modules instead
(``lora_unet_double_blocks_0_img_attn_qkv``), where those three are one fused layer — and in a single block
``linear1`` fuses q, k, v *and* the MLP input ``proj_mlp``. Where each diffusers layer sits in the BFL model is
`lora_core.image.flux_keys`' table (the one place naming FLUX weights); this module only turns LoRAs into file keys.

Fusing is exact, by rank concatenation: for pieces i with LoRA (A_i: r_i × in, B_i: out_i × r_i, scale s_i =
alpha_i / r_i), the fused layer gets ``lora_down`` = cat(A_i) (R × in, R = Σ r_i) and a block-diagonal ``lora_up``
(total out × R: B_i in piece i's rows and columns, zeros elsewhere), so up @ down = the stacked B_i A_i. Every loader
scales a module by alpha / (its down's rows), here alpha / R: the file's alpha is s·R (= 3·alpha for three pieces of
the same rank and alpha), and a piece whose own s_i differs carries s_i / s in its block of ``lora_up``. A piece
that was not trained (``proj_mlp`` left out of the targets) is zero rows in ``lora_up``: the rest of the fused
layer is unchanged. ``norm_out.linear`` is BFL's ``final_layer.adaLN_modulation.1`` with its halves swapped, so the
rows of its ``lora_up`` are swapped too. ``format: diffusers`` keeps diffusers' names (``transformer.…lora_A``/
``lora_B``, as FluxPipeline.load_lora_weights reads them) with alpha folded into ``lora_B`` (`fold_alpha`).

`write_flux_lora` is what the FLUX task calls; it writes through `lora_core.image.export`, whose
``save_lora_file``/``training_metadata``/``save_diffusers_lora`` every family shares (the import points this way
only: export knows no FLUX). Metadata follows sd-scripts' FLUX trainer (``flux_train_network.py``):
``ss_base_model_version`` ``flux1``, ``ss_network_module`` ``networks.lora_flux``, ``modelspec.architecture``
``flux-1-dev/lora`` or ``flux-1-schnell/lora``, the BFL repository as ``modelspec.implementation``, no
``modelspec.prediction_type`` (FLUX is neither epsilon nor v), and its ``ss_`` FLUX training keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from .flux_keys import FluxDims, ModuleMap, module_table

PREFIX = "lora_unet"            # sd-scripts' LORA_PREFIX_FLUX ("make ComfyUI compatible")
BASE_MODEL_VERSION = "flux1"    # sd-scripts' MODEL_VERSION_FLUX_V1
NETWORK_MODULE = "networks.lora_flux"
ARCHITECTURES = {"dev": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora"}
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
LORA_PARTS = {"lora_A.weight", "lora_B.weight", "alpha"}
# the run's FLUX settings that `write_flux_lora` takes out of the metadata for `flux_metadata`
FLUX_SETTINGS = ("guidance_scale", "timestep_sampling", "discrete_flow_shift", "t5_max_length")
_INDEX = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)\.(\d+)\.")


class FluxExportError(ValueError):
    """A trained layer that no FLUX LoRA file can hold as it was trained (named, with what to do instead)."""


def file_module_name(bfl_module: str) -> str:
    """``double_blocks.0.img_attn.qkv`` → ``lora_unet_double_blocks_0_img_attn_qkv`` (the name ComfyUI derives from
    the BFL weight ``diffusion_model.double_blocks.0.img_attn.qkv.weight`` and sd-scripts from its module path)."""
    return f"{PREFIX}_{bfl_module.replace('.', '_')}"


def _scale(parts: Mapping[str, torch.Tensor]) -> float:
    return float(parts["alpha"]) / parts["lora_A.weight"].shape[0]


def _swap_rows(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse_pieces(pieces: list[tuple[slice, Mapping[str, torch.Tensor]]], out_rows: int) -> dict[str, torch.Tensor]:
    """One fused layer's LoRA from the LoRAs of the row ranges it is made of (see the module docstring): down =
    cat(A_i), up block-diagonal, alpha = s·R with s the first piece's alpha/rank (others' ratios folded into up)."""
    pieces = sorted(pieces, key=lambda p: p[0].start)
    ranks = [parts["lora_A.weight"].shape[0] for _, parts in pieces]
    total = sum(ranks)
    scale = _scale(pieces[0][1])
    first_b = pieces[0][1]["lora_B.weight"]
    down = torch.cat([parts["lora_A.weight"] for _, parts in pieces], dim=0)
    up = torch.zeros(out_rows, total, dtype=first_b.dtype)
    col = 0
    for (rows, parts), rank in zip(pieces, ranks):
        up[rows, col:col + rank] = parts["lora_B.weight"] * (_scale(parts) / scale)
        col += rank
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(scale * total)}


def _whole(entry: ModuleMap, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer BFL keeps whole: the LoRA's parts renamed (up's halves swapped for ``norm_out.linear``)."""
    up = parts["lora_B.weight"]
    return {"lora_down.weight": parts["lora_A.weight"],
            "lora_up.weight": _swap_rows(up) if entry.swap_halves else up, "alpha": parts["alpha"]}


def _table(modules: Mapping[str, object], dims: FluxDims) -> list[ModuleMap]:
    """Every module of a model big enough to hold the trained ones (block counts from the highest index named)."""
    def highest(kind: str) -> int:
        return max((int(m.group(1)) for n in modules if (m := _INDEX.match(n)) and n.startswith(kind + ".")),
                   default=-1)

    return module_table(highest("transformer_blocks") + 1, highest("single_transformer_blocks") + 1, dims,
                        guidance=True)


def kohya_flux_tensors(modules: Mapping[str, Mapping[str, torch.Tensor]], dims: FluxDims) -> dict[str, torch.Tensor]:
    """The transformer's adapted layers (diffusers names → parts, as `adapters.export_modules` gives them) as kohya
    FLUX keys, fused layers fused. Plain LoRA only: a LyCORIS layer (LoHa, LoKr, DoRA) cannot be fused by rank
    concatenation, and a layer the table does not know has no BFL name; both are errors naming the layer."""
    entries = {e.diffusers: e for e in _table(modules, dims)}
    out_rows: dict[str, int] = {}
    for e in entries.values():
        if e.rows is not None:
            out_rows[e.bfl] = max(out_rows.get(e.bfl, 0), e.rows.stop)
    fused: dict[str, list[tuple[slice, Mapping[str, torch.Tensor]]]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in modules.items():
        entry = entries.get(name)
        if entry is None:
            raise FluxExportError(f"{name}: not a weight-holding layer of a FLUX.1 transformer")
        if entry.kind != "linear":
            raise FluxExportError(f"{name}: a {entry.kind} layer cannot carry a LoRA in a FLUX file")
        if set(parts) != LORA_PARTS:
            raise FluxExportError(f"{name}: FLUX files hold plain LoRA only (q/k/v are fused by rank "
                                  f"concatenation, which LoHa/LoKr/DoRA parts {sorted(set(parts) - LORA_PARTS)} "
                                  f"cannot be); use network_type lora")
        if entry.rows is None:
            tensors.update({f"{file_module_name(entry.bfl)}.{k}": v for k, v in _whole(entry, parts).items()})
        else:
            fused.setdefault(entry.bfl, []).append((entry.rows, parts))
    for bfl, pieces in fused.items():
        tensors.update({f"{file_module_name(bfl)}.{k}": v for k, v in fuse_pieces(pieces, out_rows[bfl]).items()})
    return tensors


def flux_metadata(variant: str, *, guidance_scale: Optional[float] = None, timestep_sampling: Optional[str] = None,
                  discrete_flow_shift: Optional[float] = None, t5_max_length: Optional[int] = None
                  ) -> dict[str, Optional[str]]:
    """What a FLUX file says on top of the common ``ss_*``/``modelspec.*`` keys (`export.training_metadata`'s
    ``family_metadata``): the architecture by variant ("dev" or "schnell"), sd-scripts' FLUX keys; a None value
    removes a key that does not apply to FLUX (``modelspec.prediction_type``, ``ss_v2``, ``ss_clip_skip``)."""
    if variant not in ARCHITECTURES:
        raise ValueError(f"FLUX variant must be one of {sorted(ARCHITECTURES)}, got {variant!r}")
    meta: dict[str, Optional[str]] = {
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_network_module": NETWORK_MODULE,
        "modelspec.architecture": ARCHITECTURES[variant],
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.prediction_type": None, "ss_v2": None, "ss_clip_skip": None,
        "ss_model_prediction_type": "raw",  # the transformer's output is the flow itself (sd-scripts' "raw")
    }
    for key, value in (("ss_guidance_scale", guidance_scale), ("ss_timestep_sampling", timestep_sampling),
                       ("ss_discrete_flow_shift", discrete_flow_shift), ("ss_t5xxl_max_token_length", t5_max_length)):
        if value is not None:
            meta[key] = str(value)
    return meta


def fold_alpha(state: Mapping[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """``format: diffusers`` for FLUX: each ``lora_B`` scaled by alpha / rank, to be written with ``lora_alpha`` =
    rank. diffusers reads the alpha from the file's adapter metadata, but ComfyUI and Forge read the same
    ``transformer.…lora_A/lora_B`` keys and find no alpha there (they apply the LoRA at scale 1); folded, the file
    means the same to all of them."""
    scale = alpha / rank
    return {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in state.items()}


def write_flux_lora(path_stem: Path, modules: Mapping[str, Mapping[str, torch.Tensor]], dims: FluxDims,
                    variant: str, fmt: str, precision: str, metadata: dict) -> Path:
    """The run's LoRA file: ``fmt`` "kohya" (default) → ``<stem>.safetensors`` with BFL keys, q/k/v fused, and the
    FLUX ``ss_*``/``modelspec.*`` metadata; "diffusers" → folder ``<stem>`` with ``transformer.…lora_A/lora_B`` and
    alpha folded in (`fold_alpha`). ``modules``: `adapters.export_modules(transformer)`; ``metadata``: the keyword
    arguments of `export.training_metadata`, plus (optional) this run's ``guidance_scale``, ``timestep_sampling``,
    ``discrete_flow_shift`` and ``t5_max_length``, which go into the FLUX keys."""
    from .export import save_diffusers_lora, save_lora_file, training_metadata

    common = dict(metadata)
    flux = {key: common.pop(key) for key in FLUX_SETTINGS if key in common}
    if fmt == "diffusers":
        state = {f"{name}.{part}": value for name, parts in modules.items()
                 for part, value in parts.items() if part != "alpha"}
        rank, alpha = _one_rank_and_alpha(modules)
        return save_diffusers_lora(path_stem, fold_alpha(state, rank, alpha), [], rank, float(rank), precision,
                                   family="flux")
    common.update(base_model_version=BASE_MODEL_VERSION, network_module=NETWORK_MODULE)
    meta = training_metadata(**common, family_metadata=flux_metadata(variant, **flux))
    return save_lora_file(path_stem.with_suffix(".safetensors"), kohya_flux_tensors(modules, dims), meta, precision)


def _one_rank_and_alpha(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[int, float]:
    """The diffusers format stores one rank and one lora_alpha for the whole transformer (its adapter metadata)."""
    pairs = {(parts["lora_A.weight"].shape[0], float(parts["alpha"])) for parts in modules.values()}
    if len(pairs) != 1:
        raise FluxExportError(f"format diffusers: the layers have different ranks/alphas {sorted(pairs)}; the "
                              f"diffusers file holds one pair; use format kohya")
    return pairs.pop()
