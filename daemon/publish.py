"""Drop a finished LoRA into the WebUI's Lora folder (or a text adapter into the adapters folder) — never overwrite.

Why never overwrite: Forge caches LoRA weights by file name, so a new file under an old name keeps serving the old
weights until a restart, and a user's earlier LoRA would be lost. A name taken by another file gets ``_v2``, ``_v3``….
Files are written under a temporary name and moved into place with `os.replace`, so the WebUI's folder watcher never
sees half a file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

MAX_VERSIONS = 10_000


@dataclass
class Published:
    path: Path
    sidecar: Optional[Path]
    preview: Optional[Path]


def _taken(folder: Path, stem: str, suffix: str) -> bool:
    return any((folder / f"{stem}{ext}").exists() for ext in (suffix, ".json", ".png", ".preview.png"))


def free_name(folder: Path, name: str, suffix: str) -> str:
    """The first of name, name_v2, name_v3… whose file and sidecars are all absent."""
    for version in range(1, MAX_VERSIONS):
        stem = name if version == 1 else f"{name}_v{version}"
        if not _taken(folder, stem, suffix):
            return stem
    raise FileExistsError(f"{folder}: {name} has {MAX_VERSIONS} versions already; clean up the folder")


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _atomic_write_text(dest: Path, text: str) -> None:
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a hidden .part in the WebUI's Lora folder


def publish_lora(src: Path, lora_dir: Path, name: str, trigger_words: Optional[str] = None,
                 preferred_weight: float = 1.0, preview: Optional[Path] = None) -> Published:
    """Copy an image LoRA into `lora_dir` as ``<free name>.safetensors`` with its ``.json`` card sidecar and preview.

    The sidecar and preview are written first and the weights last, so the moment the WebUI sees the LoRA its card
    already has its trigger words and picture.
    """
    lora_dir.mkdir(parents=True, exist_ok=True)
    stem = free_name(lora_dir, name, ".safetensors")
    sidecar = lora_dir / f"{stem}.json"
    _atomic_write_text(sidecar, json.dumps({"description": f"trained by lora-scripts from {src.name}",
                                            "activation text": trigger_words or "",
                                            "preferred weight": preferred_weight, "notes": ""}, indent=2))
    shown_preview = None
    if preview is not None and preview.is_file() and preview.suffix.lower() == ".png":
        shown_preview = lora_dir / f"{stem}.png"
        _atomic_copy(preview, shown_preview)
    dest = lora_dir / f"{stem}.safetensors"
    _atomic_copy(src, dest)
    log.info("published %s", dest)
    return Published(dest, sidecar, shown_preview)


def publish_adapter(src: Path, adapters_dir: Path, name: str) -> Published:
    """Copy a text adapter folder (adapter_config.json + weights) into `adapters_dir` under a free folder name."""
    if not (src / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{src}: not an adapter folder (no adapter_config.json)")
    adapters_dir.mkdir(parents=True, exist_ok=True)
    stem = free_name(adapters_dir, name, "")
    dest = adapters_dir / stem
    _atomic_copy(src, dest)
    log.info("published adapter %s", dest)
    return Published(dest, None, None)
