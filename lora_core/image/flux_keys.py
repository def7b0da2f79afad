"""FLUX.1 transformer key names: the ONE table between Black Forest Labs' original names (BFL: what single-file
checkpoints, Forge, ComfyUI and kohya's FLUX LoRA names use) and diffusers' ``FluxTransformer2DModel`` names.

Why a table of our own: the trainer runs the diffusers model, the files people use name the BFL modules, and the two
differ in more than names — BFL fuses layers that diffusers keeps apart:

* double block ``double_blocks.N.img_attn.qkv`` = rows of diffusers ``transformer_blocks.N.attn.to_q``, ``to_k``,
  ``to_v`` stacked (each ``inner_dim`` rows); ``txt_attn.qkv`` = ``add_q_proj``, ``add_k_proj``, ``add_v_proj``;
* single block ``single_blocks.N.linear1`` = ``attn.to_q``, ``attn.to_k``, ``attn.to_v`` (``inner_dim`` rows each)
  then ``proj_mlp`` (``mlp_hidden_dim`` rows); ``linear2`` = ``proj_out`` (one layer, no slicing);
* ``final_layer.adaLN_modulation.1`` = diffusers ``norm_out.linear`` with its two halves swapped (BFL: shift, scale;
  diffusers: scale, shift);
* RMS norms: BFL ``…query_norm.scale`` = diffusers ``…norm_q.weight``.

diffusers ships a reader (``convert_flux_transformer_checkpoint_to_diffusers``), but it hard-codes the full model's
width (3072) and so cannot read a narrow model; it writes nothing back. tests/test_flux_model.py checks this table
against that converter at the real FLUX shape (tensors one column wide, so it costs nothing).

The API (other modules name FLUX keys only through it):

    bfl_name("transformer_blocks.0.attn.to_k", dims)        -> ("double_blocks.0.img_attn.qkv", slice(D, 2D))
    bfl_name("single_transformer_blocks.3.proj_mlp", dims)  -> ("single_blocks.3.linear1", slice(3D, 3D + M))
    bfl_name("single_transformer_blocks.3.proj_out", dims)  -> ("single_blocks.3.linear2", None)
    module_map(name, dims)  -> the full `ModuleMap` (kind, rows, swap_halves) of one diffusers module
    module_table(num_double, num_single, dims, guidance)    -> every `ModuleMap` of a model
    diffusers_to_bfl(state, dims) / bfl_to_diffusers(state, dims): whole transformer state dicts
    FluxDims.from_config(transformer.config), infer_config(bfl_state) (dims, block counts, dev/schnell)

Hand-off to the exporter (flux-file helper, lora_core/image/flux_export.py): the training task (flux_task.py,
``FluxTask.export``) makes ONE call, ``flux_export.write_flux_lora(path_stem, modules, dims, variant, fmt,
save_precision, metadata)`` — ``modules`` = `adapters.export_modules(transformer)` ({diffusers module name:
{"lora_A.weight", "lora_B.weight", "alpha"}}), ``dims`` a `FluxDims`, ``variant`` "dev"/"schnell", ``fmt``
cfg.output.format ("kohya"/"diffusers"), ``metadata`` the keyword arguments of `export.training_metadata` — and
expects the written Path back. If you shape it differently, change that one call and say so.

``dims`` (`FluxDims`) default to the real FLUX.1 shape (inner 3072, MLP 12288); slices are row ranges (dim 0 of the
BFL weight, i.e. the output features). Where the full-checkpoint prefixes live (Forge/ComfyUI layout) is named
here too: `TRANSFORMER_PREFIX`, `VAE_PREFIXES`, `CLIP_PREFIX`, `T5_PREFIX`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

if TYPE_CHECKING:  # torch is imported where tensors are cut: the daemon's preflight reads the names without it
    import torch

# where each part sits in a full single file as Forge and ComfyUI keep it (a transformer-only file has no prefix)
TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIXES = ("vae.", "first_stage_model.")
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
# a key that only a FLUX.1 transformer has (Forge's own test key, without the prefix)
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"


@dataclass(frozen=True)
class FluxDims:
    """The two widths the fused layers are cut by: attention width (heads × head dim) and the MLP's hidden width."""
    inner_dim: int = 3072
    mlp_hidden_dim: int = 12288

    @classmethod
    def from_config(cls, config: Mapping) -> "FluxDims":
        """From a ``FluxTransformer2DModel.config`` (diffusers' MLP ratio is fixed at 4)."""
        inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return cls(inner, 4 * inner)


@dataclass(frozen=True)
class ModuleMap:
    """One diffusers module and where its weights live in the BFL model.

    ``rows``: the BFL module's output rows it occupies (None: all of them); ``kind``: "linear" (weight + bias) or
    "norm" (RMSNorm: diffusers ``weight`` = BFL ``scale``); ``swap_halves``: the two output halves are in the other
    order (``norm_out.linear``)."""
    diffusers: str
    bfl: str
    rows: Optional[slice] = None
    kind: str = "linear"
    swap_halves: bool = False

    @property
    def params(self) -> tuple[tuple[str, str], ...]:
        """(diffusers parameter suffix, BFL parameter suffix) pairs."""
        return (("weight", "scale"),) if self.kind == "norm" else (("weight", "weight"), ("bias", "bias"))


def _double(i: int, dims: FluxDims) -> list[ModuleMap]:
    d, b, D = f"transformer_blocks.{i}.", f"double_blocks.{i}.", dims.inner_dim
    thirds = [slice(0, D), slice(D, 2 * D), slice(2 * D, 3 * D)]
    out = [ModuleMap(d + "norm1.linear", b + "img_mod.lin"), ModuleMap(d + "norm1_context.linear", b + "txt_mod.lin")]
    out += [ModuleMap(d + f"attn.to_{x}", b + "img_attn.qkv", rows) for x, rows in zip("qkv", thirds)]
    out += [ModuleMap(d + f"attn.add_{x}_proj", b + "txt_attn.qkv", rows) for x, rows in zip("qkv", thirds)]
    out += [ModuleMap(d + "attn.norm_q", b + "img_attn.norm.query_norm", kind="norm"),
            ModuleMap(d + "attn.norm_k", b + "img_attn.norm.key_norm", kind="norm"),
            ModuleMap(d + "attn.norm_added_q", b + "txt_attn.norm.query_norm", kind="norm"),
            ModuleMap(d + "attn.norm_added_k", b + "txt_attn.norm.key_norm", kind="norm"),
            ModuleMap(d + "attn.to_out.0", b + "img_attn.proj"),
            ModuleMap(d + "attn.to_add_out", b + "txt_attn.proj"),
            ModuleMap(d + "ff.net.0.proj", b + "img_mlp.0"), ModuleMap(d + "ff.net.2", b + "img_mlp.2"),
            ModuleMap(d + "ff_context.net.0.proj", b + "txt_mlp.0"), ModuleMap(d + "ff_context.net.2", b + "txt_mlp.2")]
    return out


def _single(i: int, dims: FluxDims) -> list[ModuleMap]:
    d, b, D, M = f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", dims.inner_dim, dims.mlp_hidden_dim
    out = [ModuleMap(d + "norm.linear", b + "modulation.lin")]
    out += [ModuleMap(d + f"attn.to_{x}", b + "linear1", slice(k * D, (k + 1) * D)) for k, x in enumerate("qkv")]
    out += [ModuleMap(d + "proj_mlp", b + "linear1", slice(3 * D, 3 * D + M)),
            ModuleMap(d + "attn.norm_q", b + "norm.query_norm", kind="norm"),
            ModuleMap(d + "attn.norm_k", b + "norm.key_norm", kind="norm"),
            ModuleMap(d + "proj_out", b + "linear2")]
    return out


GLOBAL = [("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
          ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
          ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
          ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
          ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear")]
GUIDANCE = [("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
            ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")]


def module_table(num_double: int, num_single: int, dims: FluxDims = FluxDims(),
                 guidance: bool = True) -> list[ModuleMap]:
    """Every weight-holding module of a FLUX.1 transformer (dev has the guidance embedder, schnell has not)."""
    out = [ModuleMap(a, b) for a, b in GLOBAL + (GUIDANCE if guidance else [])]
    out.append(ModuleMap("norm_out.linear", "final_layer.adaLN_modulation.1", swap_halves=True))
    for i in range(num_double):
        out += _double(i, dims)
    for i in range(num_single):
        out += _single(i, dims)
    return out


_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def module_map(diffusers_module: str, dims: FluxDims = FluxDims()) -> ModuleMap:
    """The `ModuleMap` of one diffusers module name (a block module or a global one); KeyError names an unknown one."""
    m = _BLOCK.match(diffusers_module)
    if m:
        i = int(m.group(2))
        entries = _double(i, dims) if m.group(1) == "transformer_blocks" else _single(i, dims)
    else:
        entries = module_table(0, 0, dims, guidance=True)
    for entry in entries:
        if entry.diffusers == diffusers_module:
            return entry
    raise KeyError(f"{diffusers_module!r} is not a weight-holding module of a FLUX.1 transformer")


def bfl_name(diffusers_module: str, dims: FluxDims = FluxDims()) -> tuple[str, Optional[slice]]:
    """(BFL module name, the rows of its output this module is, or None for the whole layer). For
    ``norm_out.linear`` the whole layer comes back, but its halves are swapped (see `module_map`)."""
    entry = module_map(diffusers_module, dims)
    return entry.bfl, entry.rows


def _block_counts(keys: Iterable[str], double: str, single: str) -> tuple[int, int]:
    keys = list(keys)
    nd = {int(m.group(1)) for k in keys if (m := re.match(re.escape(double) + r"(\d+)\.", k))}
    ns = {int(m.group(1)) for k in keys if (m := re.match(re.escape(single) + r"(\d+)\.", k))}
    return (max(nd) + 1 if nd else 0), (max(ns) + 1 if ns else 0)


def _swap(t: "torch.Tensor") -> "torch.Tensor":
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], dims: FluxDims) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer state dict → BFL names, the fused layers concatenated along their rows. Every
    tensor must be used: a leftover is an error (it would be silently missing from the written file)."""
    keys = list(state)
    nd, ns = _block_counts(keys, "transformer_blocks.", "single_transformer_blocks.")
    guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in keys)
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    used = set()
    for entry in module_table(nd, ns, dims, guidance):
        for dsuf, bsuf in entry.params:
            name = f"{entry.diffusers}.{dsuf}"
            if name not in state:
                raise KeyError(f"diffusers FLUX state dict has no {name}")
            t = _swap(state[name]) if entry.swap_halves else state[name]
            parts.setdefault(f"{entry.bfl}.{bsuf}", []).append((entry.rows.start if entry.rows else 0, t))
            used.add(name)
    left = [k for k in keys if k not in used]
    if left:
        raise KeyError(f"diffusers FLUX tensors with no BFL name: {left[:5]}")
    import torch

    return {k: v[0][1] if len(v) == 1 else torch.cat([t for _, t in sorted(v, key=lambda p: p[0])], dim=0)
            for k, v in parts.items()}


def bfl_to_diffusers(state: Mapping[str, torch.Tensor], dims: Optional[FluxDims] = None) -> dict[str, torch.Tensor]:
    """A BFL transformer state dict (with or without ``model.diffusion_model.``) → diffusers names, the fused
    layers cut by rows. Unknown keys are an error naming them (a newer variant we would load wrong)."""
    state = {k[len(TRANSFORMER_PREFIX):] if k.startswith(TRANSFORMER_PREFIX) else k: v for k, v in state.items()}
    dims = dims or infer_config(state)["dims"]
    nd, ns = _block_counts(list(state), "double_blocks.", "single_blocks.")
    guidance = "guidance_in.in_layer.weight" in state
    out: dict[str, torch.Tensor] = {}
    used = set()
    for entry in module_table(nd, ns, dims, guidance):
        for dsuf, bsuf in entry.params:
            name = f"{entry.bfl}.{bsuf}"
            if name not in state:
                raise KeyError(f"FLUX checkpoint has no {name}")
            t = state[name][entry.rows] if entry.rows is not None else state[name]
            out[f"{entry.diffusers}.{dsuf}"] = _swap(t) if entry.swap_halves else t
            used.add(name)
    left = [k for k in state if k not in used]
    if left:
        raise KeyError(f"FLUX checkpoint tensors this trainer does not know: {left[:5]}")
    return out


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The rotary axes (time, height, width) for a head width: FLUX.1's (16, 56, 56) at 128; narrower heads (tiny
    models) get the same proportions, each axis even. The weights do not record them, so reader and writer must
    agree on this one rule."""
    if head_dim == 128:
        return 16, 56, 56
    a = max(2, 2 * round(head_dim / 16))
    b = (head_dim - a) // 2 // 2 * 2
    return a, b, head_dim - a - b


def infer_config(state: Mapping[str, torch.Tensor]) -> dict:
    """The ``FluxTransformer2DModel`` config of a BFL state dict (prefix stripped or not) read off the shapes, plus
    ``dims`` and ``variant`` ("dev" with a guidance embedder, "schnell" without)."""
    def get(name: str) -> torch.Tensor:
        for key in (name, TRANSFORMER_PREFIX + name):
            if key in state:
                return state[key]
        raise KeyError(f"FLUX checkpoint has no {name}")

    keys = [k[len(TRANSFORMER_PREFIX):] if k.startswith(TRANSFORMER_PREFIX) else k for k in state]
    nd, ns = _block_counts(keys, "double_blocks.", "single_blocks.")
    img_in = get("img_in.weight")
    inner, in_channels = int(img_in.shape[0]), int(img_in.shape[1])
    head_dim = int(get("double_blocks.0.img_attn.norm.query_norm.scale").shape[0]) if nd else \
        int(get("single_blocks.0.norm.query_norm.scale").shape[0])
    guidance = "guidance_in.in_layer.weight" in keys
    config = dict(patch_size=1, in_channels=in_channels, out_channels=int(get("final_layer.linear.weight").shape[0]),
                  num_layers=nd, num_single_layers=ns, attention_head_dim=head_dim,
                  num_attention_heads=inner // head_dim, joint_attention_dim=int(get("txt_in.weight").shape[1]),
                  pooled_projection_dim=int(get("vector_in.in_layer.weight").shape[1]), guidance_embeds=guidance,
                  axes_dims_rope=rope_axes(head_dim))
    return {"config": config, "dims": FluxDims(inner, 4 * inner), "variant": "dev" if guidance else "schnell"}


# model.flux_train_blocks: "all", "double", "single", or items like "double.3", "single.10-20", comma-separated
_SPEC_ITEM = re.compile(r"^(all|double|single)(?:\.(\d+)(?:-(\d+))?)?$")


def block_spec_problem(spec: str) -> Optional[str]:
    """Why a ``flux_train_blocks`` value cannot be read (None when it can); block counts are checked at load."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        return "must name blocks: all, double, single, or items like double.0-9,single.20"
    for item in items:
        m = _SPEC_ITEM.match(item)
        if not m or (m.group(1) == "all" and m.group(2)):
            return f"cannot read {item!r}: use all, double, single, double.N, single.N or a range like single.4-9"
        if m.group(3) is not None and int(m.group(3)) < int(m.group(2)):
            return f"{item!r}: the range ends before it starts"
    return None


def train_blocks(spec: str, num_double: int, num_single: int) -> tuple[list[int], list[int]]:
    """The (double, single) block indices ``spec`` selects; an index the model does not have is a ValueError."""
    double: set[int] = set()
    single: set[int] = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        m = _SPEC_ITEM.match(item)
        kind, lo, hi = m.group(1), m.group(2), m.group(3)
        kinds = ("double", "single") if kind == "all" else (kind,)
        for k in kinds:
            count = num_double if k == "double" else num_single
            if lo is None:
                picked = range(count)
            else:
                picked = range(int(lo), int(hi if hi is not None else lo) + 1)
                if picked[-1] >= count:
                    raise ValueError(f"{item!r}: the model has {count} {k} blocks (0-{count - 1})")
            (double if k == "double" else single).update(picked)
    return sorted(double), sorted(single)


def block_prefixes(double: Iterable[int], single: Iterable[int]) -> list[str]:
    """diffusers module-name prefixes of the selected blocks (what LoRA targets are matched under)."""
    return [f"transformer_blocks.{i}." for i in double] + [f"single_transformer_blocks.{i}." for i in single]
