"""The Train form: which config fields the tab shows, and the mapping between form values and a config dict.

The engine's schema (`lora_core.config`) stays the one authority: each row's default, choices, bounds and help
come from ``config_schema.json``, generated from the config dataclasses (this side cannot import the engine), and
the form declares only how a setting is shown. The form collects values, the daemon validates them, and each
problem it returns (``"training.learning_rate: must be > 0, got -1.0"``) is routed back to the field it names.
Anything the form does not show can still be set in the "Other settings (YAML)" box, so the tab never limits what
the engine can do. Starting values other than the engine's defaults are presets (`presets`), not form rows.

Two forms share this mapping: the image form (`FIELDS`, a WebUI checkpoint and a dataset folder) and the text form
(`TEXT_FIELDS`, a local Hugging Face model folder and a .jsonl/.csv file). Only the task type tells them apart
in the config, so a run's snapshot loads back into whichever form trained it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml  # a gradio dependency, so present in every WebUI environment


SCHEMA_FILE = Path(__file__).resolve().with_name("config_schema.json")
REFRESH = "python -m lora_core.config --write-schema daemon/ui/config_schema.json"


def load_schema(path: Path = SCHEMA_FILE) -> dict:
    """The engine's settings as JSON (generated from `lora_core.config`'s dataclasses, checked in beside this file),
    so the form knows defaults, choices, bounds and help without importing the engine."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{path}: cannot read the config schema ({e}); regenerate it with: {REFRESH}") from None


SCHEMA = load_schema()
SETTINGS: dict[str, dict] = SCHEMA["fields"]
SECTION_NAMES = tuple(SCHEMA["sections"])
UNSET = object()
WIDGETS = {"bool": "checkbox", "int": "int", "float": "number", "str": "text", "list": "list", "any": "text"}


@dataclass(frozen=True)
class FieldSpec:
    """One form row. Only how it is shown is declared here (label, widget, placement); what the setting means —
    section, default, choices, bounds, help — comes from the schema (`field`)."""
    key: str          # flat config key, e.g. "learning_rate"
    section: str      # config section, e.g. "training"
    label: str
    kind: str         # "number" | "int" | "text" | "dropdown" | "checkbox" | "lines" (one item a line) | "list" (a, b)
    default: Any = None  # the form's starting value: the engine default as the widget shows it
    choices: tuple = ()
    advanced: bool = False
    info: str = ""
    minimum: Optional[float] = None  # the engine's inclusive bounds, for reference: widgets do not clamp, the
    maximum: Optional[float] = None  # engine names an out-of-range value next to its field
    family: Optional[str] = None     # "flux": shown (and sent) only when the base model is a FLUX.1 checkpoint

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


def _shown(kind: str, value: Any) -> Any:
    """An engine value as the form's widget holds it: empty numbers are 0 ("not set"), lists are joined text."""
    if value is None:
        return 0 if kind in ("int", "number") else (None if kind in ("dropdown", "checkbox") else "")
    if kind in ("lines", "list") and isinstance(value, list):
        return ("\n" if kind == "lines" else ", ").join(map(str, value))
    return value


def field(key: str, label: str, kind: Optional[str] = None, advanced: bool = False, info: Optional[str] = None,
          start: Any = UNSET, family: Optional[str] = None) -> FieldSpec:
    """A form row for the setting ``key``, built from the schema. ``kind`` overrides the widget (``lines`` for a
    list typed one item a line); ``start`` is a starting value, allowed only where the engine's default is empty
    (a suggested output name), so the form never contradicts an engine default."""
    setting = SETTINGS[key]
    if start is not UNSET and setting["default"] is not None:
        raise ValueError(f"{key}: the form may not start at {start!r}: the engine's default is {setting['default']!r}")
    kind = kind or ("dropdown" if setting.get("choices") else WIDGETS[setting["type"]])
    default = start if start is not UNSET else _shown(kind, setting["default"])
    return FieldSpec(key, setting["section"], label, kind, default, tuple(setting.get("choices") or ()), advanced,
                     setting["help"] if info is None else info, setting.get("ge"), setting.get("le"), family)


FIELDS: tuple[FieldSpec, ...] = (
    field("output_name", "Output name (what you type in <lora:NAME:0.8>)", start="my_lora"),
    field("trigger_word", "Trigger word"),
    field("lora_rank", "Rank"),
    field("alpha", "Alpha (0: same as rank)"),
    field("network_type", "Network type"),
    field("learning_rate", "Learning rate"),
    field("epochs", "Epochs"),
    field("max_train_steps", "Max steps (0: use epochs)"),
    field("batch_size", "Batch size"),
    field("resolution", "Resolution"),
    field("network_weights", "Continue from a LoRA (one in the Lora folder, or a file path; empty: start fresh)",
          "lora_pick", advanced=True),
    field("dim_from_weights", "Take network type, rank and alpha from that LoRA", advanced=True),
    field("conv_rank", "Conv rank for locon/loha/lokr (0: same as rank)", advanced=True),
    field("conv_alpha", "Conv alpha (0: same as conv rank)", advanced=True),
    field("use_dora", "DoRA magnitude on locon/loha/lokr", advanced=True),
    field("lokr_factor", "LoKr factor (-1: automatic)", advanced=True),
    field("lr_scheduler", "LR scheduler", advanced=True),
    field("lr_warmup_steps", "Warmup steps", advanced=True),
    field("optimizer", "Optimizer", advanced=True),
    field("prodigy_d_coef", "Prodigy d_coef", advanced=True),
    field("prodigy_use_bias_correction", "Prodigy bias correction", advanced=True),
    field("prodigy_safeguard_warmup", "Prodigy safeguard warm-up", advanced=True),
    field("adafactor_relative_step", "Adafactor relative step (ignores learning rate)", advanced=True),
    field("mixed_precision", "Mixed precision", advanced=True),
    field("gradient_checkpointing", "Gradient checkpointing (less VRAM, slower)", advanced=True),
    field("fp8_base", "fp8 base weights (half the VRAM of bf16 for the frozen model)", advanced=True),
    field("seed", "Seed", advanced=True),
    field("noise_offset", "Noise offset", advanced=True),
    field("train_text_encoder", "Train the text encoder", advanced=True),
    field("text_encoder_lr", "Text encoder learning rate (0: same)", advanced=True),
    field("shuffle_caption", "Shuffle caption tags", advanced=True),
    field("keep_tokens", "Keep first N tags in place", advanced=True),
    field("caption_dropout", "Caption dropout", advanced=True),
    field("flip_aug", "Flip images horizontally", advanced=True),
    field("enable_bucket", "Aspect-ratio buckets", advanced=True),
    field("save_every_n_epochs", "Save a checkpoint every N epochs (0: end only)", advanced=True),
    field("sample_prompts", "Sample prompts (one per line)", "lines", advanced=True),
    field("sample_every_n_steps", "Sample every N steps (0: never)", advanced=True),
    # FLUX.1 only (the tab shows them when a FLUX checkpoint is the base model)
    field("guidance_scale", "Guidance while training (dev; 0: 1.0; schnell: leave 0)", family="flux"),
    field("timestep_sampling", "Timestep sampling", family="flux"),
    field("discrete_flow_shift", "Flow shift (timestep sampling: shift)", family="flux"),
    field("t5_max_length", "T5 tokens per caption (0: 512 dev, 256 schnell)", family="flux"),
    field("flux_blocks_to_swap", "Blocks swapped to CPU RAM (12-16 GB cards; CUDA)", family="flux"),
    field("flux_train_blocks", "Blocks that train", family="flux"),
    field("t5_path", "T5-XXL file (a transformer-only checkpoint; empty: inside the checkpoint)", family="flux"),
    field("clip_path", "CLIP-L file (empty: inside the checkpoint)", family="flux"),
    field("vae_path", "AE file (empty: inside the checkpoint)", family="flux"),
)
FIELD_BY_KEY = {f.key: f for f in FIELDS}
FLUX_KEYS = frozenset(f.key for f in FIELDS if f.family == "flux")
IMAGE_TASK = "text-to-image"
TEXT_TASK = "text-generation"
TEXT_FIELDS: tuple[FieldSpec, ...] = (
    field("base_model", "Base model (a local Hugging Face model folder)",
          info="the folder with config.json, the .safetensors weights and the tokenizer"),
    field("train_data_file", "Training data (.jsonl or .csv)"),
    field("text_format", "Text format"),
    field("output_name", "Output name (the adapter folder)", start="my_text_lora"),
    field("lora_rank", "Rank"),
    field("alpha", "Alpha (0: same as rank)"),
    field("network_type", "Adapter type (lora, dora, loha or lokr: peft adapters)"),
    field("learning_rate", "Learning rate"),
    field("epochs", "Epochs"),
    field("max_train_steps", "Max steps (0: use epochs)"),
    field("batch_size", "Batch size"),
    field("max_seq_length", "Max sequence length (tokens)"),
    field("target_modules", "Target modules", info="comma-separated, or all-linear"),
    field("sample_prompts", "Sample prompts (one per line)", "lines",
          info="their completions are shown in the run view at each sample point"),
    field("sample_every_n_steps", "Sample every N steps (0: never)"),
)
TEXT_FIELD_BY_KEY = {f.key: f for f in TEXT_FIELDS}
# Zero means "not set" for the number fields whose engine default is empty: a number box cannot show None.
ZERO_MEANS_UNSET = {key for key, s in SETTINGS.items() if s["type"] in ("int", "float") and s["default"] is None}
PROBLEM_FIELD = re.compile(r"^(?P<section>[a-z_]+)\.(?P<key>[a-z_0-9]+):")


def _value(spec: FieldSpec, raw: Any) -> Any:
    """Form value → config value; text that is not a number goes through unchanged so the engine names it."""
    if spec.kind in ("int", "number") and raw is not None and raw != "":
        try:
            number = float(raw)
        except (TypeError, ValueError):
            return raw
        if spec.key in ZERO_MEANS_UNSET and number == 0:
            return None
        return int(number) if spec.kind == "int" and number == int(number) else number
    if spec.kind in ("lines", "list"):
        parts = str(raw or "").splitlines() if spec.kind == "lines" else str(raw or "").split(",")
        items = [part.strip() for part in parts if part.strip()]
        return items or None
    if spec.kind == "text":
        return None if raw is None or str(raw).strip() == "" else str(raw).strip()
    return raw


def parse_extra_yaml(text: str) -> dict:
    """The "Other settings" box: a YAML mapping of any config keys; raises ValueError naming the problem."""
    if not text or not text.strip():
        return {}
    try:
        extra = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"other settings: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise ValueError("other settings: must be a mapping of settings (key: value per line)")
    return extra


def _assemble(task_type: str, fixed: dict[str, Any], values: dict[str, Any], by_key: dict[str, FieldSpec],
              extra: Optional[dict]) -> dict:
    """Sectioned config from fixed ``section.key`` values, the form's values and the Other settings (which win).

    Sectioned, because the daemon adds its own ``output.*`` overrides in that form and a flat ``output_name``
    beside them would count as given twice.
    """
    config: dict[str, Any] = {name: {} for name in SECTION_NAMES}
    config["model"]["task_type"] = task_type
    for dotted, value in fixed.items():
        section, key = dotted.split(".")
        if value or section != "output":
            config[section][key] = value or None
    for key, raw in values.items():
        spec = by_key[key]
        config[spec.section][key] = _value(spec, raw)
    for key, value in (extra or {}).items():
        if key in SECTION_NAMES and isinstance(value, dict):
            config[key].update(value)
        elif key in by_key:
            config[by_key[key].section][key] = value
        else:
            config[key] = value
    return config


def form_to_config(values: dict[str, Any], base_model: Optional[str], train_data_dir: Optional[str],
                   output_dir: Optional[str], extra: Optional[dict] = None) -> dict:
    """The image form → the config the daemon validates; ``extra`` (Other settings, flat or sectioned) wins."""
    fixed = {"model.base_model": base_model, "data.train_data_dir": train_data_dir, "output.output_dir": output_dir}
    return _assemble(IMAGE_TASK, fixed, values, FIELD_BY_KEY, extra)


def text_form_to_config(values: dict[str, Any], output_dir: Optional[str] = None,
                        extra: Optional[dict] = None) -> dict:
    """The text form (`TEXT_FIELDS`, base model and data file included) → a text-generation config."""
    return _assemble(TEXT_TASK, {"output.output_dir": output_dir}, values, TEXT_FIELD_BY_KEY, extra)


def flatten(config: dict) -> dict:
    """A flat or sectioned config as one flat dict (field names are unique across sections)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key in SECTION_NAMES:
            flat.update(value)
        else:
            flat[key] = value
    return flat


def is_text_config(config: dict) -> bool:
    return flatten(config).get("task_type") == TEXT_TASK


def config_to_form(config: dict, fields: tuple[FieldSpec, ...] = FIELDS) -> tuple[dict[str, Any], dict]:
    """Split a config into one form's values and the rest (for the Other settings box), e.g. for "Load YAML".

    The caller takes the keys it shows elsewhere (base model, dataset folder) out of the rest.
    """
    flat = flatten(config)
    form: dict[str, Any] = {}
    for spec in fields:
        if spec.key in flat:
            form[spec.key] = _shown(spec.kind, flat.pop(spec.key))
    return form, flat


def problems_by_field(problems: list[str], fields: tuple[FieldSpec, ...] = FIELDS
                      ) -> tuple[dict[str, list[str]], list[str]]:
    """Route engine problems to one form's fields by their ``section.field:`` prefix; the rest are general."""
    shown = {spec.key for spec in fields}
    by_field: dict[str, list[str]] = {}
    general: list[str] = []
    for problem in problems:
        match = PROBLEM_FIELD.match(problem)
        key = match.group("key") if match else None
        if key in shown:
            by_field.setdefault(key, []).append(problem)
        else:
            general.append(problem)
    return by_field, general
