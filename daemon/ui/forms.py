"""The Train form: which config fields the tab shows, and the mapping between form values and a config dict.

The engine's schema (`lora_core.config`) stays the one authority: the form only collects values, the daemon
validates them, and each problem it returns (``"training.learning_rate: must be > 0, got -1.0"``) is routed back
to the field it names. Anything the form does not show can still be set in the "Other settings (YAML)" box, so
the tab never limits what the engine can do.

Two forms share this mapping: the image form (`FIELDS`, a WebUI checkpoint and a dataset folder) and the text form
(`TEXT_FIELDS`, a local Hugging Face model folder and a .jsonl/.csv file). Only the task type tells them apart
in the config, so a run's snapshot loads back into whichever form trained it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml  # a gradio dependency, so present in every WebUI environment


@dataclass(frozen=True)
class FieldSpec:
    key: str          # flat config key, e.g. "learning_rate"
    section: str      # config section, e.g. "training"
    label: str
    kind: str         # "number" | "int" | "text" | "dropdown" | "checkbox" | "lines" (one item a line) | "list" (a, b)
    default: Any = None
    choices: tuple = ()
    advanced: bool = False
    info: str = ""

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("output_name", "output", "Output name (what you type in <lora:NAME:0.8>)", "text", "my_lora"),
    FieldSpec("trigger_word", "data", "Trigger word", "text", "", info="added to every caption; leave empty for none"),
    FieldSpec("lora_rank", "model", "Rank", "int", 16),
    FieldSpec("alpha", "model", "Alpha", "number", 8),
    FieldSpec("learning_rate", "training", "Learning rate", "number", 1e-4),
    FieldSpec("epochs", "training", "Epochs", "int", 10),
    FieldSpec("max_train_steps", "training", "Max steps (0: use epochs)", "int", 0),
    FieldSpec("batch_size", "training", "Batch size", "int", 2),
    FieldSpec("resolution", "data", "Resolution", "int", 512),
    FieldSpec("lr_scheduler", "training", "LR scheduler", "dropdown", "cosine",
              ("constant", "constant_with_warmup", "cosine", "linear"), advanced=True),
    FieldSpec("lr_warmup_steps", "training", "Warmup steps", "int", 0, advanced=True),
    FieldSpec("optimizer", "training", "Optimizer", "dropdown", "adamw", ("adamw", "adamw8bit"), advanced=True),
    FieldSpec("mixed_precision", "training", "Mixed precision", "dropdown", "no", ("no", "fp16", "bf16"),
              advanced=True),
    FieldSpec("gradient_checkpointing", "training", "Gradient checkpointing (less VRAM, slower)", "checkbox", False,
              advanced=True),
    FieldSpec("seed", "training", "Seed", "int", 42, advanced=True),
    FieldSpec("noise_offset", "training", "Noise offset", "number", 0.0, advanced=True),
    FieldSpec("train_text_encoder", "model", "Train the text encoder", "checkbox", False, advanced=True),
    FieldSpec("text_encoder_lr", "model", "Text encoder learning rate (0: same)", "number", 0.0, advanced=True),
    FieldSpec("shuffle_caption", "data", "Shuffle caption tags", "checkbox", False, advanced=True),
    FieldSpec("keep_tokens", "data", "Keep first N tags in place", "int", 0, advanced=True),
    FieldSpec("caption_dropout", "data", "Caption dropout", "number", 0.0, advanced=True),
    FieldSpec("flip_aug", "data", "Flip images horizontally", "checkbox", False, advanced=True),
    FieldSpec("enable_bucket", "data", "Aspect-ratio buckets", "checkbox", False, advanced=True),
    FieldSpec("save_every_n_epochs", "output", "Save a checkpoint every N epochs (0: end only)", "int", 0,
              advanced=True),
    FieldSpec("sample_prompts", "sample", "Sample prompts (one per line)", "lines", "", advanced=True),
    FieldSpec("sample_every_n_steps", "sample", "Sample every N steps (0: never)", "int", 0, advanced=True),
)
FIELD_BY_KEY = {f.key: f for f in FIELDS}
IMAGE_TASK = "text-to-image"
TEXT_TASK = "text-generation"
TEXT_FORMATS = ("auto", "text", "instruction", "chat")  # lora_core.config.TEXT_FORMATS, kept here: no engine import
TEXT_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("base_model", "model", "Base model (a local Hugging Face model folder)", "text", "",
              info="the folder with config.json, the .safetensors weights and the tokenizer"),
    FieldSpec("train_data_file", "data", "Training data (.jsonl or .csv)", "text", ""),
    FieldSpec("text_format", "data", "Text format", "dropdown", "auto", TEXT_FORMATS,
              info='auto | text {"text"} | instruction {"instruction","output"} | chat {"messages"}'),
    FieldSpec("output_name", "output", "Output name (the adapter folder)", "text", "my_text_lora"),
    FieldSpec("lora_rank", "model", "Rank", "int", 16),
    FieldSpec("alpha", "model", "Alpha", "number", 32),
    FieldSpec("learning_rate", "training", "Learning rate", "number", 2e-4),
    FieldSpec("epochs", "training", "Epochs", "int", 3),
    FieldSpec("max_train_steps", "training", "Max steps (0: use epochs)", "int", 0),
    FieldSpec("batch_size", "training", "Batch size", "int", 4),
    FieldSpec("max_seq_length", "data", "Max sequence length (tokens)", "int", 512),
    FieldSpec("target_modules", "model", "Target modules", "list", "q_proj, k_proj, v_proj, o_proj",
              info="comma-separated, or all-linear"),
    FieldSpec("sample_prompts", "sample", "Sample prompts (one per line)", "lines", "",
              info="their completions are shown in the run view at each sample point"),
    FieldSpec("sample_every_n_steps", "sample", "Sample every N steps (0: never)", "int", 0),
)
TEXT_FIELD_BY_KEY = {f.key: f for f in TEXT_FIELDS}
SECTION_NAMES = ("data", "model", "training", "output", "sample")
# Zero means "not set" for these optional engine fields; the form has no way to show None in a number box.
ZERO_MEANS_UNSET = {"max_train_steps", "text_encoder_lr"}
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
            value = flat.pop(spec.key)
            if spec.kind in ("lines", "list"):
                joiner = "\n" if spec.kind == "lines" else ", "
                value = joiner.join(map(str, value)) if isinstance(value, list) else (value or "")
            elif value is None:
                value = 0 if spec.kind in ("int", "number") else ""
            form[spec.key] = value
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
