"""Training presets (style, character, concept and their low-VRAM variants) from ``configs/presets/*.yaml``.

A preset is a flat config fragment: the keys a beginner should not have to choose. Its first comment line is the
description the tab shows. Presets are plain YAML in the repository so users can add their own next to them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml  # a gradio dependency, so present in every WebUI environment

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
DEFAULT_PRESET = "style"


@dataclass
class Preset:
    name: str
    description: str
    values: dict = field(default_factory=dict)


def _read(path: Path) -> Optional[Preset]:
    text = path.read_text(encoding="utf-8")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        log.warning("preset %s is not valid YAML, skipped: %s", path, e)
        return None
    if not isinstance(values, dict):
        log.warning("preset %s must be a mapping of settings, skipped", path)
        return None
    first = text.splitlines()[0] if text else ""
    description = first.lstrip("# ").strip() if first.startswith("#") else ""
    return Preset(name=path.stem, description=description, values=values)


def list_presets(folder: Path = PRESETS_DIR) -> list[Preset]:
    """Every readable preset, sorted by name; a broken file is logged and left out rather than breaking the tab."""
    presets = (_read(p) for p in sorted(folder.glob("*.yaml")))
    return [p for p in presets if p is not None]


def get_preset(name: str, folder: Path = PRESETS_DIR) -> Preset:
    for preset in list_presets(folder):
        if preset.name == name:
            return preset
    raise KeyError(f"preset: no preset named {name!r} in {folder}")
