"""The daemon's adapter to the engine's dataset tools, run in a child process: ``python -m lora_daemon.core_bridge OP``.

Why a child: the daemon stays free of numpy/PIL/torch imports and a crash on a hostile image cannot take it down.
The request arrives as JSON on stdin; the child prints one JSON object: ``{"result": ...}`` or ``{"error": ...}``.
``plan`` runs the engine's own ``python -m lora_core.train --plan --json``; ``captioners`` lists the engine's
captioners and whether their weights are in place, for the tab's captioner menu.
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from . import procs

# op -> (engine module, function); results become JSON through their to_dict().
OPS: dict[str, tuple[str, str]] = {
    "check": ("lora_core.dataset.check", "check_dataset"),
    "captions.get": ("lora_core.dataset.captions", "read_captions"),
    "captions.set": ("lora_core.dataset.captions", "set_caption"),
    "captions.edit": ("lora_core.dataset.captions", "apply_edit"),
    "captioners": ("lora_daemon.core_bridge", "captioner_list"),
    "tools.inspect": ("lora_core.tools.inspect", "inspect_file"),
    "recommend": ("lora_core.recommend", "recommend"),
}


class BridgeError(RuntimeError):
    """The engine refused the request (its message names the file or field) or the child failed."""


def captioner_list() -> list[dict]:
    """In the child: every registered captioner, with ``ready`` when its default model folder has its files."""
    from lora_core.dataset.captioners import available_captioners, default_model_dir

    found = []
    for spec in available_captioners():
        folder = default_model_dir(spec.name) if spec.needs_model_path else None
        ready = folder is None or all((folder / name).exists() for name in spec.required_files)
        found.append({"name": spec.name, "description": spec.description, "ready": ready,
                      "model_dir": str(folder) if folder else None})
    return found


def _jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    import dataclasses

    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def _call(op: str, args: dict) -> Any:
    """In the child: import the engine function and call it with checked keyword arguments."""
    import importlib

    module_name, func_name = OPS[op]
    func: Callable = getattr(importlib.import_module(module_name), func_name)
    params = inspect.signature(func).parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise BridgeError(f"{op}: unknown argument {', '.join(unknown)}; accepted: {', '.join(params)}")
    return _jsonable(func(**args))


def child_main(op: str) -> int:
    try:
        args = json.loads(sys.stdin.read() or "{}")
        if op not in OPS or not isinstance(args, dict):
            raise BridgeError(f"unknown operation {op!r}")
        out = {"result": _call(op, args)}
    except (BridgeError, ValueError, OSError) as e:  # DatasetError/CaptionError are ValueErrors
        out = {"error": str(e)}
    sys.stdout.write(json.dumps(out, default=str))
    return 0


def _run_child(op: str, cmd: list[str], stdin: str, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=procs.python_env(), cwd=str(cwd))
    except subprocess.TimeoutExpired:
        raise BridgeError(f"{op} took longer than {timeout:.0f} s; gave up") from None


def _json_output(op: str, done: subprocess.CompletedProcess) -> Any:
    """The child's JSON answer; a child that crashed before printing one is reported with its last output lines."""
    try:
        return json.loads(done.stdout)
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise BridgeError(f"{op} failed (exit {done.returncode}): " + " | ".join(tail)) from None


def run_op(op: str, args: dict, cwd: Path, timeout: float = 300.0) -> Any:
    """In the daemon: run one dataset operation in a child and return its JSON result."""
    if op not in OPS:
        raise BridgeError(f"unknown operation {op!r}")
    done = _run_child(op, [sys.executable, "-m", "lora_daemon.core_bridge", op], json.dumps(args), timeout, cwd)
    out = _json_output(op, done)
    if "error" in out:
        raise BridgeError(out["error"])
    return out["result"]


def run_plan(config_file: Path, cwd: Path, timeout: float = 300.0) -> Any:
    """The engine's training plan for a config (steps, memory estimate, …) without training."""
    cmd = [sys.executable, "-m", "lora_core.train", "--config", str(config_file), "--plan", "--json"]
    return _json_output("plan", _run_child("plan", cmd, "", timeout, cwd))


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1] if len(sys.argv) > 1 else ""))
