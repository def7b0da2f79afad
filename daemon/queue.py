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
from .protocol import E_BAD_REQUEST, E_CONFIG, ProtocolError

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "lora-scripts")


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


def resolve_config(config: Any, base_dir: Optional[str], output_dir: Path, name: Optional[str] = None) -> dict:
    """Validate with the engine's schema and return the resolved, sectioned config that the run will use.

    The config is validated as written (so errors carry its line numbers), then its output folder is moved into
    the run folder and the result validated again. Raises ProtocolError(config_invalid) whose details hold the
    engine's ``problems`` (field first, then why).
    """
    from lora_core.config import ConfigError, config_from_dict, config_from_yaml

    given = _given_output(config)
    overrides = {}
    if "output_dir" not in given:
        overrides["output.output_dir"] = str(output_dir)
        if "output_name" not in given:
            overrides["output.output_name"] = name or "lora"
    try:
        if isinstance(config, str):
            cfg = config_from_yaml(config, base_dir=base_dir, overrides=overrides)
        else:
            cfg = config_from_dict({k: v for k, v in config.items() if k != "config_dir"}, base_dir=base_dir,
                                   overrides=overrides)
        resolved = cfg.to_dict()
        resolved["output"]["output_dir"] = str(output_dir)
        if "logging_dir" not in given:
            resolved["output"]["logging_dir"] = str(output_dir / "logs")
        cfg = config_from_dict(resolved, base_dir=cfg.config_dir)
    except ConfigError as e:
        raise ProtocolError(E_CONFIG, "the config has problems:\n" + "\n".join(e.problems),
                            {"problems": e.problems}) from None
    return cfg.to_dict()


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
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(record["config"], sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


# auto_label options the daemon sets itself: the folder to label and where the job's events go
DAEMON_CAPTION_OPTIONS = ("input", "events")


def caption_job(folder: Any, options: Any, base_dir: Optional[str]) -> dict:
    """Check a caption request: an existing folder and flat, scalar options for ``python -m lora_core.dataset.auto_label``."""
    if not isinstance(folder, str) or not folder:
        raise ProtocolError(E_BAD_REQUEST, "folder: give the image folder to caption")
    path = (Path(base_dir or ".") / Path(folder).expanduser()).resolve()
    if not path.is_dir():
        raise ProtocolError(E_BAD_REQUEST, f"folder: no such folder, got {str(path)!r}")
    options = options or {}
    if not isinstance(options, dict):
        raise ProtocolError(E_BAD_REQUEST, "options: must be a mapping")
    for key, value in options.items():
        if not isinstance(key, str) or not key.replace("_", "").replace("-", "").isalnum() or key.startswith("-"):
            raise ProtocolError(E_BAD_REQUEST, f"options.{key}: not an option name")
        if key in DAEMON_CAPTION_OPTIONS:
            raise ProtocolError(E_BAD_REQUEST, f"options.{key}: set by the daemon; give the folder instead")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ProtocolError(E_BAD_REQUEST, f"options.{key}: must be a single value, got {value!r}")
    return {"folder": str(path), "options": options}
