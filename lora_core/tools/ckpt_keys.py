"""Which tensor of a WebUI single-file checkpoint each LoRA module changes, read from the checkpoint's header.

A kohya module name (``lora_unet_down_blocks_0_…_to_q``, SGM ``lora_unet_input_blocks_1_1_…``, ``lora_te1_text_model_
encoder_layers_0_self_attn_q_proj``) is mapped to the original LDM/SGM key (``model.diffusion_model.input_blocks.1.1.
…to_q.weight``) and, for OpenCLIP encoders whose q/k/v are fused into one ``attn.in_proj_weight``, the rows it owns.
UNet names come from a diffusers UNet built on the meta device with the config read off the shapes (no weights
loaded), renamed by `lora_core.image.ldm_keys.ldm_unet_name` — the same naming the exporter and the tiny single
files use. Both the diffusers-style and the SGM-style UNet names are accepted, as A1111 does; `canonical` gives
the one sd-scripts writes for the family (diffusers names for SD1/SD2, SGM names for SDXL).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..image.export import kohya_name
from ..image.ldm_keys import ldm_unet_name
from ..image.sd_models import UNET_PREFIX, infer_ldm_config

TEXT_PREFIXES = {  # family → [(checkpoint prefix, kohya prefix, OpenCLIP layout?)]
    "sd1": [("cond_stage_model.transformer.", "lora_te", False)],
    "sd2": [("cond_stage_model.model.", "lora_te", True)],
    "sdxl": [("conditioner.embedders.0.transformer.", "lora_te1", False),
             ("conditioner.embedders.1.model.", "lora_te2", True)],
}
OPEN_CLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@dataclass(frozen=True)
class Target:
    key: str                                  # checkpoint tensor name
    rows: Optional[tuple[int, int]] = None    # the q/k/v slice of a fused in_proj_weight
    kind: str = "linear"                      # linear | conv (3×3 and larger kernels)
    part: str = "unet"                        # unet | te

    def slice(self) -> slice:
        return slice(*self.rows) if self.rows else slice(None)


@dataclass
class ModuleMap:
    targets: dict[str, Target]        # every accepted kohya name → its tensor
    canonical: dict[Target, str]      # tensor → the name sd-scripts writes for this family


def _unet_entries(shapes: dict[str, list[int]], family: str) -> list[tuple[str, str, Target]]:
    """(diffusers-style kohya name, SGM-style kohya name, target) for every UNet weight of the checkpoint."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = create_unet_diffusers_config_from_ldm(infer_ldm_config(state, family), state)
    if family == "sdxl":
        adm_in = int(shapes[UNET_PREFIX + "label_emb.0.0.weight"][1])
        cfg.update(addition_embed_type="text_time", class_embed_type=None, addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=adm_in)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    layers = unet.config.layers_per_block
    entries = []
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        try:
            ldm = ldm_unet_name(name + ".weight", layers, up_attn)
        except KeyError:
            continue
        key = UNET_PREFIX + ldm
        if key not in shapes:
            continue
        shape = shapes[key]
        kind = "conv" if len(shape) == 4 and shape[-1] > 1 else "linear"
        entries.append((kohya_name("lora_unet", name), "lora_unet_" + ldm[: -len(".weight")].replace(".", "_"),
                        Target(key, None, kind, "unet")))
    return entries


def _text_entries(shapes: dict[str, list[int]], family: str) -> list[tuple[str, Target]]:
    entries = []
    for prefix, kohya_prefix, open_clip in TEXT_PREFIXES[family]:
        for key, shape in shapes.items():
            if not key.startswith(prefix) or len(shape) != 2:
                continue
            rest = key[len(prefix):]
            if not open_clip:
                if rest.endswith(".weight") and ".encoder.layers." in "." + rest:
                    name = kohya_name(kohya_prefix, rest[: -len(".weight")])
                    entries.append((name, Target(key, None, "linear", "te")))
                continue
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rest)
            if not m:
                continue
            layer, inner = m[1], m[2]
            base = f"{kohya_prefix}_text_model_encoder_layers_{layer}_"
            if inner == "attn.in_proj_weight":
                d = shape[0] // 3
                for i, p in enumerate("qkv"):
                    entries.append((base + f"self_attn_{p}_proj", Target(key, (i * d, (i + 1) * d), "linear", "te")))
            elif inner.endswith(".weight") and inner[: -len(".weight")] in OPEN_CLIP:
                hf = OPEN_CLIP[inner[: -len(".weight")]]
                entries.append((base + hf.replace(".", "_"), Target(key, None, "linear", "te")))
    return entries


def module_map(shapes: dict[str, list[int]], family: str) -> ModuleMap:
    targets: dict[str, Target] = {}
    canonical: dict[Target, str] = {}
    for diffusers_name, sgm_name, target in _unet_entries(shapes, family):
        targets[diffusers_name] = target
        targets[sgm_name] = target
        canonical[target] = sgm_name if family == "sdxl" else diffusers_name
    for name, target in _text_entries(shapes, family):
        targets[name] = target
        canonical[target] = name
    return ModuleMap(targets, canonical)


# --------------------------------------------------------------------------------------------- base checkpoints
def checkpoint_family(path, what: str = "base model") -> tuple[str, dict, dict]:
    """(family, header, metadata) of a single-file checkpoint from its header alone; a LoRA or an unknown layout
    is refused by name before any weight is read."""
    from pathlib import Path

    from ..image.sd_models import ModelLoadError, detect_family
    from .lora_file import NotABaseModelError, ToolError, read_header

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ToolError(f"{what} {path.name}: expected a .safetensors checkpoint or a diffusers model folder")
    header, metadata = read_header(path)
    keys = list(header)
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) for k in keys) and \
            not any(k.startswith(UNET_PREFIX) for k in keys):
        raise NotABaseModelError(f"{what} {path.name}: this is a LoRA, not a base checkpoint; pass the model the "
                                 f"LoRA was trained on as the base")
    try:
        return detect_family(keys), header, metadata
    except ModelLoadError as e:
        raise NotABaseModelError(f"{what} {path.name}: {e}") from None


class single_file_checkpoint:
    """A context manager giving a WebUI-layout single file for ``path``: the file itself, or — for a diffusers
    folder — a hidden converted copy beside ``workdir`` (loaded whole, written with the original key names,
    removed afterwards)."""

    def __init__(self, path, workdir, what: str = "base model"):
        from pathlib import Path

        from .lora_file import check_input

        self.path = check_input(path, what)
        self.workdir = Path(workdir)
        self.what = what
        self.temp = None

    def __enter__(self):
        import os

        if not self.path.is_dir():
            return self.path
        from ..image.sd_models import ModelLoadError, load_sd_model
        from ..tiny import write_single_file
        from .lora_file import NotABaseModelError

        try:
            model = load_sd_model(self.path)
        except ModelLoadError as e:
            raise NotABaseModelError(f"{self.what} {self.path.name}: {e}") from None
        parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder,
                 "text_encoder_2": model.text_encoder_2}
        self.temp = self.workdir / f".{self.path.name}.{os.getpid()}.single.safetensors"
        write_single_file(parts, self.temp, model.family)
        return self.temp

    def __exit__(self, *exc):
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)
