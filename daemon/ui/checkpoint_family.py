"""Which model family a checkpoint in the Base model list is, read from its safetensors header only (stdlib, no torch).

The tab shows FLUX.1 checkpoints as such, shows the FLUX settings and presets only for them, and in A1111 (which
cannot run FLUX) says so before anything is queued. It must know without loading the file: a FLUX file is 12-24 GB,
but its header (the JSON table of tensor names at the start) is a few hundred KB, and one key tells FLUX apart —
the key-norm scale of the first double block (``double_blocks.0.img_attn.norm.key_norm.scale``, with Forge's and
ComfyUI's ``model.diffusion_model.`` prefix in full files, none in a transformer-only file); dev has a guidance
embedder (``guidance_in.``), schnell has not. A diffusers folder says its pipeline class in ``model_index.json``.
Results are cached by path, size and modification time, so a refresh rereads only files that changed.

A transformer-only FLUX file (``flux1-dev.safetensors`` as Black Forest Labs ship it) needs T5-XXL, CLIP-L and the AE
from elsewhere; Forge keeps them in ``models/text_encoder`` and ``models/VAE`` beside ``models/Stable-diffusion``, and
`forge_parts` finds them there so the tab can fill ``t5_path``/``clip_path``/``vae_path`` for the user.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
FLUX_GUIDANCE = "guidance_in.in_layer.weight"
MAX_HEADER = 100 * 1024 * 1024  # a larger "header" is not a safetensors file
LABELS = {"flux-dev": "FLUX.1 dev", "flux-schnell": "FLUX.1 schnell"}
# the parts a full FLUX file carries beside the transformer (Forge's and ComfyUI's prefixes) → the config field
# that names the part's own file otherwise, and where Forge keeps such files (relative to its models folder)
PARTS = {"t5_path": (("text_encoders.t5xxl.",), "text_encoder", "t5xxl*.safetensors"),
         "clip_path": (("text_encoders.clip_l.",), "text_encoder", "clip_l*.safetensors"),
         "vae_path": (("vae.", "first_stage_model."), "VAE", "ae*.safetensors")}
_cache: dict[tuple[str, int, float], tuple[Optional[str], frozenset]] = {}


def _header_keys(path: Path) -> list[str]:
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > MAX_HEADER:
            return []
        return list(json.loads(fh.read(size)))


def _from_keys(keys: list[str]) -> tuple[Optional[str], frozenset]:
    """(family, the config fields of the parts the file lacks) from a header's tensor names."""
    if not any(k.endswith(FLUX_MARKER) for k in keys):
        return None, frozenset()
    family = "flux-dev" if any(k.endswith(FLUX_GUIDANCE) for k in keys) else "flux-schnell"
    missing = frozenset(field for field, (prefixes, _, _) in PARTS.items()
                        if not any(k.startswith(prefixes) for k in keys))
    return family, missing


def _from_folder(folder: Path) -> Optional[str]:
    """A diffusers folder: FluxPipeline in model_index.json, dev/schnell from the transformer's config."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if index.get("_class_name") != "FluxPipeline":
        return None
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "flux-dev"
    return "flux-dev" if config.get("guidance_embeds", True) else "flux-schnell"


def _info(path: str | Path) -> tuple[Optional[str], frozenset]:
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None, frozenset()
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _cache:
        try:
            if path.is_dir():
                _cache[key] = (_from_folder(path), frozenset())
            elif path.suffix.lower() == ".safetensors":
                _cache[key] = _from_keys(_header_keys(path))
            else:
                _cache[key] = (None, frozenset())
        except (OSError, ValueError, struct.error):
            _cache[key] = (None, frozenset())
    return _cache[key]


def family_of(path: str | Path) -> Optional[str]:
    """``"flux-dev"``, ``"flux-schnell"``, or None (an SD checkpoint, or a file that cannot be read: the engine's
    own checks name what is wrong with it when a run is submitted)."""
    return _info(path)[0]


def forge_parts(path: str | Path) -> dict[str, str]:
    """For a FLUX file without its text encoders or AE: config field → the file Forge keeps for that part
    (``models/text_encoder/t5xxl_fp16.safetensors``, ``clip_l.safetensors``, ``models/VAE/ae.safetensors``), for the
    fields it can fill; an fp16 T5 is preferred to an fp8 one. Empty for a full file or when none is found."""
    missing = _info(path)[1]
    models = Path(path).resolve().parent.parent
    found = {}
    for field in sorted(missing):
        _, folder, pattern = PARTS[field]
        files = sorted((models / folder).glob(pattern), key=lambda f: ("fp8" in f.name.lower(), f.name))
        if files:
            found[field] = str(files[0])
    return found


def is_flux(path: str | Path | None) -> bool:
    return bool(path) and (family_of(path) or "").startswith("flux")
