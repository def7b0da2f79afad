"""What enters the queue: a validated config snapshot turned into a run record, or a caption job.

Configs are validated by the engine's one schema (`lora_core.config`) before anything is queued, so a typo is
refused at `submit` with the engine's field-level message instead of failing minutes later in a child. The daemon
trains every run into its own folder (``<home>/runs/<id>/output``): two runs never share checkpoints, and a resume
can never pick up another run's state. The user's ``output_dir`` only names the LoRA when ``output_name`` is unset.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import yaml

from . import states
from .protocol import E_BAD_REQUEST, E_CONFIG, ProtocolError, cap_problems

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "lora-scripts")
# Caption files the dataset tools may write next to images (kohya's .txt and .caption); never an image's own suffix.
CAPTION_EXTENSIONS = (".txt", ".caption")
# A YAML config over the protocol may expand to at most this many nodes through anchors and aliases: a real config
# has a few hundred, an alias bomb (a few hundred bytes) expands to millions and would stall whoever parses it.
YAML_NODE_BUDGET = 10_000


def inside(path: Path, folder: Path) -> bool:
    """True when `path` (resolved: no ``..`` or symlink tricks) is `folder` or lies below it."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def check_yaml_budget(text: str, budget: int = YAML_NODE_BUDGET) -> None:
    """Refuse YAML whose anchors and aliases expand to more than `budget` nodes, counted from the event stream
    (each alias costs the size of what it names) without ever building the expanded document."""
    sizes: dict[str, int] = {}
    open_anchors: list[tuple[Optional[str], int]] = []  # (anchor, total when its collection started)
    total = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                total += sizes.get(event.anchor, 1)
            elif isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                total += 1
                if isinstance(event, yaml.ScalarEvent):
                    if event.anchor:
                        sizes[event.anchor] = 1
                else:
                    open_anchors.append((event.anchor, total - 1))
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)) and open_anchors:
                anchor, start = open_anchors.pop()
                if anchor:
                    sizes[anchor] = total - start
            if total > budget:
                raise ProtocolError(E_CONFIG, f"config: the YAML expands to more than {budget} values through "
                                              f"anchors and aliases; write the values out",
                                    {"problems": [f"config: YAML anchors/aliases expand to more than {budget} "
                                                  f"values; write the values out"]})
    except yaml.YAMLError:
        return  # the schema's own parse reports the syntax error with its line


@dataclass
class Submission:
    """A submit request's arguments, checked."""
    config: Any
    base_dir: Optional[str]
    name: Optional[str]
    priority: int


def new_run_id() -> str:
    """Sortable by creation time and unique without coordination: ``20250101-120000-1a2b3c``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def parse_priority(args: dict) -> int:
    """The queue position of a training run or caption job: a whole number, higher runs first (default 0)."""
    priority = args.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 1_000_000:
        raise ProtocolError(E_BAD_REQUEST, f"priority: must be a whole number between -1000000 and 1000000, "
                                           f"got {priority!r}")
    return priority


def parse_submission(args: dict) -> Submission:
    config = args.get("config")
    if not isinstance(config, (dict, str)):
        raise ProtocolError(E_BAD_REQUEST, "config: must be a config mapping or YAML text")
    priority = parse_priority(args)
    name = args.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise ProtocolError(E_BAD_REQUEST, "name: must be text of at most 200 characters")
    base = args.get("config_dir") or (config.get("config_dir") if isinstance(config, dict) else None) \
        or args.get("cwd")
    if base is not None and not isinstance(base, str):
        raise ProtocolError(E_BAD_REQUEST, "config_dir/cwd: must be a folder path")
    return Submission(config, base, name, priority)


def _given_output(config: Any) -> dict:
    """The output settings the user wrote, from either config form, without validating anything else."""
    raw = config
    if isinstance(config, str):
        try:
            raw = yaml.safe_load(config)
        except yaml.YAMLError:
            return {}
    if not isinstance(raw, dict):
        return {}
    section = raw.get("output") if isinstance(raw.get("output"), dict) else {}
    return {key: raw.get(key, section.get(key)) for key in ("output_dir", "output_name", "logging_dir")
            if raw.get(key, section.get(key))}


def resolve_config(config: Any, base_dir: Optional[str], output_dir: Path, name: Optional[str] = None,
                   allow_pickle: bool = False) -> dict:
    """Validate with the engine's schema and return the resolved, sectioned config that the run will use.

    The config is validated once, as written (so errors carry its line numbers) with its output folder set to the
    run folder, then the engine's cheap preflight checks run (the ones the
    child runs first: model file header, dataset not empty, safe names), so bad input is refused before it is
    queued. ``model.allow_pickle`` is refused unless the daemon was started with ``--allow-pickle``: a pickle
    file runs code when loaded. Raises ProtocolError(config_invalid) whose details hold the ``problems``.
    """
    from lora_core.config import ConfigError, config_from_dict, config_from_yaml
    from lora_core.preflight import preflight

    if isinstance(config, str):
        check_yaml_budget(config)

    given = _given_output(config)
    # The run writes into its own folder whatever output_dir says; the name stays what the config implies.
    overrides = {"output.output_dir": str(output_dir)}
    if name:  # `submit --name` names the run and the file it publishes (<lora:NAME:w>), over the config's
        overrides["output.output_name"] = name
    elif "output_name" not in given:  # the engine's rule: the name of the output folder the user gave
        base = Path(base_dir).resolve() if base_dir else Path.cwd()
        given_dir = given.get("output_dir")
        folder = (base / Path(str(given_dir)).expanduser()).resolve().name if given_dir else ""
        overrides["output.output_name"] = folder or "lora"
    try:  # one validation pass, with the run's output folder already in place
        if isinstance(config, str):
            cfg = config_from_yaml(config, base_dir=base_dir, overrides=overrides)
        else:
            cfg = config_from_dict({k: v for k, v in config.items() if k != "config_dir"}, base_dir=base_dir,
                                   overrides=overrides)
    except ConfigError as e:
        raise _config_problems(e.problems) from None
    problems = []
    if cfg.model.allow_pickle and not allow_pickle:
        problems.append("model.allow_pickle: refused by this daemon — a pickle checkpoint can run code when loaded; "
                        "convert the model to .safetensors, or start the daemon with --allow-pickle if you trust "
                        "every client and file")
    problems += preflight(cfg)
    if problems:
        raise _config_problems(problems)
    return cfg.to_dict()


def _config_problems(problems: list[str]) -> ProtocolError:
    problems = cap_problems(problems)
    return ProtocolError(E_CONFIG, "the config has problems:\n" + "\n".join(problems), {"problems": problems})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def dataset_fingerprint(cfg: dict) -> Optional[str]:
    """A cheap identity of the training data (names, sizes, mtimes), so `show` can tell two runs' data apart."""
    data = cfg["data"]
    root = data.get("train_data_file") if cfg["model"]["task_type"] == "text-generation" else data.get("train_data_dir")
    if not root or not os.path.exists(root):
        return None
    paths = [Path(root)] if os.path.isfile(root) else sorted(p for p in Path(root).rglob("*") if p.is_file())
    entries = [(p.name if p == Path(root) else p.relative_to(root).as_posix(), p.stat().st_size,
                p.stat().st_mtime_ns) for p in paths]
    return _digest(entries)


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def new_record(run_id: str, runs_dir: Path, kind: str, name: str, config: dict, priority: int,
               publish: Optional[dict] = None, versions: Optional[dict] = None) -> dict:
    """A queued run record (what the store keeps and what every client sees)."""
    plain = kind in ("caption", "tools")  # jobs without a training config
    to_hash = config if plain else {k: v for k, v in config.items() if k != "output"}
    return {
        "id": run_id, "name": name, "kind": kind, "status": states.QUEUED, "priority": priority,
        "config": config, "config_hash": _digest(to_hash),
        "dataset_fingerprint": None if plain else dataset_fingerprint(config),
        "versions": versions, "publish": publish or {}, "created_at": time.time(), "step": 0,
        "attempts": 0, "resume": 0, "run_dir": str(runs_dir / run_id),
    }


def write_snapshot(record: dict) -> Path:
    """The run folder with the config the child will read: the exact snapshot that was validated."""
    run_dir = Path(record["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    from lora_core.files import atomic_write_text  # stdlib only, like this module's other engine import

    return atomic_write_text(run_dir / "config.yaml",
                             yaml.safe_dump(record["config"], sort_keys=False, allow_unicode=True))


# auto_label options the daemon sets itself: the folder to label and where the job's events go
DAEMON_CAPTION_OPTIONS = ("input", "events", "json")
# Every option a caption job may pass to ``python -m lora_core.dataset.auto_label``, with its type: the child's
# command line is built from this table only (``--flag=value``), never from the keys a client sent.
CAPTION_JOB_OPTIONS: dict[str, type] = {
    "output": str, "format": str, "captioner": str, "model": str, "device": str, "batch_size": int,
    "trigger": str, "prefix": str, "overwrite": bool, "caption_extension": str, "max_length": int, "min_length": int,
    "num_beams": int, "prompt": str, "threshold": float, "character_threshold": float, "include_rating": bool,
    "exclude_tags": str,
}


def _caption_option(key: str, value: Any, folder: Path) -> Any:
    kind = CAPTION_JOB_OPTIONS[key]
    if kind is bool:
        if not isinstance(value, bool):
            raise ProtocolError(E_BAD_REQUEST, f"options.{key}: must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ProtocolError(E_BAD_REQUEST, f"options.{key}: must be a number, got {value!r}")
        if not 0 <= value <= 100_000:
            raise ProtocolError(E_BAD_REQUEST, f"options.{key}: must be between 0 and 100000, got {value!r}")
        return kind(value)
    if not isinstance(value, str) or len(value) > 1000 or any(c in value for c in "\0\n\r"):
        raise ProtocolError(E_BAD_REQUEST, f"options.{key}: must be one line of text")
    if key == "caption_extension" and value not in CAPTION_EXTENSIONS:
        raise ProtocolError(E_BAD_REQUEST, f"options.caption_extension: must be one of "
                                           f"{', '.join(CAPTION_EXTENSIONS)}, got {value[:40]!r}")
    if key == "output":
        out = (folder / Path(value).expanduser()).resolve()
        if not inside(out, folder) or out.suffix.lower() != ".csv":
            raise ProtocolError(E_BAD_REQUEST, f"options.output: must be a .csv file inside {folder}, got {value!r}")
        return str(out)
    return value


def caption_job(folder: Any, options: Any, base_dir: Optional[str]) -> dict:
    """Check a caption request: an existing folder and options from `CAPTION_JOB_OPTIONS` only, each of its type,
    any file it writes inside that folder."""
    if not isinstance(folder, str) or not folder or "\0" in folder:
        raise ProtocolError(E_BAD_REQUEST, "folder: give the image folder to caption")
    path = (Path(base_dir or ".") / Path(folder).expanduser()).resolve()
    if not path.is_dir():
        raise ProtocolError(E_BAD_REQUEST, f"folder: no such folder, got {str(path)!r}")
    options = options or {}
    if not isinstance(options, dict):
        raise ProtocolError(E_BAD_REQUEST, "options: must be a mapping")
    checked = {}
    for key, value in options.items():
        key = key.replace("-", "_") if isinstance(key, str) else key
        if key in DAEMON_CAPTION_OPTIONS:
            raise ProtocolError(E_BAD_REQUEST, f"options.{key}: set by the daemon; give the folder instead")
        if key not in CAPTION_JOB_OPTIONS:
            raise ProtocolError(E_BAD_REQUEST, f"options.{str(key)[:40]}: not an option of auto-labelling; one of "
                                               f"{', '.join(CAPTION_JOB_OPTIONS)}")
        if value is not None:
            checked[key] = _caption_option(key, value, path)
    return {"folder": str(path), "options": checked}


def caption_command_args(options: dict) -> list[str]:
    """The auto_label flags for checked options: ``--flag=value`` (so a value starting with '-' stays a value)."""
    args = []
    for key in sorted(options):
        if key not in CAPTION_JOB_OPTIONS:
            continue  # a record from an older daemon: only known options ever reach a command line
        flag, value = "--" + key.replace("_", "-"), options[key]
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args.append(f"{flag}={value}")
    return args
