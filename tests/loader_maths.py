"""The loaders' maths for kohya/LyCORIS files, written from reading A1111's ``extensions-builtin/Lora/network.py``,
``network_lora.py``, ``network_hada.py``, ``network_lokr.py`` and ComfyUI's ``comfy/weight_adapter/`` (not copied).

Per file module, ΔW is rebuilt from its parts and scaled by alpha/dim (dim from ``lora_down``/``hada_w1_b``/
``lokr_w2_b``/``lokr_w1_b``; 1.0 when the file gives none, as for a LoKr of two full matrices); with ``dora_scale``
the *merged* weight W + ΔW is renormalised per input column (A1111's only convention, ComfyUI's for a ``(1, in)``
scale) and the multiplier then scales the final change.
"""
from __future__ import annotations

import torch


def file_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``lora_unet_x.hada_w1_a`` → {"lora_unet_x": {"hada_w1_a": …}} (the module name ends at the first dot)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, part = key.split(".", 1)
        out.setdefault(name, {})[part] = value.float()
    return out


def loader_delta(parts: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change one file module makes at multiplier 1."""
    shape = weight.shape
    dim = None
    if "lora_down.weight" in parts:
        up, down = parts["lora_up.weight"], parts["lora_down.weight"]
        dim = down.shape[0]
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)).reshape(shape)
    elif "hada_w1_a" in parts:
        dim = parts["hada_w1_b"].shape[0]
        one = parts["hada_w1_a"] @ parts["hada_w1_b"].reshape(dim, -1)
        two = parts["hada_w2_a"] @ parts["hada_w2_b"].reshape(parts["hada_w2_b"].shape[0], -1)
        delta = (one * two).reshape(shape)
    else:
        w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        if "lokr_w1_b" in parts:
            dim = parts["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in parts:
            dim = parts["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2).reshape(shape)
    alpha = parts.get("alpha")
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    delta = delta * scale
    if "dora_scale" in parts:
        merged = weight + delta
        norm = (merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(shape[1], *[1] * (len(shape) - 1)).transpose(0, 1))
        delta = merged * (parts["dora_scale"] / norm) - weight
    return delta


def apply_file(weights: dict[str, torch.Tensor], key_of: dict[str, str], tensors: dict[str, torch.Tensor],
               multiplier: float, prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """The base weights with every ``prefix`` module of the file added at ``multiplier``; a module the key map does
    not know fails the test (the loaders would skip it silently)."""
    out = dict(weights)
    for name, parts in file_modules(tensors).items():
        if not name.startswith(prefix):
            continue
        assert name in key_of, f"{name}: the loaders find no layer for this module"
        key = key_of[name]
        base = weights[key].float()
        out[key] = base + multiplier * loader_delta(parts, base)
    return out


def unet_output(unet, sdxl: bool, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if sdxl:
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled_dim, generator=gen),
                                       "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), text, **kwargs).sample


# ------------------------------------------------------------------- ComfyUI's UNet key layout (SD1/SD2/SDXL)
# Written from reading ComfyUI's ``comfy/utils.py`` (``unet_to_diffusers`` and its UNET_MAP_* tables), not copied:
# the table ComfyUI uses to find a diffusers-named UNet tensor in an original (ldm/SGM) checkpoint, and so the
# names a kohya SDXL LoRA (``lora_unet_input_blocks_4_1_…``) must use to reach a layer. Kept here, apart from the
# engine's ``lora_core.image.ldm_keys``, so the engine's own mapping is never its own oracle.
_COMFY_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                       "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_COMFY_FIXED = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}


def comfy_unet_prefixes(layers_per_block, down_has_attention: list[bool],
                        up_has_attention: list[bool]) -> dict[str, str]:
    """diffusers module prefix → ldm/SGM module prefix (both without ``.weight``), by ComfyUI's counting: level
    ``x`` of the down path starts at input block ``1 + (res_blocks + 1)·x`` (its resnets, each with its attention
    as sub-block 1, then the downsampler as ``…op``); the mid block is resnet 0, attention 1, resnet 2; level ``x``
    of the up path starts at output block ``(res_blocks + 1)·x`` with one more resnet than the down path, and its
    upsampler follows the last one as sub-block 2 when that block has an attention, else 1."""
    levels = len(down_has_attention)
    per_level = list(layers_per_block) if isinstance(layers_per_block, (list, tuple)) else [layers_per_block] * levels
    out: dict[str, str] = {}

    def resnet(src: str, dst: str) -> None:
        for part, ldm in _COMFY_RESNET_PARTS.items():
            out[f"{src}.{part}"] = f"{dst}.{ldm}"

    for x in range(levels):
        first = 1 + (per_level[x] + 1) * x
        for i in range(per_level[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{first + i}.0")
            if down_has_attention[x]:
                out[f"down_blocks.{x}.attentions.{i}"] = f"input_blocks.{first + i}.1"
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{first + per_level[x]}.0.op"
    out["mid_block.attentions.0"] = "middle_block.1"
    for i, block in enumerate((0, 2)):
        resnet(f"mid_block.resnets.{i}", f"middle_block.{block}")
    up_levels = list(reversed(per_level))
    for x in range(levels):
        first = (up_levels[x] + 1) * x
        count = up_levels[x] + 1
        for i in range(count):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{first + i}.0")
            if up_has_attention[x]:
                out[f"up_blocks.{x}.attentions.{i}"] = f"output_blocks.{first + i}.1"
        out[f"up_blocks.{x}.upsamplers.0.conv"] = \
            f"output_blocks.{first + count - 1}.{2 if up_has_attention[x] else 1}.conv"
    out.update(_COMFY_FIXED)
    return out


def comfy_sgm_name(module: str, prefixes: dict[str, str]) -> str | None:
    """A diffusers UNet module path (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``) → its
    ldm/SGM path by the longest matching prefix (the rest of the path is the same in both layouts); None when
    ComfyUI's table has no entry for it."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            return ".".join([prefixes[head], *parts[cut:]])
    return None


# ------------------------------------------------------------------- FLUX.1 (BFL layout; ComfyUI, sd-scripts)
# The BFL model's Linear layers as Black Forest Labs' ``flux/model.py`` builds them (read in sd-scripts'
# ``library/flux_models.py``: DoubleStreamBlock, SingleStreamBlock, MLPEmbedder, Modulation, LastLayer), written
# here from that reading and not from ``lora_core.image.flux_keys``, so the engine's table is never its own oracle.
FLUX_DOUBLE_LINEARS = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                       "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
FLUX_SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")
FLUX_INPUT_LINEARS = ("img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                      "txt_in")
FLUX_GUIDANCE_LINEARS = ("guidance_in.in_layer", "guidance_in.out_layer")
FLUX_FINAL_LINEARS = ("final_layer.linear", "final_layer.adaLN_modulation.1")
# the five input embedders sd-scripts' FLUX LoRA can also hold (its ``in_dims`` filters, in its order)
SD_SCRIPTS_FLUX_INPUTS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")


def bfl_flux_linears(num_double: int, num_single: int, guidance: bool) -> list[str]:
    """Every Linear module path of a BFL FLUX.1 transformer (dev has ``guidance_in``, schnell has not)."""
    out = list(FLUX_INPUT_LINEARS) + (list(FLUX_GUIDANCE_LINEARS) if guidance else []) + list(FLUX_FINAL_LINEARS)
    out += [f"double_blocks.{i}.{name}" for i in range(num_double) for name in FLUX_DOUBLE_LINEARS]
    out += [f"single_blocks.{i}.{name}" for i in range(num_single) for name in FLUX_SINGLE_LINEARS]
    return out


def comfy_flux_key_map(bfl_keys) -> dict[str, str]:
    """ComfyUI's ``model_lora_keys_unet`` for a FLUX model (``comfy/lora.py``): every ``diffusion_model.<path>.weight``
    of the loaded BFL state dict is reached by ``lora_unet_<path, . → _>``. Keys here are the BFL state dict's own
    (the ``diffusion_model.`` prefix ComfyUI adds is left off on both sides)."""
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in bfl_keys if k.endswith(".weight")}


def sd_scripts_flux_key_map(bfl_linears: list[str]) -> dict[str, str]:
    """sd-scripts' ``networks/lora_flux.py`` ``create_network_from_weights``: a LoRA module can exist for every
    Linear inside a DoubleStreamBlock or SingleStreamBlock (``lora_unet_`` + block path + child path, . → _) and for
    the input embedders of its ``in_dims`` filters; nothing else (``final_layer`` is not loadable there). It merges
    as ``W + m · up @ down · alpha / dim`` with dim = rows of ``lora_down`` (``LoRAInfModule.merge_to``), the maths
    of `loader_delta`. Module name → the BFL weight it changes."""
    out = {}
    for path in bfl_linears:
        in_block = path.startswith(("double_blocks.", "single_blocks."))
        if in_block or path.split(".")[0] in SD_SCRIPTS_FLUX_INPUTS:
            out["lora_unet_" + path.replace(".", "_")] = path + ".weight"
    return out


def comfy_flux_diffusers_key_map(num_double: int, num_single: int, inner: int, mlp: int, guidance: bool
                                 ) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """ComfyUI's map for a diffusers-named FLUX LoRA (``transformer.<diffusers path>``, from ``comfy/utils.py``
    ``flux_to_diffusers``): diffusers module → (BFL weight, (first row, rows) of the fused layer it patches or None
    for all of it, whether the two halves are swapped — ``norm_out.linear``)."""
    out: dict[str, tuple[str, tuple[int, int] | None, bool]] = {}
    for i in range(num_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for k, x in enumerate("qkv"):
            out[d + f"attn.to_{x}"] = (b + "img_attn.qkv.weight", (k * inner, inner), False)
            out[d + f"attn.add_{x}_proj"] = (b + "txt_attn.qkv.weight", (k * inner, inner), False)
        for src, dst in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                         ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            out[d + src] = (b + dst + ".weight", None, False)
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for k, x in enumerate("qkv"):
            out[d + f"attn.to_{x}"] = (b + "linear1.weight", (k * inner, inner), False)
        out[d + "proj_mlp"] = (b + "linear1.weight", (3 * inner, mlp), False)
        out[d + "norm.linear"] = (b + "modulation.lin.weight", None, False)
        out[d + "proj_out"] = (b + "linear2.weight", None, False)
    basic = [("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
             ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
             ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
             ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
             ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")]
    if guidance:
        basic += [("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                  ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")]
    for src, dst in basic:
        out[src] = (dst + ".weight", None, False)
    out["norm_out.linear"] = ("final_layer.adaLN_modulation.1.weight", None, True)
    return out


def flux_inputs(config, seed: int = 0, side: int = 4, text_tokens: int = 5) -> dict[str, torch.Tensor]:
    """Fixed inputs for a ``FluxTransformer2DModel``: packed latents of a ``side`` × ``side`` grid with their
    position ids as FluxPipeline makes them (0, row, column), text tokens at id 0, a timestep and (dev) a guidance."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    inputs = {"hidden_states": torch.randn(1, side * side, config.in_channels, generator=gen),
              "encoder_hidden_states": torch.randn(1, text_tokens, config.joint_attention_dim, generator=gen),
              "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=gen),
              "timestep": torch.tensor([0.6]), "img_ids": img_ids, "txt_ids": torch.zeros(text_tokens, 3)}
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def flux_output(transformer, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**flux_inputs(transformer.config, seed), return_dict=False)[0]
