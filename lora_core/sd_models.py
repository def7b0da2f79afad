"""Load a Stable Diffusion base model from a local diffusers folder or a WebUI single-file checkpoint, offline.

Single-file checkpoints (what A1111/Forge keep in ``models/Stable-diffusion``) carry weights but no configs. The
configs are inferred from the tensor shapes (channels, blocks, context width, linear vs conv projections), the
weights are renamed with diffusers' own ``convert_ldm_*`` functions, and the CLIP tokenizer comes from the BPE table
shipped with the package — so nothing is fetched from a hub, and a pruned or unusual checkpoint loads as long as it
has the SD layout. ``.ckpt`` (pickle) is refused unless the config allows it; an unknown layout gets an error that says
what was found.
"""
from __future__ import annotations

from .errors import InputError
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class ModelLoadError(InputError):
    """The base model cannot be used; the message says what was found and what to do."""


@dataclass
class SDModel:
    family: str  # sd1 | sd2 | sdxl
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    prediction_type: str  # epsilon | v_prediction
    source: str

    @property
    def base_model_version(self) -> str:
        """sd-scripts' ``ss_base_model_version`` value for this family."""
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        version = "sd_v2" if self.family == "sd2" else "sd_v1"
        return version + ("_v" if self.prediction_type == "v_prediction" else "")


def load_sd_model(path: str | Path, family: str = "auto", prediction_type: str = "auto",
                  allow_pickle: bool = False) -> SDModel:
    path = Path(path)
    if path.is_dir():
        model = _load_diffusers_folder(path)
    elif path.suffix.lower() == ".safetensors":
        model = _load_single_file(read_safetensors(path), str(path))
    elif path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        if not allow_pickle:
            raise ModelLoadError(f"{path.name} is a pickle checkpoint, which can run code when loaded; convert it to "
                                 f".safetensors or set model.allow_pickle: true")
        raw = torch.load(path, map_location="cpu", weights_only=False)
        model = _load_single_file(raw.get("state_dict", raw), str(path))
    else:
        raise ModelLoadError(f"{path}: not a diffusers folder, .safetensors or .ckpt file")
    if family != "auto" and family != model.family:
        raise ModelLoadError(f"model.model_family is {family!r} but {path.name} is a {model.family} model")
    if prediction_type != "auto":
        model.prediction_type = prediction_type
    model.noise_scheduler.register_to_config(prediction_type=model.prediction_type)
    return model


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path.name}: cannot read as safetensors ({e})") from None


def _noise_scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=prediction_type, steps_offset=1)


def _load_diffusers_folder(path: Path) -> SDModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path}: no model_index.json — expected a diffusers model folder (unet/, vae/, "
                             f"text_encoder/, tokenizer/, scheduler/)")
    names = json.loads(index.read_text())
    if "text_encoder_2" in names:
        raise ModelLoadError(f"{path}: SDXL folders are not supported yet")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    sched_cfg = path / "scheduler" / "scheduler_config.json"
    prediction = json.loads(sched_cfg.read_text()).get("prediction_type", "epsilon") if sched_cfg.is_file() else "epsilon"
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True) \
        if sched_cfg.is_file() else _noise_scheduler(prediction)
    family = "sd2" if text_encoder.config.hidden_size == 1024 else "sd1"
    return SDModel(family, unet, vae, text_encoder, tokenizer, scheduler, prediction, str(path))


def detect_family(keys: list[str]) -> str:
    """sd1 (CLIP-L ``cond_stage_model.transformer``), sd2 (OpenCLIP ``cond_stage_model.model``), sdxl
    (``conditioner.embedders``); anything else is refused with a description of what the file holds."""
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if has_unet and any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if has_unet and any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if has_unet and any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    prefixes = sorted({k.split(".")[0] for k in keys})[:8]
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        what = "a LoRA, not a base model"
    elif any(k.startswith(("double_blocks.", "joint_blocks.", "model.diffusion_model.double_blocks")) for k in keys):
        what = "a Flux/SD3-style model, which this trainer does not support"
    elif has_unet:
        what = "a UNet without a known text encoder"
    else:
        what = f"tensors with top-level names {', '.join(prefixes) or '(none)'}"
    raise ModelLoadError(f"unknown model family: found {what} ({len(keys)} tensors); expected an SD 1.x, SD 2.x or "
                         f"SDXL checkpoint")


def _count(keys: list[str], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


def infer_ldm_config(state: dict[str, torch.Tensor], family: str) -> dict:
    """The parts of an LDM ``original_config`` that diffusers' converters need, read off the tensor shapes."""
    keys = list(state)
    u = UNET_PREFIX
    model_channels, in_channels = state[u + "input_blocks.0.0.weight"].shape[:2]
    inputs = sorted(_count(keys, re.escape(u) + r"input_blocks\.(\d+)\."))
    ops = sorted(i for i in inputs if u + f"input_blocks.{i}.0.op.weight" in state)
    levels = len(ops) + 1
    num_res_blocks = (ops[0] - 1) if ops else len(inputs) - 1
    channel_mult, attention_resolutions, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        channel_mult.append(state[u + f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // model_channels)
        if u + f"input_blocks.{first}.1.proj_in.weight" in state:
            attention_resolutions.append(2 ** level)
            depth.append(len(_count(keys, re.escape(u + f"input_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")))
    attn2 = next(k for k in keys if k.startswith(u) and k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in keys if k.startswith(u) and k.endswith("proj_in.weight"))
    unet = {"in_channels": int(in_channels), "out_channels": int(state[u + "out.2.weight"].shape[0]),
            "model_channels": int(model_channels), "channel_mult": channel_mult,
            "num_res_blocks": num_res_blocks, "attention_resolutions": attention_resolutions,
            "context_dim": int(state[attn2].shape[1]), "transformer_depth": depth[0] if depth else 1,
            "use_linear_in_transformer": state[proj_in].ndim == 2}
    if family == "sd1":
        unet["num_heads"] = 8
    else:
        unet["num_head_channels"] = 64
    v = VAE_PREFIX
    ch = state[v + "encoder.conv_in.weight"].shape[0]
    vae_levels = sorted(_count(keys, re.escape(v) + r"encoder\.down\.(\d+)\."))
    ddconfig = {"ch": int(ch), "in_channels": int(state[v + "encoder.conv_in.weight"].shape[1]),
                "out_ch": int(state[v + "decoder.conv_out.weight"].shape[0]),
                "z_channels": int(state[v + "decoder.conv_in.weight"].shape[1]),
                "ch_mult": [state[v + f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in vae_levels],
                "num_res_blocks": len(_count(keys, re.escape(v) + r"encoder\.down\.0\.block\.(\d+)\."))}
    return {"model": {"params": {"unet_config": {"params": unet}, "scale_factor": 0.18215,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def _load_single_file(state: dict[str, torch.Tensor], source: str) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_tokenizer import load_clip_tokenizer

    family = detect_family(list(state))
    if family != "sd1":
        raise ModelLoadError(f"{Path(source).name}: {family} single-file checkpoints are not supported yet")
    try:
        original = infer_ldm_config(state, family)
    except (KeyError, StopIteration, IndexError) as e:
        raise ModelLoadError(f"{Path(source).name}: an SD layout was expected but tensor {e} is missing — is the "
                             f"file complete?") from None
    unet_cfg = create_unet_diffusers_config_from_ldm(original, state)
    vae_cfg = create_vae_diffusers_config_from_ldm(original, state)
    unet = UNet2DConditionModel(**unet_cfg)
    _load_strict(unet, convert_ldm_unet_checkpoint(state, unet_cfg), "UNet", source)
    vae = AutoencoderKL(**vae_cfg)
    _load_strict(vae, convert_ldm_vae_checkpoint(state, vae_cfg), "VAE", source)

    te_state = convert_ldm_clip_checkpoint(state)
    te_state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in te_state.items()}
    te_state.pop("embeddings.position_ids", None)
    hidden = te_state["embeddings.token_embedding.weight"].shape[1]
    layers = len(_count(list(te_state), r"encoder\.layers\.(\d+)\."))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=te_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        vocab_size=te_state["embeddings.token_embedding.weight"].shape[0],
        max_position_embeddings=te_state["embeddings.position_embedding.weight"].shape[0], hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=hidden))
    _load_strict(text_encoder, te_state, "text encoder", source)
    return SDModel(family, unet, vae, text_encoder, load_clip_tokenizer(), _noise_scheduler("epsilon"), "epsilon",
                   source)


def _load_strict(module: torch.nn.Module, state: dict, what: str, source: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(f"{Path(source).name}: the {what} weights do not match the inferred layout "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
