"""Pluggable captioners: anything with a ``name`` and ``caption_batch(images) -> list[str]`` can label a dataset.

Built in: ``blip`` (BLIP / BLIP-2 through transformers) and ``wd14`` (a WD14-style ONNX tagger), both loaded from a
local folder only — nothing is downloaded at run time. `register_captioner` adds another one (a plugin, or a test);
the WebUI's own interrogators (CLIP, DeepBooru) are not registered here: they run in the WebUI process, called by the
tab, which cannot import the engine. This module imports neither torch nor onnxruntime: a captioner's backend is
imported when it is loaded.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

from PIL import Image

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
MODELS_ENV = "LORA_SCRIPTS_CAPTIONERS"


class CaptionerError(RuntimeError):
    """A captioner that cannot run as asked (unknown name, bad option, device not available)."""


class MissingWeightsError(CaptionerError):
    """The model folder is missing or incomplete; the message says what to put where."""


@runtime_checkable
class Captioner(Protocol):
    name: str

    def caption_batch(self, images: list[Image.Image]) -> list[str]:
        """One caption per upright RGB image, in order."""
        ...


@dataclass
class CaptionerSpec:
    """How to build a captioner. ``factory(model_path, device, **options)``; ``weights`` tells a user what to fetch."""

    name: str
    description: str
    factory: Callable[..., Captioner]
    weights: str = ""
    required_files: tuple[str, ...] = ()
    needs_model_path: bool = True

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "weights": self.weights,
                "required_files": list(self.required_files), "needs_model_path": self.needs_model_path,
                "default_model_dir": str(default_model_dir(self.name)) if self.needs_model_path else None}


_REGISTRY: dict[str, CaptionerSpec] = {}


def register_captioner(spec: CaptionerSpec, replace: bool = False) -> None:
    """Add a captioner under ``spec.name``; refuses to shadow an existing one unless ``replace``."""
    if spec.name in _REGISTRY and not replace:
        raise CaptionerError(f"captioner {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def available_captioners() -> list[CaptionerSpec]:
    return list(_REGISTRY.values())


def default_model_dir(name: str) -> Path:
    """Where a captioner's weights are looked for when no path is given: ``$LORA_SCRIPTS_CAPTIONERS/<name>``, else
    the per-user data folder (``~/.local/share/lora-scripts/captioners/<name>`` on Linux)."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]) / name
    from platformdirs import user_data_path

    return user_data_path("lora-scripts") / "captioners" / name


def check_model_dir(spec: CaptionerSpec, model_path: Optional[str | Path]) -> Path:
    """The model folder, or a `MissingWeightsError` that names the folder, the missing files and what to download."""
    path = Path(model_path) if model_path else default_model_dir(spec.name)
    missing = [f for f in spec.required_files if not (path / f).is_file()] if path.is_dir() else list(
        spec.required_files)
    if missing:
        where = f"{path} does not exist" if not path.is_dir() else f"{path} lacks {', '.join(missing)}"
        hint = "" if model_path else " (the default folder), or pass --model PATH"
        raise MissingWeightsError(f"{spec.name} weights not found: {where}. Download {spec.weights} and put its "
                                  f"files in {path}{hint}; nothing is downloaded at run time")
    return path


def load_captioner(name: str, model_path: Optional[str | Path] = None, device: str = "auto",
                   **options) -> Captioner:
    """Build a registered captioner from a local model folder on ``device`` ("auto", "cpu" or "cuda")."""
    if name not in _REGISTRY:
        raise CaptionerError(f"captioner: unknown {name!r}; one of {', '.join(_REGISTRY)}")
    if device not in DEVICES:
        raise CaptionerError(f"device: must be one of {', '.join(DEVICES)}, got {device!r}")
    spec = _REGISTRY[name]
    path = check_model_dir(spec, model_path) if spec.needs_model_path else None
    log.info("loading captioner %s from %s on %s", name, path, device)
    return spec.factory(path, device, **options)


def lazy(module: str, attr: str) -> Callable[..., Captioner]:
    """A factory that imports its backend only when called (keeps torch/onnxruntime out of the WebUI process)."""
    def build(*args, **kwargs) -> Captioner:
        return getattr(importlib.import_module(module, __name__), attr)(*args, **kwargs)
    return build


register_captioner(CaptionerSpec(
    "blip", "BLIP / BLIP-2 natural-language captions (transformers)", lazy(".blip", "BlipCaptioner"),
    weights="a BLIP or BLIP-2 model such as Salesforce/blip-image-captioning-large (config.json, model.safetensors, "
            "preprocessor and tokenizer files)",
    required_files=("config.json",)))
register_captioner(CaptionerSpec(
    "wd14", "WD14-style booru tags (ONNX tagger + selected_tags.csv, onnxruntime)", lazy(".wd14", "WD14Tagger"),
    weights="a WD14 tagger such as SmilingWolf/wd-vit-tagger-v3 (model.onnx and selected_tags.csv)",
    required_files=("model.onnx", "selected_tags.csv")))
