"""diffusers → original (LDM / WebUI) state-dict key names, the inverse of diffusers' single-file conversion.

Used to write single-file checkpoints of the tiny models exactly as the WebUI keeps real ones, so the single-file
loading path is exercised on real key layouts in tests. Reading real checkpoints uses diffusers' own
``convert_ldm_*`` functions (`lora_core.image.sd_models`); tests check that the two are inverse. The same UNet naming
(`ldm_unet_name`) gives the SGM module names kohya sd-scripts writes into SDXL LoRA files.
"""
from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def ldm_unet_name(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """One diffusers UNet key (``down_blocks.1.attentions.0.proj_in.weight``) → its LDM/SGM name without the
    ``model.diffusion_model.`` prefix (``input_blocks.4.1.proj_in.weight`` when ``layers_per_block`` is 2).

    The SGM numbering puts ``layers_per_block`` resnets (each with its attention) plus one downsampler in every down
    level, and one more resnet per up level; ``layers_per_block + 1`` is the 3 of SDXL's ``3i + j + 1``."""
    step = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for src, dst in fixed.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * step + j
        return f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * step + j
        return f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * step + layers_per_block}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int, up_has_attention: list[bool]) -> dict:
    """Rename a diffusers UNet2DConditionModel state dict to ``model.diffusion_model.*`` keys."""
    return {"model.diffusion_model." + ldm_unet_name(key, layers_per_block, up_has_attention): value
            for key, value in state.items()}


VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict:
    """Rename a diffusers AutoencoderKL state dict to ``first_stage_model.*`` keys (attention as 1×1 convs)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", new):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", new):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", new):
            new = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers-5 CLIPTextModel keys (no ``text_model.`` level) → the checkpoint's ``…text_model.*`` keys."""
    out = {}
    for key, value in state.items():
        inner = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + inner] = value
    return out


OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str, unused_final_block: bool = False) -> dict:
    """transformers CLIPTextModel(WithProjection) keys → OpenCLIP names under ``prefix``, the inverse of diffusers'
    ``convert_open_clip_checkpoint``: q/k/v fused into ``attn.in_proj_weight``, ``text_projection`` transposed.

    SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H, so its diffusers text encoder has one layer fewer
    than the checkpoint; with ``unused_final_block`` the last block is written once more as that final block (its
    weights are never read — the loader drops the last block of SD2 files — but real SD2 files have it)."""
    state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()
             if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"]}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    blocks = layers + [layers[-1]] if unused_final_block else layers
    for n, layer in enumerate(blocks):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"]).contiguous()
            for hf, oc in OPEN_CLIP_LAYER.items():
                out[dst + f"{oc}.{kind}"] = state[src + f"{hf}.{kind}"].clone()
    return out
