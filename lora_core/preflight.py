"""Cheap checks of a valid config against the files it names, run before anything is queued or loaded.

Why separate from the schema (`lora_core.config`): the schema checks what a config says; these check what is on
disk — is the base model really a base model (not a LoRA, not a text file renamed ``.safetensors``), does the
dataset folder hold any image, is the output name safe to put in a file name. Both the daemon (at ``validate`` and
``submit``, so bad input is refused before it is queued) and the training child (first thing, so ``lora-train``
users get the same message) run `preflight`. Standard library only — no torch, no PIL — and each check reads at
most a file's safetensors header, so the daemon can call it on its request path.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Optional

# What the trainer reads as an image; `lora_core.dataset.scan` uses this list too. (.gif, .bmp, .tif are pictures
# the trainer does not read: the scan names them as skipped, and `prepare` converts them.)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MODEL_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
LORA_KEY_MARKS = ("lora_up.", "lora_down.", "lora_A.", "lora_B.", ".hada_w1", ".lokr_w1")
BASE_KEY_MARKS = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.", "cond_stage_model.",
                  "down_blocks.", "encoder.down", "model.layers.", "transformer.")


class HeaderError(ValueError):
    """The file is not a readable safetensors file; the message says what was found."""


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor names → dtype/shape/offsets, plus ``__metadata__``), read
    without torch: 8 bytes little-endian length, then that many bytes of JSON."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise HeaderError(f"{path.name} is {size} bytes: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise HeaderError(f"{path.name} is not a safetensors file (its first bytes claim a {length}-byte header "
                              f"in a {size}-byte file; is it a text or another kind of file renamed .safetensors?)")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    return header


def looks_like_lora(keys: list[str]) -> bool:
    """A file of adapter weights (kohya or peft LoRA, LyCORIS) with none of a base model's weights."""
    return any(m in k for k in keys for m in LORA_KEY_MARKS) and not any(k.startswith(BASE_KEY_MARKS) for k in keys)


def check_base_model(path: Path, field: str = "model.base_model") -> list[str]:
    """A base model file must be a model file by suffix and, for .safetensors, a real one that is not a LoRA."""
    if path.is_dir():
        return []
    if path.suffix.lower() not in MODEL_FILE_EXTS:
        return [f"{field}: {path.name} is not a model file (expected a diffusers folder, a .safetensors or a "
                f".ckpt checkpoint)"]
    if path.suffix.lower() != ".safetensors":
        return []
    try:
        header = safetensors_header(path)
    except (HeaderError, OSError) as e:
        return [f"{field}: {e}"]
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return [f"{field}: {path.name} holds no tensors"]
    if looks_like_lora(keys):
        return [f"{field}: {path.name} is a LoRA, not a base model; choose the checkpoint the LoRA is trained on "
                f"(a LoRA goes in the WebUI's Lora folder)"]
    return []


def count_images(folder: Path, limit: int = 1) -> int:
    """Images under `folder` (hidden folders skipped), counting only up to `limit`: enough to say "not empty"."""
    found = 0
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and \
                not any(part.startswith(".") for part in p.relative_to(folder).parts):
            found += 1
            if found >= limit:
                break
    return found


def check_name(value: Any, field: str) -> list[str]:
    """A name that becomes a file name: no control characters (a NUL or newline breaks files and logs)."""
    if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        return [f"{field}: must not contain control characters such as a NUL byte or a newline, got {value!r}"]
    return []


def preflight(cfg: Any) -> list[str]:
    """Every problem found with the files a valid config names, field first (empty when all is well)."""
    problems = check_name(cfg.output.output_name, "output.output_name")
    m, d = cfg.model, cfg.data
    text = getattr(cfg, "is_text", False)
    if not text and m.base_model:
        problems += check_base_model(Path(m.base_model))
        if not problems:
            problems += check_flux(cfg)
    if text:
        path = Path(d.train_data_file) if d.train_data_file else None
        if path is not None and path.is_file() and path.stat().st_size == 0:
            problems.append(f"data.train_data_file: {path.name} is empty")
    elif d.train_data_dir and Path(d.train_data_dir).is_dir() and not count_images(Path(d.train_data_dir)):
        problems.append(f"data.train_data_dir: no images in {d.train_data_dir} (looked for "
                        f"{', '.join(IMAGE_EXTS)}, hidden folders skipped)")
    return problems


TINY_T5_MARK = "lora_scripts.t5_tokenizer"  # header metadata of tiny FLUX files: "tiny" = build the T5 tokenizer
# where Forge ships FLUX's T5 tokenizer, relative to its install folder (both variants use the same tokenizer)
FORGE_T5_TOKENIZERS = tuple(Path("backend", "huggingface", "black-forest-labs", f"FLUX.1-{v}", "tokenizer_2")
                            for v in ("dev", "schnell"))


def flux_facts(path: Path) -> Optional[dict]:
    """What a FLUX.1 single file holds, read from its header (None when it holds no FLUX.1 transformer):
    ``prefix`` of the transformer's keys, ``variant`` (dev has a guidance embedder), whether T5, CLIP-L and the AE
    are inside, and the header metadata."""
    from .image import flux_keys as fk

    try:
        header = safetensors_header(Path(path))
    except (HeaderError, OSError):
        return None
    meta = header.pop("__metadata__", None) or {}
    prefix = next((p for p in (fk.TRANSFORMER_PREFIX, "") if p + fk.FLUX_MARKER in header), None)
    if prefix is None:
        return None
    return {"prefix": prefix, "variant": "dev" if prefix + "guidance_in.in_layer.weight" in header else "schnell",
            "t5": any(k.startswith(fk.T5_PREFIX) for k in header),
            "clip": any(k.startswith(fk.CLIP_PREFIX) for k in header),
            "vae": any(k.startswith(fk.VAE_PREFIXES) for k in header), "metadata": meta}


def find_t5_tokenizer(model_file: Path) -> Optional[Path]:
    """Forge's FLUX T5 tokenizer folder, looked for above the model file and above this extension's own folder
    (``<forge>/extensions/lora-scripts``); None when neither is inside a Forge install."""
    for start in (Path(model_file).resolve().parent, Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            for rel in FORGE_T5_TOKENIZERS:
                candidate = folder / rel
                if (candidate / "tokenizer.json").is_file() or (candidate / "spiece.model").is_file():
                    return candidate
    return None


def _flux_folder_variant(folder: Path) -> Optional[str]:
    """dev/schnell of a diffusers FluxPipeline folder (its transformer config), None for any other folder."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        if index.get("_class_name") != "FluxPipeline":
            return None
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "dev" if config.get("guidance_embeds") else "schnell"


def check_flux(cfg: Any) -> list[str]:
    """A FLUX.1 base model (``model_family: flux``, or auto-detected) with what it needs: text encoders and AE in
    the file or named by ``model.t5_path``/``clip_path``/``vae_path``, a T5 tokenizer, no guidance for schnell."""
    m, t = cfg.model, cfg.training
    base = Path(m.base_model)
    family = getattr(m, "model_family", "auto")
    if base.is_dir():
        variant = _flux_folder_variant(base)
        if variant is None:
            return [f"model.model_family: flux, but {base} is not a diffusers FLUX folder (model_index.json of a "
                    f"FluxPipeline)"] if family == "flux" else []
        facts = None
    else:
        facts = flux_facts(base)
        if facts is None:
            return [f"model.model_family: flux, but {base.name} holds no FLUX.1 transformer (no double_blocks.0 "
                    f"keys)"] if family == "flux" else []
        variant = facts["variant"]
    if family not in ("auto", "flux"):
        return [f"model.model_family: {family}, but {base.name} is a FLUX.1 [{variant}] model (use flux or auto)"]
    problems = []
    if variant == "schnell" and getattr(t, "guidance_scale", None) is not None:
        problems.append(f"training.guidance_scale: {base.name} is FLUX.1 [schnell], which has no guidance "
                        f"embedding; leave guidance_scale empty (it applies to [dev] only)")
    network = getattr(m, "network_type", "lora")
    if network != "lora" or getattr(m, "use_dora", False):  # refused now, not at export after hours of training
        problems.append(f"model.network_type: FLUX LoRA files hold plain LoRA only (q/k/v are fused into BFL's qkv "
                        f"by rank concatenation, which {network}{' with DoRA' if network != 'dora' else ''} "
                        f"cannot be); use lora")
    if facts is None:
        return problems
    parts = (("t5", "t5_path", "the T5-XXL text encoder", "models/text_encoder/t5xxl_fp16.safetensors"),
             ("clip", "clip_path", "the CLIP-L text encoder", "models/text_encoder/clip_l.safetensors"),
             ("vae", "vae_path", "the AE (VAE)", "models/VAE/ae.safetensors"))
    for key, name, what, where in parts:
        if not facts[key] and not getattr(m, name, None):
            problems.append(f"model.{name}: {base.name} is a FLUX transformer without {what}; set model.{name} to "
                            f"its file (in Forge: {where})")
    t5_file = Path(m.t5_path) if getattr(m, "t5_path", None) else base
    tiny = (facts["metadata"] if t5_file == base else _metadata_of(t5_file)).get(TINY_T5_MARK) == "tiny"
    if not getattr(m, "t5_tokenizer", None) and not tiny and (facts["t5"] or getattr(m, "t5_path", None)) \
            and find_t5_tokenizer(base) is None:
        problems.append(f"model.t5_tokenizer: no T5 tokenizer for {base.name}: set model.t5_tokenizer to a folder "
                        f"with tokenizer.json (or spiece.model), or keep the model inside Forge, whose "
                        f"{FORGE_T5_TOKENIZERS[0].as_posix()} is used when found")
    return problems


def _metadata_of(path: Path) -> dict:
    try:
        return safetensors_header(path).get("__metadata__") or {}
    except (HeaderError, OSError):
        return {}


def require(cfg: Any) -> None:
    """Raise the schema's ConfigError with every preflight problem, for entry points that stop on config errors."""
    problems = preflight(cfg)
    if problems:
        from .config import ConfigError

        raise ConfigError(problems)
