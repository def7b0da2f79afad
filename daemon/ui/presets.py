"""Training presets (style, character, concept, their low-VRAM variants, and the text form's start) from
``configs/presets/*.yaml``.

A preset is a flat config fragment that lists only what it changes: the engine's defaults (`config_schema.json`)
fill the rest, and ``extends: NAME`` starts from another preset (the low-VRAM variants change four settings of
their base). Its first comment line is the description the tab shows. A preset with ``task_type: text-generation``
is the text form's starting point and stays out of the image form's list. Presets are plain YAML in the repository
so users can add their own next to them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml  # a gradio dependency, so present in every WebUI environment

from .forms import IMAGE_TASK, FieldSpec, config_to_form

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
DEFAULT_PRESET = "style"
TEXT_PRESET = "text"
EXTENDS = "extends"


@dataclass
class Preset:
    name: str
    description: str
    values: dict = field(default_factory=dict)  # what it changes, its base's changes included (``extends`` resolved)
    own: dict = field(default_factory=dict)     # what its file says, ``extends`` included

    @property
    def task_type(self) -> str:
        return self.values.get("task_type", IMAGE_TASK)

    @property
    def family(self) -> str:
        """``flux`` for a FLUX.1 preset (it says ``model_family: flux``), else ``sd``: the tab lists the presets
        of the family of the picked base model."""
        return "flux" if self.values.get("model_family") == "flux" else "sd"


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
    return Preset(name=path.stem, description=description, values=dict(values), own=dict(values))


def _resolve(preset: Preset, by_name: dict[str, Preset], seen: tuple[str, ...] = ()) -> Optional[Preset]:
    """``values`` with the ``extends`` chain applied (the preset's own settings win); None for a broken chain."""
    base_name = preset.own.get(EXTENDS)
    values = {k: v for k, v in preset.own.items() if k != EXTENDS}
    if base_name is not None:
        base = by_name.get(str(base_name))
        if base is None or base.name in seen + (preset.name,):
            log.warning("preset %s extends %r, which is missing or circular; skipped", preset.name, base_name)
            return None
        resolved = _resolve(base, by_name, seen + (preset.name,))
        if resolved is None:
            return None
        values = {**resolved.values, **values}
    preset.values = values
    return preset


def all_presets(folder: Path = PRESETS_DIR) -> list[Preset]:
    """Every readable preset of every kind, sorted by name; a broken file is logged and left out."""
    read = [p for p in (_read(path) for path in sorted(folder.glob("*.yaml"))) if p is not None]
    by_name = {p.name: p for p in read}
    return [p for p in (_resolve(p, by_name) for p in read) if p is not None]


def list_presets(folder: Path = PRESETS_DIR, task_type: str = IMAGE_TASK, family: Optional[str] = None
                 ) -> list[Preset]:
    """The presets of one kind of run (image by default: the tab's Preset dropdown), of one model family
    (``sd`` or ``flux``) when given."""
    return [p for p in all_presets(folder) if p.task_type == task_type and family in (None, p.family)]


def get_preset(name: str, folder: Path = PRESETS_DIR) -> Preset:
    for preset in all_presets(folder):
        if preset.name == name:
            return preset
    raise KeyError(f"preset: no preset named {name!r} in {folder}")


def preset_form_values(name: str, fields: tuple[FieldSpec, ...], folder: Path = PRESETS_DIR) -> dict[str, Any]:
    """What choosing preset ``name`` puts in a form: its settings, and the form's default for every field another
    preset of its kind sets (so switching from "character" to "style" leaves no text-encoder training behind);
    fields no preset touches (output name, trigger word) keep what the user typed. Raises KeyError if unknown."""
    chosen = get_preset(name, folder)
    touched = {key for p in list_presets(folder, chosen.task_type) for key in p.values}
    values = {spec.key: spec.default for spec in fields if spec.key in touched}
    values.update(config_to_form(chosen.values, fields)[0])
    return values


def text_form_start(fields: tuple[FieldSpec, ...], folder: Path = PRESETS_DIR) -> dict[str, Any]:
    """The text form's starting values (the ``text`` preset), or nothing if that preset is missing."""
    try:
        return preset_form_values(TEXT_PRESET, fields, folder)
    except KeyError:
        return {}
