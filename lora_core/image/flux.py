"""The FLUX.1 family: load a FLUX.1 [dev] or [schnell] base model offline, as `sd_models` does for SD1/SD2/SDXL.

Sources, each read tensor by tensor into its training dtype (`weights_io`, never a whole-file copy):

* a diffusers folder (``FluxPipeline`` layout: transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (T5),
  tokenizer/, tokenizer_2/, scheduler/);
* a full BFL-format single file as Forge and ComfyUI keep it in ``models/Stable-diffusion`` (transformer under
  ``model.diffusion_model.``, AE under ``vae.``, CLIP-L and T5 under ``text_encoders.…``);
* a transformer-only BFL file (``flux1-dev.safetensors``: ``double_blocks.N…`` at the top level) with the encoders
  and the AE from separate files: ``model.t5_path``, ``model.clip_path``, ``model.vae_path`` (Forge keeps them in
  ``models/text_encoder`` and ``models/VAE``). Any part of a full file can be replaced the same way.

fp8 files (``float8_e4m3fn``, what most people download) load like the others: each tensor is cast to the training
dtype as it is read; ``model.fp8_base`` then stores the frozen Linear weights in fp8 again with a per-channel scale
(`fp8`). Every config is read off the weights (block counts, widths, heads from the RMS-norm width, dev vs schnell
from the guidance embedder: `flux_keys.infer_config`; T5 and CLIP likewise), so nothing is fetched.

Tokenizers: CLIP's is built from the BPE table shipped with the package. T5's cannot be (no hub): a diffusers folder
has its own ``tokenizer_2``; for single files it is ``model.t5_tokenizer``, or the one Forge ships beside its model
configs (``backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2``), found by walking up from the model file
and from this extension's folder (`lora_core.preflight.find_t5_tokenizer`); tiny test files say so in their header.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..preflight import TINY_T5_MARK, find_t5_tokenizer, flux_facts
from . import flux_keys
from .sd_models import ModelLoadError, _count, _load_component, _load_strict, _strip_text_model, clip_text_model
from .weights_io import WeightsFileError, empty_module, iter_tensors, read_header

log = logging.getLogger(__name__)


@dataclass
class FluxModel:
    """A loaded FLUX.1 model. ``text_encoder`` is CLIP-L (its pooled output), ``text_encoder_2`` T5; both may be
    None once their outputs are cached (the task frees them)."""
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    noise_scheduler: Any  # FlowMatchEulerDiscreteScheduler (sampling)
    variant: str  # dev | schnell
    source: str
    family: str = "flux"
    prediction_type: str = "flow"

    @property
    def base_model_version(self) -> str:
        """sd-scripts' ``ss_base_model_version`` for FLUX (``flux1``; dev and schnell are told by modelspec)."""
        return "flux1"


def scheduler_for(variant: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .flux_tiny import SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER[variant])


def load_flux_model(path: str | Path, t5_path: Optional[str] = None, clip_path: Optional[str] = None,
                    vae_path: Optional[str] = None, t5_tokenizer: Optional[str] = None,
                    dtype: torch.dtype = torch.float32, vae_dtype: Optional[torch.dtype] = None,
                    text_encoders: bool = True) -> FluxModel:
    """Load a FLUX.1 model with the transformer and encoders in ``dtype`` and the AE in ``vae_dtype``.
    ``text_encoders=False`` skips T5 and CLIP (the memory plan measures the transformer alone)."""
    path = Path(path)
    vae_dtype = vae_dtype or dtype
    if path.is_dir():
        return _load_folder(path, dtype, vae_dtype, text_encoders, t5_tokenizer)
    facts = flux_facts(path)
    if facts is None:
        raise ModelLoadError(f"{path.name}: not a FLUX.1 model (no {flux_keys.FLUX_MARKER})")
    transformer = _load_transformer(path, facts["prefix"], dtype)
    variant = facts["variant"]
    vae = _load_vae(Path(vae_path) if vae_path else path, vae_dtype, "model.vae_path" if vae_path else None)
    clip = t5 = tok2 = None
    if text_encoders:
        clip = _load_clip(Path(clip_path) if clip_path else path, dtype, "model.clip_path" if clip_path else None)
        t5_file = Path(t5_path) if t5_path else path
        t5 = _load_t5(t5_file, dtype, "model.t5_path" if t5_path else None)
        tok2 = load_t5_tokenizer(t5_tokenizer, path, t5_file)
    from .clip_tokenizer import load_clip_tokenizer

    for module in (transformer, vae, clip, t5):  # built modules start in train mode: T5's dropout would be on
        if module is not None:
            module.eval()
    log.info("%s: FLUX.1 [%s], %d double + %d single blocks", path.name, variant,
             transformer.config.num_layers, transformer.config.num_single_layers)
    return FluxModel(transformer, vae, clip, load_clip_tokenizer() if text_encoders else None, t5, tok2,
                     scheduler_for(variant), variant, str(path))


def load_t5_tokenizer(configured: Optional[str], model_file: Path, t5_file: Path):
    """``model.t5_tokenizer``, a tiny model's own (marked in its header), or Forge's; refused naming both."""
    from transformers import T5TokenizerFast

    if configured:
        return T5TokenizerFast.from_pretrained(configured, local_files_only=True)
    meta = _metadata(t5_file)
    if meta.get(TINY_T5_MARK) == "tiny":
        from .flux_tiny import build_t5_tokenizer

        return build_t5_tokenizer()
    found = find_t5_tokenizer(model_file)
    if found is None:
        raise ModelLoadError(
            f"model.t5_tokenizer: no T5 tokenizer for {model_file.name}: set model.t5_tokenizer to a folder with "
            f"tokenizer.json (or spiece.model), or run inside Forge, whose backend/huggingface/black-forest-labs/"
            f"FLUX.1-dev/tokenizer_2 is used when found")
    log.info("T5 tokenizer: %s", found)
    return T5TokenizerFast.from_pretrained(str(found), local_files_only=True)


def _metadata(path: Path) -> dict[str, str]:
    try:
        return read_header(path)[1]
    except WeightsFileError:
        return {}


def _read(path: Path, keep, dtype: torch.dtype, what: str, field: Optional[str]) -> dict[str, torch.Tensor]:
    try:
        return dict(iter_tensors(path, lambda n, stored: dtype, keep=keep))
    except WeightsFileError as e:
        raise ModelLoadError(f"{field + ': ' if field else ''}{e}") from None
    except OSError as e:
        raise ModelLoadError(f"{field + ': ' if field else ''}cannot read the {what} file {path} ({e})") from None


def _load_transformer(path: Path, prefix: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    def keep(k: str) -> bool:
        return k.startswith(prefix) if prefix else k.split(".")[0] in BFL_TOP

    state = _read(path, keep, dtype, "FLUX transformer", None)
    state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        inferred = flux_keys.infer_config(state)
        converted = flux_keys.bfl_to_diffusers(state, inferred["dims"])
    except KeyError as e:
        raise ModelLoadError(f"{path.name}: the FLUX transformer does not have the FLUX.1 layout ({e.args[0]})") \
            from None
    del state
    with empty_module():
        transformer = FluxTransformer2DModel(**inferred["config"])
    _load_strict(transformer, converted, "FLUX transformer", str(path))
    return transformer


BFL_TOP = {"double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"}


def _prefixed(path: Path, prefixes: tuple[str, ...], marker: str) -> Optional[str]:
    """Which of ``prefixes`` (or "" for none) the file stores the part under, judged by its ``marker`` key."""
    keys = read_header(path)[0]
    for prefix in prefixes + ("",):
        if prefix + marker in keys:
            return prefix
    return None


def _part(path: Path, prefixes: tuple[str, ...], marker: str, dtype: torch.dtype, what: str,
          field: Optional[str]) -> dict[str, torch.Tensor]:
    """The tensors of one part (AE, CLIP-L, T5) of a file, prefix stripped; an error naming the field if absent."""
    try:
        prefix = _prefixed(path, prefixes, marker)
    except WeightsFileError as e:
        raise ModelLoadError(f"{field + ': ' if field else ''}{e}") from None
    if prefix is None:
        hint = {"AE": "model.vae_path", "CLIP-L": "model.clip_path", "T5": "model.t5_path"}[what]
        raise ModelLoadError(f"{field or hint}: {path.name} holds no {what} weights (looked for {marker}); "
                             f"{'choose the ' + what + ' file' if field else 'set ' + hint + ' to its file'}")
    state = _read(path, lambda k: k.startswith(prefix) and (prefix or not k.startswith(NOT_PARTS)), dtype, what,
                  field)
    return {k[len(prefix):]: v for k, v in state.items()}


# in a file that holds several parts without prefixes nothing is ambiguous; these never belong to a part
NOT_PARTS = ("model.", "text_encoders.", "vae.", "first_stage_model.")


def _load_vae(path: Path, dtype: torch.dtype, field: Optional[str]):
    """FLUX's AE from LDM-named weights (``encoder.down.0…``), config read off the shapes."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if path.is_dir():  # a diffusers AE folder
        return _load_component(path, lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(path)), dtype, "AE",
                               lambda: AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype))
    state = _part(path, flux_keys.VAE_PREFIXES, "decoder.conv_in.weight", dtype, "AE", field)
    try:
        config = flux_vae_config(state)
    except KeyError as e:
        raise ModelLoadError(f"{field or 'model.vae_path'}: {path.name}: the AE has no {e.args[0]}") from None
    with empty_module():
        vae = AutoencoderKL(**config)
    _load_strict(vae, convert_ldm_vae_checkpoint(state, vae.config), "AE", str(path))
    return vae


def _load_clip(path: Path, dtype: torch.dtype, field: Optional[str]):
    """CLIP-L (HF names, with or without ``text_model.``), shape read off the weights."""
    state = _strip_text_model(_part(path, (flux_keys.CLIP_PREFIX,), "text_model.final_layer_norm.weight", dtype,
                                    "CLIP-L", field) or {})
    if "final_layer_norm.weight" not in state:
        raise ModelLoadError(f"{field or 'model.clip_path'}: {path.name}: CLIP-L weights are incomplete")
    token = state["embeddings.token_embedding.weight"]
    with empty_module():
        encoder = clip_text_model(int(token.shape[1]), len(_count(list(state), r"encoder\.layers\.(\d+)\.")),
                                  int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]), "quick_gelu",
                                  vocab_size=int(token.shape[0]),
                                  max_positions=int(state["embeddings.position_embedding.weight"].shape[0]))
    state = {k: v for k, v in state.items() if k in set(encoder.state_dict())}  # e.g. a text_projection: unused
    _load_strict(encoder, state, "CLIP-L", str(path))
    return encoder


def _load_t5(path: Path, dtype: torch.dtype, field: Optional[str]):
    """T5 v1.1 encoder (HF names); vocabulary, width, heads (relative attention bias), layers from the shapes."""
    from .flux_tiny import t5_encoder

    state = _part(path, (flux_keys.T5_PREFIX,), "encoder.final_layer_norm.weight", dtype, "T5", field)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    try:
        vocab, d_model = state["shared.weight"].shape
        bias = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        heads = int(bias.shape[1])
        d_kv = int(state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // heads
        d_ff = int(state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0])
    except KeyError as e:
        raise ModelLoadError(f"{field or 'model.t5_path'}: {path.name}: not a T5 v1.1 encoder (no {e.args[0]})") \
            from None
    layers = len(_count(list(state), r"encoder\.block\.(\d+)\."))
    with empty_module():
        encoder = t5_encoder(int(vocab), int(d_model), d_kv, heads, d_ff, layers, buckets=int(bias.shape[0]))
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in the model, stored once in files
    _load_strict(encoder, state, "T5", str(path))
    encoder.encoder.embed_tokens = encoder.shared  # keep the tie after assigning
    return encoder


def _load_folder(path: Path, dtype: torch.dtype, vae_dtype: torch.dtype, text_encoders: bool,
                 t5_tokenizer: Optional[str]) -> FluxModel:
    """A diffusers FluxPipeline folder; its own tokenizers (``model.t5_tokenizer`` overrides tokenizer_2)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    index = path / "model_index.json"
    if not index.is_file() or json.loads(index.read_text()).get("_class_name") != "FluxPipeline":
        raise ModelLoadError(f"{path}: not a diffusers FLUX folder (model_index.json with _class_name FluxPipeline)")

    def part(cls, sub: str, part_dtype: torch.dtype, what: str):
        return _load_component(path / sub, lambda: cls.from_config(cls.load_config(path / sub)), part_dtype, what,
                               lambda: cls.from_pretrained(path, subfolder=sub, local_files_only=True,
                                                           torch_dtype=part_dtype))

    transformer = part(FluxTransformer2DModel, "transformer", dtype, "FLUX transformer")
    vae = part(AutoencoderKL, "vae", vae_dtype, "AE")
    clip = t5 = tok = tok2 = None
    if text_encoders:
        clip = _load_component(path / "text_encoder", lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(
            path / "text_encoder")), dtype, "CLIP-L", lambda: CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", local_files_only=True, torch_dtype=dtype))
        t5 = _load_folder_t5(path / "text_encoder_2", dtype)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        tok2 = T5TokenizerFast.from_pretrained(t5_tokenizer or str(path / "tokenizer_2"), local_files_only=True)
    variant = "dev" if transformer.config.guidance_embeds else "schnell"
    for module in (transformer, vae, clip, t5):
        if module is not None:
            module.eval()
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched_dir = path / "scheduler"
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True) \
        if (sched_dir / "scheduler_config.json").is_file() else scheduler_for(variant)
    return FluxModel(transformer, vae, clip, tok, t5, tok2, scheduler, variant, str(path))


def _load_folder_t5(folder: Path, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    from .sd_models import _component_files

    files = _component_files(folder)
    if not files:
        return T5EncoderModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    with empty_module():
        encoder = T5EncoderModel(T5Config.from_pretrained(folder))
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            state.update(iter_tensors(file, lambda n, stored: dtype))
    except WeightsFileError as e:
        raise ModelLoadError(str(e)) from None
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    _load_strict(encoder, state, "T5", str(folder))
    encoder.encoder.embed_tokens = encoder.shared
    return encoder


def is_flux_source(path: str | Path) -> bool:
    """A diffusers FluxPipeline folder or a file with a FLUX.1 transformer (cheap: config or header only)."""
    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        try:
            return index.is_file() and json.loads(index.read_text()).get("_class_name") == "FluxPipeline"
        except (OSError, ValueError):
            return False
    return flux_facts(path) is not None



def is_flux_config(cfg) -> bool:
    """Whether a config trains a FLUX.1 LoRA: ``model_family: flux``, or ``auto`` with a FLUX model."""
    m = cfg.model
    if m.model_family == "flux":
        return True
    return m.model_family == "auto" and bool(m.base_model) and is_flux_source(m.base_model)


def flux_vae_config(state) -> dict:
    """An ``AutoencoderKL`` config read off LDM-named AE tensors (anything with ``.shape``, e.g. header entries)."""
    from .flux_tiny import AE_SCALE, AE_SHIFT

    keys = list(state)
    ch = int(state["encoder.conv_in.weight"].shape[0])
    levels = sorted(_count(keys, r"encoder\.down\.(\d+)\."))
    mult = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in levels]
    n = len(levels)
    return dict(in_channels=int(state["encoder.conv_in.weight"].shape[1]),
                out_channels=int(state["decoder.conv_out.weight"].shape[0]),
                latent_channels=int(state["decoder.conv_in.weight"].shape[1]),
                block_out_channels=tuple(ch * m for m in mult), down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=len(_count(keys, r"encoder\.down\.0\.block\.(\d+)\.")), norm_num_groups=32,
                scaling_factor=AE_SCALE, shift_factor=AE_SHIFT, use_quant_conv="quant_conv.weight" in state,
                use_post_quant_conv="post_quant_conv.weight" in state)


class _Shape:
    """A header entry standing in for a tensor where only the shape is read."""

    def __init__(self, shape) -> None:
        self.shape = tuple(int(n) for n in shape)

    def numel(self) -> int:
        out = 1
        for n in self.shape:
            out *= n
        return out


def _shapes(path: Path, prefix: str = "", keep=None) -> dict[str, _Shape]:
    entries = read_header(path)[0]
    return {k[len(prefix):]: _Shape(v["shape"]) for k, v in entries.items()
            if k.startswith(prefix) and (keep is None or keep(k))}


def flux_source_numels(base: str | Path, t5_path: Optional[str] = None, clip_path: Optional[str] = None,
                       vae_path: Optional[str] = None) -> dict:
    """Sizes of a FLUX model's parts from headers only (for the memory plan): transformer config and variant,
    parameter counts (transformer, AE, T5 + CLIP-L), the Linear weights fp8 would store (count, channels,
    largest) and each block's Linear weights in block order (double, then single)."""
    from .sd_models import _component_files

    base = Path(base)
    if base.is_dir():
        config = json.loads((base / "transformer" / "config.json").read_text())
        tr = {k: v for f in _component_files(base / "transformer") for k, v in _shapes(f).items()}
        block_of = lambda k: (re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", k))  # noqa: E731
        vae_config = {k: v for k, v in json.loads((base / "vae" / "config.json").read_text()).items()
                      if not k.startswith("_")}
        vae_n = sum(s.numel() for f in _component_files(base / "vae") for s in _shapes(f).values())
        enc = sum(s.numel() for sub in ("text_encoder", "text_encoder_2") for f in _component_files(base / sub)
                  for s in _shapes(f).values())
        variant = "dev" if config.get("guidance_embeds") else "schnell"
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config.setdefault("axes_dims_rope", (16, 56, 56))
        order = ("transformer_blocks", "single_transformer_blocks")
    else:
        facts = flux_facts(base)
        if facts is None:
            raise ModelLoadError(f"{base.name}: not a FLUX.1 model")
        prefix = facts["prefix"]
        tr = _shapes(base, prefix, None if prefix else (lambda k: k.split(".")[0] in BFL_TOP))
        inferred = flux_keys.infer_config(tr)
        config, variant = inferred["config"], inferred["variant"]
        block_of = lambda k: re.match(r"(double_blocks|single_blocks)\.(\d+)\.", k)  # noqa: E731
        order = ("double_blocks", "single_blocks")

        def part(path: Optional[str], prefixes: tuple[str, ...], marker: str) -> dict[str, _Shape]:
            file = Path(path) if path else base
            pre = _prefixed(file, prefixes, marker) if file.is_file() else None
            return _shapes(file, pre, None if pre else (lambda k: not k.startswith(NOT_PARTS))) \
                if pre is not None else {}

        vae = part(vae_path, flux_keys.VAE_PREFIXES, "decoder.conv_in.weight")
        vae_config, vae_n = flux_vae_config(vae), sum(s.numel() for s in vae.values())
        enc = sum(s.numel() for s in part(t5_path, (flux_keys.T5_PREFIX,), "encoder.final_layer_norm.weight")
                  .values()) + sum(s.numel() for s in part(clip_path, (flux_keys.CLIP_PREFIX,),
                                                            "text_model.final_layer_norm.weight").values())
    linear = [s for s in tr.values() if len(s.shape) == 2]
    per_block: dict[tuple[int, int], int] = {}
    for k, s in tr.items():
        mt = block_of(k)
        if mt and len(s.shape) == 2:
            key = (order.index(mt.group(1)), int(mt.group(2)))
            per_block[key] = per_block.get(key, 0) + s.numel()
    return {"config": config, "variant": variant, "transformer": sum(s.numel() for s in tr.values()),
            "vae": vae_n, "vae_shapes": vae_config, "encoders": enc,
            "linear": sum(s.numel() for s in linear), "linear_channels": sum(s.shape[0] for s in linear),
            "linear_largest": max((s.numel() for s in linear), default=0),
            "blocks": [per_block[k] for k in sorted(per_block)]}
