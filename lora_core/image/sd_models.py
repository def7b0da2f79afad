"""Load a Stable Diffusion base model from a local diffusers folder or a WebUI single-file checkpoint, offline.

Families: SD 1.x, SD 2.x (512 epsilon and 768 v-prediction) and SDXL (two text encoders). Single-file checkpoints
(what A1111/Forge keep in ``models/Stable-diffusion``) carry weights but no configs. The configs are inferred from the tensor shapes (channels, blocks, context width, linear vs conv projections), the
weights are renamed with diffusers' own ``convert_ldm_*`` functions, and the CLIP tokenizer comes from the BPE table
shipped with the package — so nothing is fetched from a hub, and a pruned or unusual checkpoint loads as long as it
has the SD layout. ``.ckpt`` (pickle) is refused unless the config allows it; an unknown layout gets an error that says
what was found.

Weights are loaded in the dtype they will be trained in (``dtype`` for the UNet and text encoders, ``vae_dtype`` for
the VAE), tensor by tensor (`weights_io`): a bf16 SDXL run never holds an fp32 copy of the model, which is what made
a 16 GB desktop run out of RAM before the first step.
"""
from __future__ import annotations

from ..errors import InputError
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .weights_io import WeightsFileError, assign_weights, empty_module, iter_tensors, read_header

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# the parts of a WebUI checkpoint the trainer uses; EMA copies, model_ema.* and the like are never read
USED_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.embedders.")


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
    text_encoder_2: Any = None  # SDXL: OpenCLIP-bigG-style CLIPTextModelWithProjection (pooled embeddings)
    tokenizer_2: Any = None

    @property
    def base_model_version(self) -> str:
        """sd-scripts' ``ss_base_model_version`` value for this family."""
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        version = "sd_v2" if self.family == "sd2" else "sd_v1"
        return version + ("_v" if self.prediction_type == "v_prediction" else "")


def load_sd_model(path: str | Path, family: str = "auto", prediction_type: str = "auto",
                  allow_pickle: bool = False, dtype: torch.dtype = torch.float32,
                  vae_dtype: Optional[torch.dtype] = None) -> SDModel:
    """Load a base model with the UNet and text encoders in ``dtype`` and the VAE in ``vae_dtype`` (default: the
    same), every floating tensor cast as it is read."""
    path = Path(path)
    vae_dtype = vae_dtype or dtype
    if path.is_dir():
        model = _load_diffusers_folder(path, dtype, vae_dtype)
    elif path.suffix.lower() == ".safetensors":
        model = _load_single_file(read_safetensors(path, _ldm_dtypes(dtype, vae_dtype)), str(path),
                                  safetensors_metadata(path), dtype, vae_dtype)
    elif path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        if not allow_pickle:
            raise ModelLoadError(f"{path.name} is a pickle checkpoint, which can run code when loaded; convert it to "
                                 f".safetensors or set model.allow_pickle: true")
        raw = _load_pickle(path)
        raw = raw.get("state_dict", raw)
        cast = _ldm_dtypes(dtype, vae_dtype)
        state = {}
        for k in list(raw):  # one tensor at a time, so the pickle's fp32 copy shrinks as the cast one grows
            v = raw.pop(k)
            if isinstance(v, torch.Tensor) and (k.startswith(USED_PREFIXES) or k == "v_pred"):
                state[k] = v.to(cast(k, v.dtype)) if v.is_floating_point() else v
        del raw
        model = _load_single_file(state, str(path), {}, dtype, vae_dtype)
    else:
        raise ModelLoadError(f"{path}: not a diffusers folder, .safetensors or .ckpt file")
    if family != "auto" and family != model.family:
        raise ModelLoadError(f"model.model_family is {family!r} but {path.name} is a {model.family} model")
    if prediction_type != "auto":
        if prediction_type != model.prediction_type:
            log.info("model.prediction_type %s overrides the %s detected for %s", prediction_type,
                     model.prediction_type, path.name)
        model.prediction_type = prediction_type
    model.noise_scheduler.register_to_config(prediction_type=model.prediction_type)
    return model


def _load_pickle(path: Path) -> dict:
    """A pickle checkpoint (allowed by model.allow_pickle): first with torch's restricted unpickler, which loads
    tensors but runs no code; only a file that needs more (e.g. pickled training callbacks) is unpickled in full.
    Memory-mapped where the file allows it (the zip format), so the pickle is not read whole."""
    import pickle

    def load(weights_only: bool) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) pickle format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=weights_only)

    try:
        return load(True)
    except pickle.UnpicklingError as e:
        log.warning("%s: does not load with weights_only=True (%s); unpickling it in full because "
                    "model.allow_pickle is set", path.name, str(e).splitlines()[0][:200])
        return load(False)


def _ldm_dtypes(dtype: torch.dtype, vae_dtype: torch.dtype) -> Callable[[str, torch.dtype], torch.dtype]:
    """Which dtype each tensor of a WebUI checkpoint is loaded in: the VAE's own, everything else the model's."""
    return lambda name, stored: vae_dtype if name.startswith(VAE_PREFIX) else dtype


def read_safetensors(path: Path, dtype_for: Optional[Callable[[str, torch.dtype], torch.dtype]] = None
                     ) -> dict[str, torch.Tensor]:
    """The used tensors of a WebUI checkpoint (`USED_PREFIXES`, the ``v_pred`` marker), each cast as it is read."""
    try:
        return dict(iter_tensors(path, dtype_for or (lambda name, stored: None),
                                 keep=lambda k: k.startswith(USED_PREFIXES) or k == "v_pred"))
    except WeightsFileError as e:
        raise ModelLoadError(str(e)) from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a header that lies about shapes or offsets
        raise ModelLoadError(f"{path.name}: cannot read as safetensors ({e})") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        return read_header(path)[1]
    except WeightsFileError as e:
        raise ModelLoadError(str(e)) from None


def _noise_scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=prediction_type, steps_offset=1)


def _component_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of one diffusers/transformers component folder: a sharded index, the plain file, or
    else the ``fp16`` variant; empty when the folder holds only pickles (``.bin``)."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            return [folder / s for s in shards]
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            if (folder / name).is_file():
                return [folder / name]
    return []


def _load_component(folder: Path, build: Callable[[], torch.nn.Module], dtype: torch.dtype, what: str,
                    fallback: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build the module empty and fill it from its safetensors file(s), cast tensor by tensor. transformers 4 saved
    CLIP weights under ``text_model.``, transformers 5's CLIPTextModel has no such level: names are matched either
    way. A folder with only pickled weights goes through the library's own loader (with ``torch_dtype``)."""
    files = _component_files(folder)
    if not files:
        return fallback()
    with empty_module():
        module = build()
    _fill_component(module, files, dtype, what, str(folder))
    return module


def _fill_component(module: torch.nn.Module, files: list[Path], dtype: torch.dtype, what: str, source: str) -> None:
    """Give an empty (or released) module its weights from a component's safetensors file(s), cast as read."""
    wanted = set(module.state_dict())
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            for name, tensor in iter_tensors(file, lambda n, stored: dtype):
                if name.endswith("position_ids"):
                    continue
                if name not in wanted:
                    alt = name[len("text_model."):] if name.startswith("text_model.") else "text_model." + name
                    name = alt if alt in wanted else name
                state[name] = tensor
    except WeightsFileError as e:
        raise ModelLoadError(str(e)) from None
    _load_strict(module, state, what, source)


def _load_diffusers_folder(path: Path, dtype: torch.dtype = torch.float32,
                           vae_dtype: Optional[torch.dtype] = None) -> SDModel:
    """A diffusers folder: SDXL when it has ``text_encoder_2`` (StableDiffusionXLPipeline layout), SD 2.x when the
    text encoder is OpenCLIP-style (``gelu``; SD1's CLIP ViT-L uses ``quick_gelu``), else SD1. The prediction type
    comes from the scheduler config."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path}: no model_index.json — expected a diffusers model folder (unet/, vae/, "
                             f"text_encoder/, tokenizer/, scheduler/)")
    names = json.loads(index.read_text())
    vae_dtype = vae_dtype or dtype

    def diffusers_part(cls, sub: str, part_dtype: torch.dtype, what: str):
        return _load_component(path / sub, lambda: cls.from_config(cls.load_config(path / sub)), part_dtype, what,
                               lambda: cls.from_pretrained(path, subfolder=sub, local_files_only=True,
                                                           torch_dtype=part_dtype))

    def clip_part(cls, sub: str, what: str):
        return _load_component(path / sub, lambda: cls(CLIPTextConfig.from_pretrained(path / sub)), dtype, what,
                               lambda: cls.from_pretrained(path, subfolder=sub, local_files_only=True,
                                                           torch_dtype=dtype))

    unet = diffusers_part(UNet2DConditionModel, "unet", dtype, "UNet")
    vae = diffusers_part(AutoencoderKL, "vae", vae_dtype, "VAE")
    text_encoder = clip_part(CLIPTextModel, "text_encoder", "text encoder")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    text_encoder_2 = tokenizer_2 = None
    if "text_encoder_2" in names:
        text_encoder_2 = clip_part(CLIPTextModelWithProjection, "text_encoder_2", "second text encoder")
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    sched_cfg = path / "scheduler" / "scheduler_config.json"
    prediction = json.loads(sched_cfg.read_text()).get("prediction_type", "epsilon") if sched_cfg.is_file() else "epsilon"
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True) \
        if sched_cfg.is_file() else _noise_scheduler(prediction)
    if text_encoder_2 is not None:
        family = "sdxl"
    else:
        family = "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"
    return SDModel(family, unet, vae, text_encoder, tokenizer, scheduler, prediction, str(path), text_encoder_2,
                   tokenizer_2)


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
    elif any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        # FLUX.1 is its own family (lora_core.image.flux); this loader reads the SD families only
        what = "a FLUX.1 model, which trains as model_family flux (lora_core.image.flux), not through the SD loader"
    elif any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
        what = "an SD3-style model, which this trainer does not support"
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
    """The parts of an LDM ``original_config`` that diffusers' converters need, read off the tensor shapes.

    What the weights cannot tell — the width of an attention head — is taken from the family: SD1 has 8 heads per
    block, SD 2.x and SDXL heads of 64 channels."""
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
        else:
            depth.append(0)
    attn_depths = [d for d in depth if d]
    # one depth for all blocks (SD1/SD2), or per block like SDXL's [1, 2, 10] (1 where a block has no attention)
    transformer_depth = attn_depths[0] if len(set(attn_depths)) <= 1 else [d or 1 for d in depth]
    attn2 = next(k for k in keys if k.startswith(u) and k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in keys if k.startswith(u) and k.endswith("proj_in.weight"))
    unet = {"in_channels": int(in_channels), "out_channels": int(state[u + "out.2.weight"].shape[0]),
            "model_channels": int(model_channels), "channel_mult": channel_mult,
            "num_res_blocks": num_res_blocks, "attention_resolutions": attention_resolutions,
            "context_dim": int(state[attn2].shape[1]), "transformer_depth": transformer_depth or 1,
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
    scale_factor = 0.13025 if family == "sdxl" else 0.18215
    return {"model": {"params": {"unet_config": {"params": unet}, "scale_factor": scale_factor,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


V_NAME = re.compile(r"768|(^|[-_. ])v([-_. ]|$)", re.IGNORECASE)


def detect_prediction_type(source: str, state: dict[str, torch.Tensor], metadata: dict[str, str],
                           family: str) -> tuple[str, str]:
    """(prediction type, why) for a single-file checkpoint, first rule that applies:

    1. a ``v_pred`` tensor — the marker sd-scripts and ComfyUI put into v-prediction checkpoints;
    2. ``modelspec.prediction_type`` in the safetensors header (``v`` or ``epsilon``);
    3. an A1111-style config next to the file (``<name>.yaml`` with ``parameterization: "v"``);
    4. SD 2.x only: the file name — Stability's v-prediction files are the 768 ones (``v2-1_768-ema-pruned``,
       ``768-v-ema``), and nothing in their keys tells them from the 512 epsilon files (same shapes), so a name with
       ``768`` or a standalone ``v`` token means v-prediction;
    5. otherwise epsilon.
    ``model.prediction_type`` in the config always wins over all of these (`load_sd_model`)."""
    if "v_pred" in state:
        return "v_prediction", "the file has a v_pred marker"
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "epsilon"):
        return ("epsilon" if spec == "epsilon" else "v_prediction"), f"modelspec.prediction_type is {spec!r}"
    sidecar = Path(source).with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        try:
            params = (yaml.safe_load(sidecar.read_text(encoding="utf-8")) or {}).get("model", {}).get("params", {})
        except (yaml.YAMLError, AttributeError) as e:
            raise ModelLoadError(f"{sidecar.name}: cannot read the model config next to the checkpoint ({e})") from None
        parameterization = str(params.get("parameterization", "eps")) if isinstance(params, dict) else "eps"
        return ("v_prediction" if parameterization == "v" else "epsilon"), \
            f"{sidecar.name} sets parameterization {parameterization!r}"
    if family == "sd2" and V_NAME.search(Path(source).stem):
        return "v_prediction", f"SD 2.x file named like a 768-v model ({Path(source).name})"
    return "epsilon", "no v-prediction marker, modelspec, config or 768-v name"


def clip_text_model(hidden: int, layers: int, intermediate: int, act: str, projection_dim: Optional[int] = None,
                    vocab_size: int = 49408, max_positions: int = 77):
    """A CLIP text encoder of the given shape: ``quick_gelu`` is OpenAI CLIP (SD1, SDXL's first encoder), ``gelu``
    OpenCLIP (SD2, SDXL's second encoder, which has a projection for the pooled embedding). Heads are 64 wide."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), vocab_size=vocab_size,
                            max_position_embeddings=max_positions, hidden_act=act, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, projection_dim=projection_dim or hidden)
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _strip_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel has no ``text_model`` level (CLIPTextModelWithProjection still has it)."""
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()
            if not k.endswith("position_ids")}


def _load_clip(state: dict[str, torch.Tensor], source: str, what: str, into: Any = None):
    """SD1's / SDXL's first encoder (OpenAI CLIP keys, already HF-named in the checkpoint); ``into``: fill this
    (released) encoder instead of building one."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    te_state = _strip_text_model(convert_ldm_clip_checkpoint(state))
    if into is not None:
        _load_strict(into, te_state, what, source)
        return into
    with empty_module():
        text_encoder = clip_text_model(
            te_state["embeddings.token_embedding.weight"].shape[1],
            len(_count(list(te_state), r"encoder\.layers\.(\d+)\.")),
            te_state["encoder.layers.0.mlp.fc1.weight"].shape[0], "quick_gelu",
            vocab_size=te_state["embeddings.token_embedding.weight"].shape[0],
            max_positions=te_state["embeddings.position_embedding.weight"].shape[0])
    _load_strict(text_encoder, te_state, what, source)
    return text_encoder


class _HandOver(dict):
    """A checkpoint part whose ``get`` hands each tensor over once. diffusers' ``convert_open_clip_checkpoint`` reads
    every transformer tensor with ``get`` and copies the q/k/v thirds of each fused ``in_proj`` weight (315 MB for
    SDXL's bigG in bf16); once read, the fused original is gone from here, so each copy replaces its original instead
    of sitting beside all of them at the end of the load, where the peak is. A second read of a tensor finds
    nothing, which `_load_strict` reports as a missing weight."""

    def get(self, key, default=None):
        return self.pop(key, default)


def _load_open_clip(state: dict[str, torch.Tensor], source: str, prefix: str, what: str, penultimate: bool,
                    into: Any = None):
    """SD2's / SDXL's OpenCLIP encoder via diffusers' ``convert_open_clip_checkpoint``. SD2 conditions on the
    penultimate layer, so (like diffusers' SD2 models) its last block is dropped; SDXL keeps every block (the
    pipeline reads the penultimate hidden state) and gets the projection for the pooled embedding."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    blocks = sorted(_count(list(state), re.escape(prefix + "transformer.resblocks.") + r"(\d+)\."))
    if not blocks:
        raise ModelLoadError(f"{Path(source).name}: no {what} blocks under {prefix}transformer.resblocks")
    dropped = f"{prefix}transformer.resblocks.{blocks[-1]}."
    part = _HandOver()  # the encoder's tensors leave ``state``: the converter's q/k/v copies replace them
    for k in [k for k in state if k.startswith(prefix)]:
        tensor = state.pop(k)
        if not (penultimate and (k.startswith(dropped) or k == prefix + "text_projection")):
            part[k] = tensor
    token = part[prefix + "token_embedding.weight"]
    projection = part[prefix + "text_projection"] if prefix + "text_projection" in part else None
    text_encoder = into
    if text_encoder is None:  # ``into``: fill this (released) encoder instead of building one
        with empty_module():
            text_encoder = clip_text_model(
                token.shape[1], len(blocks) - 1 if penultimate else len(blocks),
                part[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0], "gelu",
                projection_dim=None if penultimate or projection is None else int(projection.shape[1]),
                vocab_size=token.shape[0], max_positions=part[prefix + "positional_embedding"].shape[0])
    te_state = convert_open_clip_checkpoint(text_encoder, part, prefix=prefix)
    del part
    if penultimate:
        te_state = _strip_text_model(te_state)
    _load_strict(text_encoder, te_state, what, source)
    return text_encoder


def _load_single_file(state: dict[str, torch.Tensor], source: str, metadata: dict[str, str],
                      dtype: torch.dtype = torch.float32, vae_dtype: Optional[torch.dtype] = None) -> SDModel:
    """Build each part empty and hand it the checkpoint's (already cast) tensors; each part's tensors leave
    ``state`` once it holds them, so nothing is kept twice."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)

    from .clip_tokenizer import load_clip_tokenizer

    family = detect_family(list(state))
    try:
        original = infer_ldm_config(state, family)
    except (KeyError, StopIteration, IndexError) as e:
        raise ModelLoadError(f"{Path(source).name}: an SD layout was expected but tensor {e} is missing — is the "
                             f"file complete?") from None
    prediction, why = detect_prediction_type(source, state, metadata, family)
    log.info("%s: %s model, %s (%s)", Path(source).name, family, prediction, why)
    unet_cfg = create_unet_diffusers_config_from_ldm(original, state)
    unet_cfg["sample_size"] = {"sdxl": 128}.get(family, 96 if prediction == "v_prediction" else 64)
    if family == "sdxl":
        # diffusers recognises SDXL's size/crop conditioning only at SDXL's real widths; read it off the shapes:
        # label_emb takes the pooled embedding plus six sinusoidal time-id embeddings
        adm_in = int(state[UNET_PREFIX + "label_emb.0.0.weight"].shape[1])
        pooled = int(state["conditioner.embedders.1.model.text_projection"].shape[1])
        unet_cfg.update(addition_embed_type="text_time", class_embed_type=None,
                        addition_time_embed_dim=(adm_in - pooled) // 6, projection_class_embeddings_input_dim=adm_in)
    vae_cfg = create_vae_diffusers_config_from_ldm(original, state)
    with empty_module():
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    _load_strict(unet, convert_ldm_unet_checkpoint(state, unet_cfg), "UNet", source)
    _drop(state, UNET_PREFIX)
    _load_strict(vae, convert_ldm_vae_checkpoint(state, vae_cfg), "VAE", source)
    _drop(state, VAE_PREFIX)
    scheduler = _noise_scheduler(prediction)
    if family == "sd1":
        return SDModel(family, unet, vae, _load_clip(state, source, "text encoder"), load_clip_tokenizer(),
                       scheduler, prediction, source)
    if family == "sd2":
        text_encoder = _load_open_clip(state, source, "cond_stage_model.model.", "text encoder", penultimate=True)
        return SDModel(family, unet, vae, text_encoder, load_clip_tokenizer(pad_token="!"), scheduler, prediction,
                       source)
    text_encoder = _load_clip(state, source, "first text encoder")
    text_encoder_2 = _load_open_clip(state, source, "conditioner.embedders.1.model.", "second text encoder",
                                     penultimate=False)
    return SDModel(family, unet, vae, text_encoder, load_clip_tokenizer(), scheduler, prediction, source,
                   text_encoder_2, load_clip_tokenizer(pad_token="!"))


FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2")  # what `release_weights` / `reload_weights` handle
_PART_PREFIXES = {"vae": (VAE_PREFIX,), "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
                  "text_encoder_2": ("conditioner.embedders.1.",)}


def can_reload(model: SDModel) -> bool:
    """Whether released parts can be read back cheaply: the base model is a safetensors single file, or a diffusers
    folder whose VAE and text encoders are safetensors (a pickle would have to be unpickled whole)."""
    source = Path(model.source)
    if source.is_file():
        return source.suffix.lower() == ".safetensors"
    return source.is_dir() and all(_component_files(source / name) for name in FROZEN_PARTS
                                   if getattr(model, name) is not None)


def release_weights(module: torch.nn.Module) -> None:
    """Drop a frozen module's parameters from memory (they become storage-less meta tensors of the same shape and
    dtype); its buffers, small and computed, stay. `reload_weights` reads them back from the base model."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            sub._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                       requires_grad=param.requires_grad)


def reload_weights(model: SDModel, names: list[str]) -> None:
    """Read the named parts (of `FROZEN_PARTS`) back from the base model into their released modules, tensor by
    tensor, each in the dtype it had — for a sample after caching released them (`ImageTask`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    source = Path(model.source)
    dtypes = {name: next(getattr(model, name).parameters()).dtype for name in names}
    if source.is_dir():
        for name in names:
            _fill_component(getattr(model, name), _component_files(source / name), dtypes[name], name, str(source))
        return
    wanted = {name: _PART_PREFIXES[name] for name in names}
    try:
        state = dict(iter_tensors(source, lambda key, stored: next(dtypes[n] for n, p in wanted.items()
                                                                   if key.startswith(p)),
                                  keep=lambda key: any(key.startswith(p) for p in wanted.values())))
    except WeightsFileError as e:
        raise ModelLoadError(str(e)) from None
    if "vae" in names:
        _load_strict(model.vae, convert_ldm_vae_checkpoint(state, model.vae.config), "VAE", str(source))
        _drop(state, VAE_PREFIX)
    if "text_encoder" in names:
        if model.family == "sd2":
            _load_open_clip(state, str(source), "cond_stage_model.model.", "text encoder", penultimate=True,
                            into=model.text_encoder)
        else:
            _load_clip(state, str(source), "text encoder", into=model.text_encoder)
    if "text_encoder_2" in names:
        _load_open_clip(state, str(source), "conditioner.embedders.1.model.", "second text encoder",
                        penultimate=False, into=model.text_encoder_2)


def _drop(state: dict[str, torch.Tensor], prefix: str) -> None:
    """Forget a loaded part's checkpoint tensors (the module holds them now; a converter's copies go free)."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _load_strict(module: torch.nn.Module, state: dict, what: str, source: str) -> None:
    """Make ``state``'s tensors the module's weights (no copy, dtype kept); any weight left unfilled is an error."""
    missing, unexpected = assign_weights(module, state)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(f"{Path(source).name}: the {what} weights do not match the inferred layout "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
