"""Which model family a checkpoint in the Base model list is, read from its safetensors header only (stdlib, no torch).

The tab shows FLUX.1 checkpoints as such, shows the FLUX settings and presets only for them, and in A1111 (which
cannot run FLUX) says so before anything is queued. It must know without loading the file: a FLUX file is 12-24 GB,
but its header (the JSON table of tensor names at the start) is a few hundred KB, and one key tells FLUX apart —
the key-norm scale of the first double block (``double_blocks.0.img_attn.norm.key_norm.scale``, with Forge's and
ComfyUI's ``model.diffusion_model.`` prefix in full files, none in a transformer-only file); dev has a guidance
embedder (``guidance_in.``), schnell has not. A diffusers folder says its pipeline class in ``model_index.json``.
Results are cached by path, size and modification time, so a refresh rereads only files that changed.
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
_cache: dict[tuple[str, int, float], Optional[str]] = {}


def _header_keys(path: Path) -> list[str]:
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > MAX_HEADER:
            return []
        return list(json.loads(fh.read(size)))


def _from_keys(keys: list[str]) -> Optional[str]:
    if not any(k.endswith(FLUX_MARKER) for k in keys):
        return None
    return "flux-dev" if any(k.endswith(FLUX_GUIDANCE) for k in keys) else "flux-schnell"


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


def family_of(path: str | Path) -> Optional[str]:
    """``"flux-dev"``, ``"flux-schnell"``, or None (an SD checkpoint, or a file that cannot be read: the engine's
    own checks name what is wrong with it when a run is submitted)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _cache:
        try:
            if path.is_dir():
                _cache[key] = _from_folder(path)
            elif path.suffix.lower() == ".safetensors":
                _cache[key] = _from_keys(_header_keys(path))
            else:
                _cache[key] = None
        except (OSError, ValueError, struct.error):
            _cache[key] = None
    return _cache[key]


def is_flux(path: str | Path | None) -> bool:
    return bool(path) and (family_of(path) or "").startswith("flux")
