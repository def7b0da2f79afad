"""Write LoRA files that A1111, Forge, ComfyUI and diffusers all load (the kohya format of DESIGN.md).

Keys: ``lora_unet_<module path, . → _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-dim, the trained
``lora_alpha``), ``lora_te_`` for the SD1/SD2 text encoder (``lora_te1_``/``lora_te2_`` for SDXL) with the
``text_model_`` level that transformers 4 had, and nothing else. Metadata: sd-scripts' ``ss_*`` keys, ``modelspec.*``
and ``sshs_model_hash`` (sha256 of the bytes after the header, as A1111 computes it). Files are written to a temp name,
fsynced and renamed, so a watcher never sees half a file. FLUX.1 files (BFL names, q/k/v fused into ``qkv``) are
named by `lora_core.image.flux_export`, which writes them through this module.
"""
from __future__ import annotations

import hashlib
import json
import struct
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

from ..files import atomic_path, atomic_write_bytes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
ARCHITECTURE = {"sd_v1": "stable-diffusion-v1/lora", "sd_v1_v": "stable-diffusion-v1/lora",
                "sd_v2": "stable-diffusion-v2-512/lora", "sd_v2_v": "stable-diffusion-v2-768-v/lora",
                "sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora",
                "flux1": "flux-1/lora"}  # FLUX: dev or schnell is said by `flux_export.flux_metadata`


def kohya_name(prefix: str, module_path: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` → ``lora_unet_down_blocks_0_…_to_q``."""
    if prefix.startswith("lora_te") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return f"{prefix}_{module_path.replace('.', '_')}"


def peft_to_kohya(state: dict[str, torch.Tensor], prefix: str, alpha: float,
                  rename=None) -> dict[str, torch.Tensor]:
    """peft ``<path>.lora_A.weight``/``lora_B.weight`` → kohya down/up + a 0-dim alpha per module."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for part, kohya_part in (".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"):
            if key.endswith(part):
                path = key[: -len(part)]
                name = kohya_name(prefix, rename(path) if rename else path)
                out[name + kohya_part] = value
                out[name + ".alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise ValueError(f"unexpected LoRA weight {key!r}: only lora_A/lora_B weights are exported")
    return out


def kohya_lora_tensors(family: str, unet_state: dict[str, torch.Tensor], text_states: list[dict[str, torch.Tensor]],
                       alpha: float, unet_config) -> dict[str, torch.Tensor]:
    """The whole file's tensors in the naming each family's loaders expect: SD1/SD2 UNet keys with diffusers module
    names and ``lora_te_``; SDXL UNet keys with the original SGM names (``input_blocks_4_1_…``, as sd-scripts writes
    them, since kohya trains SDXL on the SGM UNet) and ``lora_te1_``/``lora_te2_`` for its two text encoders."""
    if family != "sdxl":
        tensors = peft_to_kohya(unet_state, "lora_unet", alpha)
        for state in text_states:
            tensors.update(peft_to_kohya(state, "lora_te", alpha))
        return tensors
    from .ldm_keys import ldm_unet_name

    up_attn = ["CrossAttn" in t for t in unet_config.up_block_types]

    def sgm(path: str) -> str:
        return ldm_unet_name(path + ".weight", unet_config.layers_per_block, up_attn)[: -len(".weight")]

    tensors = peft_to_kohya(unet_state, "lora_unet", alpha, rename=sgm)
    for i, state in enumerate(text_states, start=1):
        tensors.update(peft_to_kohya(state, f"lora_te{i}", alpha))
    return tensors


# Each adapter part as the trainer holds it (peft's names, or LyCORIS's own) → the key suffix the loaders read
# (A1111's network_lora/network_hada/network_lokr/network.py, ComfyUI's comfy/weight_adapter, sd-scripts).
FILE_PARTS = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",  # peft LoRA / LoCon
    "lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight", "lora_mid.weight": "lora_mid.weight",
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1", "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lokr_t2": "lokr_t2",
    "dora_scale": "dora_scale", "alpha": "alpha",
}
# the other way, for files read back (continue from a LoRA): peft parts for plain LoRA, LyCORIS's names otherwise
PEFT_PARTS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
FAMILY_PREFIXES = {"sdxl": ("lora_unet", "lora_te1", "lora_te2"), "sd1": ("lora_unet", "lora_te"),
                   "sd2": ("lora_unet", "lora_te")}


def sgm_renamer(unet_config):
    """diffusers UNet module path → the SGM name sd-scripts writes for SDXL (``input_blocks_4_1_…``)."""
    from .ldm_keys import ldm_unet_name

    up_attn = ["CrossAttn" in t for t in unet_config.up_block_types]

    def sgm(path: str) -> str:
        return ldm_unet_name(path + ".weight", unet_config.layers_per_block, up_attn)[: -len(".weight")]

    return sgm


def file_module_names(family: str, prefix: str, paths, unet_config=None) -> dict[str, str]:
    """Module path → the file's module name (``lora_unet_…``) for one component, as `kohya_network_tensors` names
    it; inverted, it finds the layer a file's key belongs to."""
    rename = sgm_renamer(unet_config) if family == "sdxl" and prefix == "lora_unet" else None
    out = {}
    for path in paths:
        try:
            out[path] = kohya_name(prefix, rename(path) if rename else path)
        except KeyError:  # a layer with no SGM name cannot be in a kohya file
            continue
    return out


def network_to_kohya(modules: dict[str, dict[str, torch.Tensor]], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Each adapted layer's parts (see `lora_core.image.adapters.export_modules`) under the file's key names."""
    out: dict[str, torch.Tensor] = {}
    for path, parts in modules.items():
        for part, value in parts.items():
            if part not in FILE_PARTS:
                raise ValueError(f"{path}: adapter part {part!r} has no file key the loaders read")
            out[f"{names[path]}.{FILE_PARTS[part]}"] = value
    return out


def kohya_network_tensors(family: str, unet_modules: dict[str, dict[str, torch.Tensor]],
                          text_modules: list[dict[str, dict[str, torch.Tensor]]], unet_config) -> dict[str, torch.Tensor]:
    """The whole file for any adapter type (LoRA, LoCon, LoHa, LoKr, DoRA): the naming of `kohya_lora_tensors`
    (diffusers paths for SD1/SD2, SGM paths for SDXL, ``lora_te``/``lora_te1``/``lora_te2``) with each type's parts."""
    prefixes = FAMILY_PREFIXES["sdxl" if family == "sdxl" else "sd1"]
    tensors = network_to_kohya(unet_modules, file_module_names(family, "lora_unet", unet_modules, unet_config))
    for prefix, modules in zip(prefixes[1:], text_modules):
        tensors.update(network_to_kohya(modules, file_module_names(family, prefix, modules)))
    return tensors


def data_section_sha256(blob: bytes) -> str:
    """sha256 of everything after the safetensors header — sd-scripts' and A1111's ``sshs_model_hash``."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   precision: str = "fp16") -> Path:
    """Serialise with every value a string, add ``sshs_model_hash``, write atomically."""
    from safetensors.torch import save

    dtype = DTYPES[precision]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sorted(tensors.items())}
    meta = {k: str(v) for k, v in metadata.items()}
    # the data section does not depend on the header, so the hash of a first serialisation holds for the final one
    meta["sshs_model_hash"] = data_section_sha256(save(tensors, metadata=meta))
    return atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def training_metadata(*, output_name: str, base_model_version: str, prediction_type: str, rank: int, alpha: float,
                      dropout: float, learning_rate: float, text_encoder_lr: Optional[float], resolution: int,
                      num_train_images: int, tag_frequency: dict, dataset_dirs: dict, started_at: float,
                      steps: int, epoch: int, max_train_steps: int, base_model_path: str, batch_size: int,
                      gradient_accumulation_steps: int, mixed_precision: str, optimizer: str, lr_scheduler: str,
                      seed: int, noise_offset: float, min_snr_gamma: Optional[float], clip_skip: int,
                      bucket_info: Optional[dict], cache_latents: bool, gradient_checkpointing: bool,
                      num_reg_images: int = 0, prior_loss_weight: float = 1.0, trigger_word: Optional[str] = None,
                      network_module: str = "networks.lora", network_args: Optional[str] = None,
                      family_metadata: Optional[dict] = None) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` keys A1111/Forge/civitai read (all values strings). ``family_metadata``
    (e.g. `flux_export.flux_metadata`) is applied last: its values win, and a None there removes the key."""
    now = time.time()
    is_v2 = base_model_version.startswith("sd_v2")
    meta = {
        "ss_session_id": str(int(started_at * 1000) % 2**32),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": now,
        "ss_output_name": output_name,
        "ss_learning_rate": learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": learning_rate,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_epochs": epoch,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps,
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": gradient_accumulation_steps,
        "ss_gradient_checkpointing": gradient_checkpointing,
        "ss_lr_scheduler": lr_scheduler,
        "ss_network_module": network_module,
        "ss_network_dim": rank,
        "ss_network_alpha": float(alpha),
        "ss_network_dropout": dropout,
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": is_v2,
        "ss_base_model_version": base_model_version,
        "ss_clip_skip": clip_skip,
        "ss_cache_latents": cache_latents,
        "ss_seed": seed,
        "ss_noise_offset": noise_offset,
        "ss_min_snr_gamma": min_snr_gamma,
        "ss_prior_loss_weight": prior_loss_weight,
        "ss_optimizer": optimizer,
        "ss_resolution": (resolution, resolution),
        "ss_enable_bucket": bucket_info is not None,
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_sd_model_name": Path(base_model_path).name,
        "ss_training_comment": f"trigger: {trigger_word}" if trigger_word else None,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE[base_model_version],
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if base_model_version.startswith("sdxl") else "diffusers"),
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.fromtimestamp(int(now)).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if trigger_word:
        meta["modelspec.trigger_phrase"] = trigger_word
    if network_args:  # LyCORIS/LoCon files say their algorithm and conv rank here, as sd-scripts' --network_args
        meta["ss_network_args"] = network_args
    for key, value in (family_metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return {k: str(v) for k, v in meta.items()}


def save_diffusers_lora(folder: str | Path, unet_state: dict[str, torch.Tensor],
                        te_states: list[dict[str, torch.Tensor]], rank: int, alpha: float,
                        precision: str = "fp16", family: str = "sd1") -> Path:
    """``format: diffusers``: peft-named weights that ``pipe.load_lora_weights(folder)`` reads, saved through diffusers'
    own writer with the adapter metadata that restores ``lora_alpha`` (without it the LoRA loads at the wrong scale).
    Two text-encoder states mean SDXL (StableDiffusionXLPipeline's writer, ``text_encoder_2``); ``family`` "flux":
    ``unet_state`` is the transformer's, written by FluxPipeline's writer as ``transformer.…lora_A/lora_B``."""
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = Path(folder)
    dtype = DTYPES[precision]

    def meta(state: dict[str, torch.Tensor]) -> dict:
        targets = sorted({k.split(".lora_")[0] for k in state})
        return {"r": rank, "lora_alpha": alpha, "target_modules": targets}

    def layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(dtype) for k, v in state.items()}

    main = "transformer" if family == "flux" else "unet"
    kwargs = {f"{main}_lora_layers": layers(unet_state), f"{main}_lora_adapter_metadata": meta(unet_state)}
    for i, state in enumerate(te_states):
        name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        kwargs[f"{name}_lora_layers"] = layers(state)
        kwargs[f"{name}_lora_adapter_metadata"] = meta(state)
    writer = FluxPipeline if family == "flux" else \
        StableDiffusionXLPipeline if len(te_states) == 2 else StableDiffusionPipeline
    with atomic_path(folder) as tmp:
        writer.save_lora_weights(tmp, **kwargs)
    return folder
