"""Drop a finished LoRA into the WebUI's Lora folder (or a text adapter into the adapters folder) — never overwrite,
never twice, never half.

Why never overwrite: Forge caches LoRA weights by file name, so a new file under an old name keeps serving the old
weights until a restart, and a user's earlier LoRA would be lost. A name taken by another file gets ``_v2``, ``_v3``….

Why a recorded step (`Publication`): the daemon may be killed at any moment inside publishing. The name it means to
use is chosen once and stored in the run's row *before* the first byte is written; every file goes in under a
hidden temporary name (``.<name>.<run>.part``) and is moved into place with `os.replace`, so the WebUI's folder
watcher never sees half a file. A restarted daemon finds the stored name and finishes the same publication — files
already in place with the right bytes are kept, a left-over ``.part`` is removed — so there is never a ``_v2``
duplicate and never a sidecar without its LoRA. If publishing fails for good (full disk), `rollback` removes what it
wrote. (This module keeps its own small atomic writes: the daemon does not import the engine's file helpers.)

Fault injection for the crash tests: ``LORA_DAEMON_FAULT_PUBLISH`` = ``after-sidecar`` | ``mid-copy`` |
``after-copy`` kills the daemon (SIGKILL, like ``kill -9``) at that point of the next publication.
"""
from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
import signal
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

log = logging.getLogger(__name__)

MAX_VERSIONS = 10_000
# the card's "sd version" (A1111's and Forge's SdVersion names) from the file's ss_base_model_version
SD_VERSIONS = (("flux1", "Flux"), ("sdxl", "SDXL"), ("sd_v2", "SD2"), ("sd_v1", "SD1"))
FAULT_ENV = "LORA_DAEMON_FAULT_PUBLISH"
FAULT_POINTS = ("after-sidecar", "mid-copy", "after-copy")
LORA_SUFFIXES = (".safetensors", ".json", ".png", ".preview.png")


@dataclass
class Published:
    path: Path
    sidecar: Optional[Path]
    preview: Optional[Path]


@dataclass
class Publication:
    """One publication in progress: where, under which name (chosen once), and for which run (the .part names)."""

    folder: Path
    stem: str
    kind: str  # "lora" (a .safetensors file + card) or "adapter" (a folder)
    tag: str  # the run id: names this publication's temporary files

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "stem": self.stem, "kind": self.kind, "tag": self.tag}

    @classmethod
    def from_dict(cls, data: dict) -> "Publication":
        return cls(Path(data["folder"]), str(data["stem"]), str(data["kind"]), str(data["tag"]))

    def targets(self) -> list[Path]:
        if self.kind == "adapter":
            return [self.folder / self.stem]
        return [self.folder / f"{self.stem}{ext}" for ext in (".json", ".png", ".safetensors")]

    def part(self, dest: Path) -> Path:
        return dest.with_name(f".{dest.name}.{self.tag}.part")


def fault(point: str) -> None:
    """Die here, like kill -9, when the crash tests ask for this point (see the module docstring)."""
    if os.environ.get(FAULT_ENV) == point:
        log.warning("fault injection: killing the daemon at publish point %s", point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        if sys.platform == "win32":  # Windows: no SIGKILL; TerminateProcess is the same abrupt end
            os._exit(137)
        os.kill(os.getpid(), signal.SIGKILL)


def _taken(folder: Path, stem: str, suffix: str) -> bool:
    return any((folder / f"{stem}{ext}").exists() for ext in (suffix, ".json", ".png", ".preview.png"))


def free_name(folder: Path, name: str, suffix: str, reserved: Iterable[str] = ()) -> str:
    """The first of name, name_v2, name_v3… whose file and sidecars are all absent and that no other publication
    in progress has claimed (`reserved`)."""
    reserved = set(reserved)
    for version in range(1, MAX_VERSIONS):
        stem = name if version == 1 else f"{name}_v{version}"
        if stem not in reserved and not _taken(folder, stem, suffix):
            return stem
    raise FileExistsError(f"{folder}: {name} has {MAX_VERSIONS} versions already; clean up the folder")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _copy_file(src: Path, tmp: Path, point: Optional[str] = None) -> None:
    """Copy bytes (half, then the fault point, then the rest: so `mid-copy` leaves a real half-written .part)."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        fout.write(fin.read(size // 2))
        if point:
            fout.flush()
            fault(point)
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _same(a: Path, b: Path) -> bool:
    if a.is_dir() != b.is_dir():
        return False
    if a.is_dir():
        cmp = filecmp.dircmp(a, b)
        return not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files) and \
            all(_same(a / d, b / d) for d in cmp.common_dirs)
    return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)


def _put(pub: Publication, dest: Path, write: Callable[[Path], None], expected: Callable[[Path], bool]) -> None:
    """Put one file (or folder) in place under its final name, atomically; a file already there that `expected`
    accepts is ours from before a crash and is kept (no second write under a name the WebUI may have cached)."""
    if dest.exists() and expected(dest):
        return
    if dest.exists():
        raise FileExistsError(f"{dest}: appeared while this LoRA was being published; not overwriting it")
    tmp = pub.part(dest)
    _remove(tmp)
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        _remove(tmp)  # a full disk must not leave a hidden .part in the WebUI's Lora folder


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_parts(pub: Publication) -> None:
    """Remove this publication's left-over temporary files (a daemon killed mid-copy leaves one)."""
    for dest in pub.targets():
        _remove(pub.part(dest))


def sd_version(src: Path) -> Optional[str]:
    """The model family a LoRA file says it is for, as the card's ``sd version`` names it (``Flux``, ``SDXL``,
    ``SD2``, ``SD1``): read from its ``ss_base_model_version``, in the safetensors header only. None when the file
    says none or is not a safetensors file (a diffusers folder)."""
    try:
        with Path(src).open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100 * 1024 * 1024:
                return None
            version = json.loads(fh.read(size)).get("__metadata__", {}).get("ss_base_model_version", "")
    except (OSError, ValueError, struct.error, AttributeError):
        return None
    return next((name for prefix, name in SD_VERSIONS if str(version).startswith(prefix)), None)


def sidecar_text(src: Path, trigger_words: Optional[str], preferred_weight: float,
                 base_model: Optional[str] = None) -> str:
    """The card's ``.json``: its description names the base model the LoRA was trained on (what a user needs to
    pick the matching checkpoint), not the LoRA's own file name; ``sd version`` says its family, which the WebUI's
    Lora cards read to show a LoRA beside models it fits (A1111/Forge's ``SdVersion``: SD1, SD2, SDXL; Forge: Flux)."""
    base = Path(str(base_model).rstrip("/\\")).name if base_model else None
    card = {"description": f"trained by lora-scripts on {base}" if base else "trained by lora-scripts",
            "activation text": trigger_words or "", "preferred weight": preferred_weight, "notes": ""}
    version = sd_version(src)
    if version:
        card["sd version"] = version
    return json.dumps(card, indent=2)


def _write_text(text: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        _fsync_file(tmp)
    return write


def _has_text(text: str) -> Callable[[Path], bool]:
    return lambda dest: dest.is_file() and dest.read_text(encoding="utf-8", errors="replace") == text


def plan_lora(lora_dir: Path, name: str, tag: str, reserved: Iterable[str] = ()) -> Publication:
    """Choose the name (once) for an image LoRA; store the result before calling `publish_lora`."""
    lora_dir.mkdir(parents=True, exist_ok=True)
    return Publication(lora_dir, free_name(lora_dir, name, ".safetensors", reserved), "lora", tag)


def plan_adapter(adapters_dir: Path, name: str, tag: str, reserved: Iterable[str] = ()) -> Publication:
    adapters_dir.mkdir(parents=True, exist_ok=True)
    return Publication(adapters_dir, free_name(adapters_dir, name, "", reserved), "adapter", tag)


def publish_lora(src: Path, pub: Publication, trigger_words: Optional[str] = None, preferred_weight: float = 1.0,
                 preview: Optional[Path] = None, base_model: Optional[str] = None) -> Published:
    """Put an image LoRA in place as ``<stem>.safetensors`` with its ``.json`` card sidecar and ``.png`` preview.

    The sidecar and preview are written first and the weights last, so the moment the WebUI sees the LoRA its card
    already has its trigger words and picture. Safe to call again after a crash with the same `pub`.
    """
    if not src.is_file():
        raise FileNotFoundError(f"{src}: the trained LoRA file is missing")
    clean_parts(pub)
    pub.folder.mkdir(parents=True, exist_ok=True)
    sidecar = pub.folder / f"{pub.stem}.json"
    text = sidecar_text(src, trigger_words, preferred_weight, base_model)
    _put(pub, sidecar, _write_text(text), _has_text(text))
    fault("after-sidecar")
    shown_preview = None
    if preview is not None and preview.is_file() and preview.suffix.lower() == ".png":
        shown_preview = pub.folder / f"{pub.stem}.png"
        _put(pub, shown_preview, lambda tmp: _copy_file(preview, tmp), lambda dest: _same(preview, dest))
    dest = pub.folder / f"{pub.stem}.safetensors"
    _put(pub, dest, lambda tmp: _copy_file(src, tmp, "mid-copy"), lambda d: _same(src, d))
    fault("after-copy")
    log.info("published %s", dest)
    return Published(dest, sidecar, shown_preview)


def publish_adapter(src: Path, pub: Publication) -> Published:
    """Copy a text adapter folder (adapter_config.json + weights) into place under the publication's folder name."""
    if not (src / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{src}: not an adapter folder (no adapter_config.json)")
    clean_parts(pub)
    dest = pub.folder / pub.stem
    _put(pub, dest, lambda tmp: shutil.copytree(src, tmp), lambda d: _same(src, d))
    fault("after-copy")
    log.info("published adapter %s", dest)
    return Published(dest, None, None)


def rollback(pub: Publication, sources: dict[Path, Path | str]) -> None:
    """Undo a publication that cannot finish: remove its .part files and every final file it wrote, recognised by
    content (`sources` maps each target to the file it was copied from, or to the text written) — never a file
    someone else put under that name."""
    clean_parts(pub)
    for dest, src in sources.items():
        if not dest.exists():
            continue
        ours = _has_text(src)(dest) if isinstance(src, str) else (src.exists() and _same(src, dest))
        if ours:
            _remove(dest)
            log.info("rolled back %s", dest)
