"""Exact-resume checkpoints, written atomically and without pickle.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000100/`` holding
- ``lora.safetensors``: the trainable LoRA weights (peft names, fp32),
- ``optimizer.safetensors``: every optimizer state tensor, plus RNG states that are tensors,
- ``state.json``: step, epoch, position in the epoch, optimizer param groups and scalar state, LR scheduler, grad
  scaler, Python/numpy RNG states, and the config that produced it.
It is written into a hidden temporary folder and moved into place by `lora_core.files.atomic_path` (each file
fsynced, then renamed): a crash at any moment leaves either the previous checkpoint or the new one, never a half one.
Only safetensors and JSON are read back.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .files import atomic_path, is_temp_name, remove

STATE = "state.json"


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    examples_in_epoch: int = 0


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary folder or one without state.json is ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE).is_file()
             and not p.name.endswith(".partial")]  # .partial: the temporary name of older versions
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None  # functions (LambdaLR lambdas) are rebuilt from the config, not stored


def save_checkpoint(output_dir: str | Path, pos: Position, lora: dict[str, torch.Tensor], optimizer,
                    lr_scheduler, scaler, generator: torch.Generator, config: dict, keep_last: int = 3,
                    rng_override: Optional[dict] = None) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for left_over in root.iterdir():  # a run owns its checkpoints folder: what a crash left half written goes
        if is_temp_name(left_over.name) or left_over.name.endswith(".partial"):
            remove(left_over)
    final = root / f"step-{pos.step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        _write_checkpoint(tmp, pos, lora, optimizer, lr_scheduler, scaler, generator, config, rng_override)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, pos: Position, lora: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
                      generator: torch.Generator, config: dict, rng_override: Optional[dict]) -> None:
    from safetensors.torch import save

    (tmp / "lora.safetensors").write_bytes(save({k: v.contiguous() for k, v in lora.items()}))

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = _jsonable(value)
    rng = rng_override or capture_rng(generator)
    tensors["rng.torch"] = rng["torch"]
    tensors["rng.generator"] = rng["generator"]
    tensors["rng.numpy"] = torch.from_numpy(rng["numpy"][1].astype(np.int64))
    for i, state in enumerate(rng["cuda"]):
        tensors[f"rng.cuda.{i}"] = state
    (tmp / "optimizer.safetensors").write_bytes(save(tensors))
    state = {
        "position": pos.__dict__,
        "optimizer": {"param_groups": _jsonable(opt["param_groups"]), "scalars": scalars},
        "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
        "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
        "rng": {"python": _jsonable(rng["python"]), "numpy": [rng["numpy"][0], *_jsonable(list(rng["numpy"][2:]))],
                "cuda_count": len(rng["cuda"])},
        "config": config,
    }
    (tmp / STATE).write_text(json.dumps(state), encoding="utf-8")


def capture_rng(generator: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


@dataclass
class LoadedCheckpoint:
    path: Path
    position: Position
    lora: dict[str, torch.Tensor]
    state: dict
    tensors: dict[str, torch.Tensor]


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no {STATE})")
    state = json.loads((path / STATE).read_text())
    return LoadedCheckpoint(path, Position(**state["position"]), load_file(str(path / "lora.safetensors")), state,
                            load_file(str(path / "optimizer.safetensors")))


def restore_training_state(ckpt: LoadedCheckpoint, optimizer, lr_scheduler, scaler, generator: torch.Generator,
                           restore_rng: bool = True) -> None:
    """Put optimizer, scheduler, scaler and every RNG back exactly as they were when the checkpoint was written."""
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in ckpt.tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    for pid, scalars in ckpt.state["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    groups = ckpt.state["optimizer"]["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    sched = dict(ckpt.state["lr_scheduler"])
    sched.pop("lr_lambdas", None)
    lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **sched})
    if scaler is not None and ckpt.state.get("scaler"):
        scaler.load_state_dict(ckpt.state["scaler"])
    if not restore_rng:
        return
    rng = ckpt.state["rng"]
    torch.set_rng_state(ckpt.tensors["rng.torch"])
    generator.set_state(ckpt.tensors["rng.generator"])
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], ckpt.tensors["rng.numpy"].numpy().astype(np.uint32), *np_state[1:]))
    if torch.cuda.is_available() and rng.get("cuda_count"):
        torch.cuda.set_rng_state_all([ckpt.tensors[f"rng.cuda.{i}"] for i in range(rng["cuda_count"])])
