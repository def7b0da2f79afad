"""diffusers → original (LDM / WebUI) state-dict key names, the inverse of diffusers' single-file conversion.

Used to write single-file checkpoints of the tiny models exactly as the WebUI keeps real ones, so the single-file
loading path is exercised on real key layouts in tests. Reading real checkpoints uses diffusers' own
``convert_ldm_*`` functions (`lora_core.sd_models`); tests check that the two are inverse.
"""
from __future__ import annotations

import re

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int, up_has_attention: list[bool]) -> dict:
    """Rename a diffusers UNet2DConditionModel state dict to ``model.diffusion_model.*`` keys."""
    L = layers_per_block
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for key, value in state.items():
        new = None
        for src, dst in fixed.items():
            if key.startswith(src + "."):
                new = dst + key[len(src):]
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * (L + 1) + j
            new = f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif new is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)):
            new = f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
        elif new is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            kind, j, rest = m[1], int(m[2]), m[3]
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * (L + 1) + j
            new = f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)):
            i = int(m[1])
            new = f"output_blocks.{i * (L + 1) + L}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
        if new is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


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
