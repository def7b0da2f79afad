"""The one config schema: every entry point (CLI, daemon, tab, REST) goes through `load_config`/`config_from_dict`.

A config is YAML in one of two forms that mean the same thing:

* flat, as people write them for lora-scripts (``learning_rate: 2e-4`` at the top level), or
* sectioned (``training: {learning_rate: 2e-4}``).

Every field has a default (documented in ``configs/lora_default.yaml``). Validation happens here, before any model is
loaded, and every error names the field, the value, the reason and the YAML line so a user can fix it without reading
code. Only ``yaml.safe_load``-equivalent parsing is used (``yaml.compose`` with the safe loader).
"""
from __future__ import annotations

from .errors import InputError
import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

TASK_TYPES = ("text-to-image", "text-generation")
MODEL_FAMILIES = ("auto", "sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = ("fp16", "bf16", "float")
OPTIMIZERS = ("adamw", "adamw8bit")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
OOM_POLICIES = ("stop", "step_down")
EXPORT_FORMATS = ("kohya", "diffusers")
TEXT_FORMATS = ("auto", "text", "instruction", "chat")


class ConfigError(InputError):
    """A config the user must fix. ``problems`` holds one line per bad field, each naming field, value and line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class DataConfig:
    train_data_dir: Optional[str] = None
    metadata_path: Optional[str] = None
    caption_extension: str = ".txt"
    default_caption: Optional[str] = None
    trigger_word: Optional[str] = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    resolution: int = 512
    center_crop: bool = True
    flip_aug: bool = False
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = True
    reg_data_dir: Optional[str] = None
    prior_loss_weight: float = 1.0
    # text-generation datasets
    train_data_file: Optional[str] = None
    text_format: str = "auto"
    max_seq_length: int = 512
    packing: bool = False
    chat_template: Optional[str] = None
    validation_split: float = 0.0


@dataclass
class ModelConfig:
    task_type: str = "text-to-image"
    base_model: Optional[str] = None
    model_family: str = "auto"
    prediction_type: str = "auto"
    allow_pickle: bool = False
    lora_rank: int = 8
    alpha: Optional[float] = None
    dropout: float = 0.0
    unet_target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = None
    text_encoder_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    clip_skip: int = 1
    # text-generation models
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    load_in_4bit: bool = False
    load_in_8bit: bool = False


@dataclass
class TrainingConfig:
    batch_size: int = 1
    epochs: int = 10
    max_train_steps: Optional[int] = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 42
    noise_offset: float = 0.0
    min_snr_gamma: Optional[float] = None
    oom_policy: str = "stop"
    auto_fit: bool = False
    memory_budget_mb: Optional[float] = None
    resume_from_checkpoint: Optional[str] = None
    device: str = "auto"


@dataclass
class OutputConfig:
    output_dir: Optional[str] = None
    output_name: Optional[str] = None
    save_steps: int = 0
    save_every_n_epochs: int = 0
    save_precision: str = "fp16"
    format: str = "kohya"
    keep_last_checkpoints: int = 3
    logging_dir: Optional[str] = None
    save_merged_model: bool = False


@dataclass
class SampleConfig:
    sample_prompts: Any = None
    sample_every_n_steps: int = 0
    sample_every_n_epochs: int = 0
    sample_steps: int = 20
    sample_guidance_scale: float = 7.0
    sample_max_new_tokens: int = 64


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    config_dir: Optional[str] = None  # folder the relative paths were resolved against

    def to_dict(self) -> dict:
        """The sectioned form, ready for YAML/JSON (what is saved next to the outputs and sent to the daemon)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def is_text(self) -> bool:
        return self.model.task_type == "text-generation"

    @property
    def output_path(self) -> Path:
        """Where the final LoRA lands: ``<output_dir>/<output_name>.safetensors`` (a folder for text adapters)."""
        out = Path(self.output.output_dir)
        return out / self.output.output_name if self.is_text else out / f"{self.output.output_name}.safetensors"


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "output": OutputConfig,
    "sample": SampleConfig,
}

# flat key -> section; field names are unique across sections, which is what makes the flat form unambiguous.
FIELD_SECTION: dict[str, str] = {f.name: sec for sec, cls in SECTIONS.items() for f in fields(cls)}
assert len(FIELD_SECTION) == sum(len(fields(c)) for c in SECTIONS.values()), "config field names must be unique"

# Aliases people use in lora-scripts / kohya configs, mapped to our names.
ALIASES: dict[str, str] = {
    "network_dim": "lora_rank",
    "rank": "lora_rank",
    "lora_alpha": "alpha",
    "network_alpha": "alpha",
    "lora_dropout": "dropout",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_train_epochs": "epochs",
    "pretrained_model_name_or_path": "base_model",
    "save_every_n_steps": "save_steps",
    "resume": "resume_from_checkpoint",
}

PATH_FIELDS = {
    ("data", "train_data_dir"), ("data", "metadata_path"), ("data", "reg_data_dir"), ("data", "train_data_file"),
    ("model", "base_model"), ("output", "output_dir"), ("output", "logging_dir"),
}


def _key_lines(text: str) -> dict[str, int]:
    """Map 'key' and 'section.key' to 1-based YAML line numbers, so errors can point at the line to edit."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if not isinstance(root, yaml.MappingNode):
        return lines
    for knode, vnode in root.value:
        key = str(knode.value)
        lines[key] = knode.start_mark.line + 1
        if isinstance(vnode, yaml.MappingNode):
            for sk, _ in vnode.value:
                lines[f"{key}.{sk.value}"] = sk.start_mark.line + 1
    return lines


def load_config(path: str | Path, overrides: Optional[dict] = None) -> TrainConfig:
    """Read a YAML config file, resolve relative paths against its folder and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"config: cannot read {path}: {e.strerror or e}"]) from None
    return config_from_yaml(text, base_dir=path.resolve().parent, overrides=overrides, source=str(path))


def config_from_yaml(text: str, base_dir: str | Path | None = None, overrides: Optional[dict] = None,
                     source: str = "config") -> TrainConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys to values, got {type(raw).__name__}"])
    return config_from_dict(raw, base_dir=base_dir, overrides=overrides, lines=_key_lines(text))


def _did_you_mean(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _normalise(raw: dict, lines: dict[str, int], problems: list[str]) -> dict[str, dict[str, tuple[Any, str]]]:
    """Fold flat and sectioned forms into {section: {field: (value, where)}} and collect unknown keys."""
    out: dict[str, dict[str, tuple[Any, str]]] = {s: {} for s in SECTIONS}
    flat_names = list(FIELD_SECTION) + list(SECTIONS)

    def where(key: str) -> str:
        return f" (line {lines[key]})" if key in lines else ""

    def put(section: str, name: str, value: Any, key: str) -> None:
        if name in out[section]:
            problems.append(f"{section}.{name}: given twice{where(key)}")
        out[section][name] = (value, where(key))

    for key, value in raw.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a mapping of settings, got {value!r}{where(key)}")
                continue
            allowed = [f.name for f in fields(SECTIONS[key])]
            for sub, subval in value.items():
                dotted, name = f"{key}.{sub}", ALIASES.get(str(sub), str(sub))
                if name in allowed:
                    put(key, name, subval, dotted)
                elif name in FIELD_SECTION:
                    problems.append(f"{dotted}: belongs in section '{FIELD_SECTION[name]}', not '{key}'{where(dotted)}")
                else:
                    problems.append(f"{dotted}: unknown setting{_did_you_mean(str(sub), allowed)}{where(dotted)}")
        elif key != "config_dir":
            name = ALIASES.get(key, key)
            if name in FIELD_SECTION:
                put(FIELD_SECTION[name], name, value, key)
            else:
                problems.append(f"{key}: unknown setting{_did_you_mean(key, flat_names)}{where(key)}")
    return out


def _number(value: Any, whole: bool) -> Optional[float]:
    """A finite number (whole if asked) from a YAML value, which may be a string like '2e-4'; None if it is not."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or (whole and number != int(number)):
        return None
    return number


def _coerce(section: str, f: dataclasses.Field, value: Any, where: str, problems: list[str]) -> Any:
    """Turn a YAML value into the field's type; YAML reads `2e-4` as a string, so numbers are parsed here."""
    name = f"{section}.{f.name}"
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    ftype = str(f.type)
    if value is None:
        if "Optional" in ftype or f.name == "sample_prompts":
            return None
        problems.append(f"{name}: must not be empty{where}")
        return default
    if "bool" in ftype:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        problems.append(f"{name}: must be true or false, got {value!r}{where}")
        return default
    if "int" in ftype or "float" in ftype:
        whole = "float" not in ftype
        number = _number(value, whole)
        if number is None:
            problems.append(f"{name}: must be a {'whole number' if whole else 'finite number'}, got {value!r}{where}")
            return default
        return int(number) if whole else number
    if "list" in ftype:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{name}: must be a list of names, got {value!r}{where}")
            return default
        return list(value)
    if "str" in ftype:
        if isinstance(value, (dict, list)):
            problems.append(f"{name}: must be text, got {value!r}{where}")
            return default
        return str(value)
    return value


def _apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set each override (flat ``batch_size`` or dotted ``training.batch_size``) in its section, removing the same
    field wherever the original config had it (flat, sectioned or under an alias), so an override replaces a value
    instead of colliding with it."""
    for key, value in overrides.items():
        name = ALIASES.get(key.split(".")[-1], key.split(".")[-1])
        section = key.split(".")[0] if "." in key else FIELD_SECTION.get(name)
        if section is None:
            raw[key] = value  # unknown: let validation report it with a hint
            continue
        for flat in [name] + [a for a, target in ALIASES.items() if target == name]:
            raw.pop(flat, None)
            for sec in SECTIONS:
                if isinstance(raw.get(sec), dict):
                    raw[sec] = {k: v for k, v in raw[sec].items() if k != flat}
        raw[section] = {**(raw.get(section) or {}), name: value}
    return raw


def config_from_dict(raw: dict, base_dir: str | Path | None = None, overrides: Optional[dict] = None,
                     lines: Optional[dict[str, int]] = None) -> TrainConfig:
    """Build and validate a TrainConfig from a flat or sectioned dict (what the daemon and the tab send).

    ``overrides`` are flat or dotted keys (``training.batch_size``) applied on top, used by OOM step-down and
    ``auto_fit``. Raises ConfigError listing every problem at once, so a user fixes them in one pass.
    """
    lines = lines or {}
    problems: list[str] = []
    raw = _apply_overrides(dict(raw), overrides or {})
    if base_dir is None and raw.get("config_dir"):
        base_dir = raw["config_dir"]
    given = _normalise(raw, lines, problems)
    cfg = TrainConfig()
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        for f in fields(cls):
            if f.name in given[section]:
                value, where = given[section][f.name]
                setattr(obj, f.name, _coerce(section, f, value, where, problems))
    base = Path(base_dir).resolve() if base_dir else Path.cwd()
    cfg.config_dir = str(base)
    for section, name in PATH_FIELDS:
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, str((base / Path(str(value)).expanduser()).resolve()))
    rfc = cfg.training.resume_from_checkpoint
    if rfc and rfc != "latest":
        cfg.training.resume_from_checkpoint = str((base / Path(rfc).expanduser()).resolve())
    sp = cfg.sample.sample_prompts
    if isinstance(sp, str) and sp.strip() and (sp.endswith(".txt") or (base / sp).is_file()):
        cfg.sample.sample_prompts = str((base / sp).resolve())
    _validate(cfg, given, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _validate(cfg: TrainConfig, given: dict[str, dict[str, tuple[Any, str]]], problems: list[str]) -> None:
    def where(section: str, name: str) -> str:
        return given[section].get(name, (None, ""))[1]

    def check(ok: bool, section: str, name: str, reason: str) -> None:
        if not ok:
            value = getattr(getattr(cfg, section), name)
            problems.append(f"{section}.{name}: {reason}, got {value!r}{where(section, name)}")

    def choice(section: str, name: str, options: tuple) -> None:
        value = getattr(getattr(cfg, section), name)
        check(value in options, section, name, f"must be one of {', '.join(options)}")

    d, m, t, o, s = cfg.data, cfg.model, cfg.training, cfg.output, cfg.sample
    choice("model", "task_type", TASK_TYPES)
    choice("model", "model_family", MODEL_FAMILIES)
    choice("model", "prediction_type", PREDICTION_TYPES)
    choice("training", "mixed_precision", MIXED_PRECISION)
    choice("training", "optimizer", OPTIMIZERS)
    choice("training", "lr_scheduler", SCHEDULERS)
    choice("training", "oom_policy", OOM_POLICIES)
    choice("output", "save_precision", SAVE_PRECISION)
    choice("output", "format", EXPORT_FORMATS)
    choice("data", "text_format", TEXT_FORMATS)

    check(t.learning_rate > 0, "training", "learning_rate", "must be > 0")
    check(m.text_encoder_lr is None or m.text_encoder_lr > 0, "model", "text_encoder_lr", "must be > 0")
    check(t.batch_size >= 1, "training", "batch_size", "must be at least 1")
    check(t.epochs >= 1, "training", "epochs", "must be at least 1")
    check(t.max_train_steps is None or t.max_train_steps >= 1, "training", "max_train_steps", "must be at least 1")
    check(t.gradient_accumulation_steps >= 1, "training", "gradient_accumulation_steps", "must be at least 1")
    check(t.lr_warmup_steps >= 0, "training", "lr_warmup_steps", "must be >= 0")
    check(t.weight_decay >= 0, "training", "weight_decay", "must be >= 0")
    check(t.max_grad_norm >= 0, "training", "max_grad_norm", "must be >= 0 (0 turns clipping off)")
    check(t.noise_offset >= 0, "training", "noise_offset", "must be >= 0")
    check(t.min_snr_gamma is None or t.min_snr_gamma > 0, "training", "min_snr_gamma", "must be > 0")
    check(t.memory_budget_mb is None or t.memory_budget_mb > 0, "training", "memory_budget_mb", "must be > 0")
    check(1 <= m.lora_rank <= 1024, "model", "lora_rank", "must be between 1 and 1024")
    check(m.alpha is None or m.alpha > 0, "model", "alpha", "must be > 0")
    check(0 <= m.dropout < 1, "model", "dropout", "must be in [0, 1)")
    check(m.clip_skip >= 1, "model", "clip_skip", "must be at least 1")
    check(bool(m.unet_target_modules), "model", "unet_target_modules", "must name at least one module")
    check(bool(m.target_modules), "model", "target_modules", "must name at least one module")
    check(not (m.load_in_4bit and m.load_in_8bit), "model", "load_in_4bit", "cannot be combined with load_in_8bit")
    check(0 <= d.caption_dropout < 1, "data", "caption_dropout", "must be in [0, 1)")
    check(d.keep_tokens >= 0, "data", "keep_tokens", "must be >= 0")
    check(64 <= d.resolution <= 4096 and d.resolution % 8 == 0, "data", "resolution",
          "must be a multiple of 8 between 64 and 4096")
    check(d.bucket_reso_steps >= 8 and d.bucket_reso_steps % 8 == 0, "data", "bucket_reso_steps",
          "must be a multiple of 8")
    check(d.min_bucket_reso <= d.resolution <= d.max_bucket_reso or not d.enable_bucket, "data", "min_bucket_reso",
          f"must be <= resolution ({d.resolution}) <= max_bucket_reso ({d.max_bucket_reso})")
    check(d.prior_loss_weight >= 0, "data", "prior_loss_weight", "must be >= 0")
    check(0 <= d.validation_split < 1, "data", "validation_split", "must be in [0, 1)")
    check(d.max_seq_length >= 8, "data", "max_seq_length", "must be at least 8")
    check(o.save_steps >= 0, "output", "save_steps", "must be >= 0 (0 saves only at the end)")
    check(o.save_every_n_epochs >= 0, "output", "save_every_n_epochs", "must be >= 0")
    check(o.keep_last_checkpoints >= 1, "output", "keep_last_checkpoints", "must be at least 1")
    check(s.sample_every_n_steps >= 0, "sample", "sample_every_n_steps", "must be >= 0")
    check(s.sample_every_n_epochs >= 0, "sample", "sample_every_n_epochs", "must be >= 0")
    check(1 <= s.sample_steps <= 1000, "sample", "sample_steps", "must be between 1 and 1000")

    if m.base_model is None:
        problems.append("model.base_model: required: a local diffusers folder or .safetensors checkpoint "
                        "(or a Hugging Face model folder for text-generation)")
    elif not Path(m.base_model).exists():
        problems.append(f"model.base_model: no such file or folder, got {m.base_model!r}{where('model', 'base_model')}")
    elif m.base_model.lower().endswith((".ckpt", ".pt", ".pth", ".bin")) and not m.allow_pickle:
        problems.append(f"model.base_model: {Path(m.base_model).name} is a pickle file, which can run code when "
                        f"loaded; convert it to .safetensors or set model.allow_pickle: true"
                        f"{where('model', 'base_model')}")
    if cfg.is_text:
        if not d.train_data_file:
            problems.append("data.train_data_file: required for text-generation (a .jsonl or .csv file)")
        elif not Path(d.train_data_file).is_file():
            problems.append(f"data.train_data_file: no such file, got {d.train_data_file!r}"
                            f"{where('data', 'train_data_file')}")
    else:
        if not d.train_data_dir:
            problems.append("data.train_data_dir: required: the folder with your training images")
        elif not Path(d.train_data_dir).is_dir():
            problems.append(f"data.train_data_dir: no such folder, got {d.train_data_dir!r}"
                            f"{where('data', 'train_data_dir')}")
        if d.metadata_path and not Path(d.metadata_path).is_file():
            problems.append(f"data.metadata_path: no such file, got {d.metadata_path!r}{where('data', 'metadata_path')}")
        if d.reg_data_dir and not Path(d.reg_data_dir).is_dir():
            problems.append(f"data.reg_data_dir: no such folder, got {d.reg_data_dir!r}{where('data', 'reg_data_dir')}")
    if not o.output_dir:
        problems.append("output.output_dir: required: where checkpoints and the finished LoRA are written")
    if o.output_name is None and o.output_dir:
        o.output_name = Path(o.output_dir).name or "lora"
    if o.output_name is not None:
        bad = set('/\\:*?"<>|') & set(o.output_name)
        if bad or o.output_name.strip(". ") == "" or o.output_name != o.output_name.strip():
            problems.append(f"output.output_name: must be a plain file name without {''.join(sorted(bad)) or 'leading/trailing dots or spaces'}, "
                            f"got {o.output_name!r}{where('output', 'output_name')}")
    if o.logging_dir is None and o.output_dir:
        o.logging_dir = str(Path(o.output_dir) / "logs")
    ct = d.chat_template
    if ct is not None and ct not in ("tokenizer", "alpaca", "chatml") and "{%" not in ct and "{{" not in ct:
        problems.append(f"data.chat_template: must be tokenizer, alpaca, chatml or a Jinja template, got {ct!r}"
                        f"{where('data', 'chat_template')}")
    sp = s.sample_prompts
    if sp is not None and not isinstance(sp, (str, list)):
        problems.append(f"sample.sample_prompts: must be a list of prompts or a .txt file, got {sp!r}"
                        f"{where('sample', 'sample_prompts')}")
    elif sp and not cfg.is_text:  # a bad --w would otherwise stop the run at its first sample, hours in
        from .image.sample_prompts import parse_sample_prompts

        try:
            parse_sample_prompts(sp, cfg)
        except ValueError as e:
            problems.append(f"{e}{where('sample', 'sample_prompts')}")


def save_resolved_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the fully resolved config (absolute paths, every default filled) so a run can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    tmp.replace(path)
    return path
