"""A LoRA-toolbox request (merge, bake, resize, extract) checked and turned into a queued job's command line.

The worker runs the job as ``python -m lora_core.tools <command> … --events FILE`` like a training run, so the tab
shows its progress and the daemon stays free of torch. Every path a request names must resolve inside the folders
the daemon was configured with — its Lora folder, its checkpoint folder, its home — and the child's arguments are
built here from checked values only (never from client keys turned into flags). Bare file names are looked up in
the natural folder: LoRAs in the Lora folder, base models in the checkpoint folder; outputs go to the Lora folder
(merge, resize, extract) or the checkpoint folder (bake).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .protocol import E_BAD_REQUEST, ProtocolError

COMMANDS = ("merge", "bake", "resize", "extract")
PRECISIONS = ("fp16", "bf16", "fp32")
DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")
MAX_INPUTS = 32
SAFE_NAME = re.compile(r"^[^\x00-\x1f/\\]{1,200}$")


@dataclass
class Folders:
    lora_dir: Path
    checkpoint_dir: Path
    home: Path

    def roots(self) -> list[Path]:
        return [self.lora_dir.resolve(), self.checkpoint_dir.resolve(), self.home.resolve()]


def _bad(message: str) -> ProtocolError:
    return ProtocolError(E_BAD_REQUEST, message)


def confine(value: Any, field: str, folders: Folders, default_dir: Path, must_exist: bool) -> Path:
    """``value`` as an absolute path inside one of the daemon's folders; a bare name means ``default_dir``."""
    if not isinstance(value, str) or not value or "\x00" in value or len(value) > 1000:
        raise _bad(f"{field}: give a file name or path")
    raw = Path(value).expanduser()
    path = (raw if raw.is_absolute() else default_dir / raw).resolve()
    roots = folders.roots()
    if not any(path == root or root in path.parents for root in roots):
        raise _bad(f"{field}: {value!r} is outside the daemon's folders ({', '.join(str(r) for r in roots)})")
    if must_exist and not path.exists():
        raise _bad(f"{field}: no such file {str(path)!r}")
    return path


def _number(args: dict, key: str, kind: type, low: float, high: float) -> Optional[Any]:
    value = args.get(key)
    if value is None:
        return None
    whole = kind is not int or (isinstance(value, (int, float)) and float(value).is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not whole:
        raise _bad(f"{key}: must be a {'whole ' if kind is int else ''}number, got {value!r}")
    if not low <= value <= high:
        raise _bad(f"{key}: must be between {low:g} and {high:g}, got {value!r}")
    return kind(value)


def _output(args: dict, folders: Folders, default_dir: Path) -> Path:
    out = args.get("out")
    if not isinstance(out, str) or not SAFE_NAME.match(Path(out).name or ""):
        raise _bad("out: give the output file name (e.g. combined.safetensors)")
    if not out.lower().endswith(".safetensors"):
        out += ".safetensors"
    path = confine(out, "out", folders, default_dir, must_exist=False)
    if path.exists() and not args.get("force"):
        raise _bad(f"out: {path.name} already exists in {path.parent}; pick another name or set force")
    return path


def tool_job(args: dict, folders: Folders) -> dict:
    """The checked job: ``{"command", "argv", "output", "inputs"}``; ``argv`` is the child's argument list."""
    command = args.get("command")
    if command not in COMMANDS:
        raise _bad(f"command: one of {', '.join(COMMANDS)}, got {command!r}")
    argv: list[str] = [command]
    inputs: list[dict] = []
    loras = args.get("loras") if command in ("merge", "bake") else None
    if command in ("merge", "bake"):
        if not isinstance(loras, list) or not 1 <= len(loras) <= MAX_INPUTS:
            raise _bad(f"loras: give 1 to {MAX_INPUTS} LoRAs as [{{\"path\": …, \"weight\": …}}]")
    if command == "bake":
        base = confine(args.get("base"), "base", folders, folders.checkpoint_dir, must_exist=True)
        argv.append(str(base))
        inputs.append({"path": str(base), "role": "base"})
    for i, item in enumerate(loras or []):
        if not isinstance(item, dict):
            raise _bad(f"loras[{i}]: must be {{\"path\": …, \"weight\": …}}")
        path = confine(item.get("path"), f"loras[{i}].path", folders, folders.lora_dir, must_exist=True)
        weight = _number(item, "weight", float, -10, 10)
        weight = 1.0 if weight is None else weight
        argv.append(f"{path}:{weight!r}")
        inputs.append({"path": str(path), "weight": weight})
    if command == "resize":
        path = confine(args.get("file"), "file", folders, folders.lora_dir, must_exist=True)
        argv.append(str(path))
        inputs.append({"path": str(path)})
    if command == "extract":
        for key, default in (("tuned", folders.checkpoint_dir), ("base", folders.checkpoint_dir)):
            path = confine(args.get(key), key, folders, default, must_exist=True)
            argv.append(str(path))
            inputs.append({"path": str(path), "role": key})
    out = _output(args, folders, folders.checkpoint_dir if command == "bake" else folders.lora_dir)
    argv += ["--out", str(out)]
    rank = _number(args, "rank", int, 1, 4096)
    if command == "extract":
        argv += ["--rank", str(rank or 16)]
        conv = _number(args, "conv_rank", int, 1, 4096)
        if conv:
            argv += ["--conv-rank", str(conv)]
    elif rank is not None:
        if command == "bake":
            raise _bad("rank: bake has no rank")
        argv += ["--rank", str(rank)]
    if command == "resize":
        dynamic = args.get("dynamic")
        if dynamic is not None:
            if dynamic not in DYNAMIC:
                raise _bad(f"dynamic: one of {', '.join(DYNAMIC)}, got {dynamic!r}")
            param = _number(args, "param", float, 1e-6, 1e6)
            if param is None:
                raise _bad("param: the dynamic method needs its target (e.g. 0.9)")
            argv += ["--dynamic", dynamic, "--param", repr(param)]
        elif rank is None:
            raise _bad("rank: give the new rank, or a dynamic method with its param")
    precision = args.get("precision", "fp16")
    if precision not in PRECISIONS:
        raise _bad(f"precision: one of {', '.join(PRECISIONS)}, got {precision!r}")
    argv += ["--precision", precision]
    if args.get("force"):
        argv.append("--force")
    return {"command": command, "argv": argv, "output": str(out), "inputs": inputs}


def inspect_path(args: dict, folders: Folders) -> str:
    """The file an ``tools.inspect`` request names, confined like job inputs (a bare name: the Lora folder)."""
    return str(confine(args.get("path"), "path", folders, folders.lora_dir, must_exist=True))
