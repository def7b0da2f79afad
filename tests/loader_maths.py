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
