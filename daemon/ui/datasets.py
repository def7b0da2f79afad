"""Save what a user drops on the tab (images, caption files, zips) into a dataset folder, safely.

Uploads arrive as temp files named by the browser; a zip can hold anything, including ``../../`` paths and
gigabytes of zeros. Everything is written inside one dataset folder under the datasets root, with plain file names,
without overwriting, and only images and caption text files are kept. Checking the images (corrupt files, sizes,
captions) is the daemon's `check` command, so the rules live in the engine once.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

# The WebUI process cannot import lora_core; these are the extensions the engine's dataset reader accepts.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")
MAX_MEMBER_BYTES = 64 * 1024 * 1024
MAX_ZIP_BYTES = 4 * 1024 * 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._ ()+-]+")


class DatasetPathError(ValueError):
    """A user-given name or path that would leave the folder it belongs in (a dataset, or a run's folder)."""


@dataclass
class SaveReport:
    saved: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"saved {len(self.saved)} file(s)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(self.skipped[:10])
        return text


def safe_name(name: str) -> str:
    """A plain file name from anything a browser or zip sends: last path part, no odd characters, no leading dot."""
    base = re.split(r"[\\/]", str(name))[-1]
    cleaned = _UNSAFE.sub("_", base).strip(" .")
    return cleaned or "file"


def confined(root: Path, *parts: str) -> Path:
    """``root/parts`` resolved, refusing anything that ends up outside ``root``."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise DatasetPathError(f"{'/'.join(parts)!r} is outside {root}")
    return path


def dataset_folder(root: Path, name: str) -> Path:
    """The folder of dataset ``name`` under ``root`` (created), with the name made safe."""
    folder = confined(root, safe_name(name))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_path(folder: Path, name: str) -> Path:
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    candidate = folder / f"{stem}{suffix}"
    n = 2
    while candidate.exists():
        candidate = folder / f"{stem}_{n}{suffix}"
        n += 1
    return candidate


def _wanted(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS + CAPTION_EXTS


def _save_zip(archive: Path, folder: Path, report: SaveReport) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        report.skipped.append(f"{archive.name}: not a valid zip file")
        return
    total = 0
    with zf:
        for member in zf.infolist():
            if member.is_dir() or "__MACOSX" in member.filename:
                continue
            name = safe_name(member.filename)
            if not _wanted(name):
                report.skipped.append(f"{member.filename}: not an image or caption file")
                continue
            if member.file_size > MAX_MEMBER_BYTES or total + member.file_size > MAX_ZIP_BYTES:
                report.skipped.append(f"{member.filename}: too large ({member.file_size} bytes)")
                continue
            dest = _free_path(folder, name)
            with zf.open(member) as src, open(dest, "wb") as out:
                # copy at most the declared size (+1 to notice a lying header) so a zip bomb cannot fill the disk
                data = src.read(member.file_size + 1)
                if len(data) > member.file_size:
                    out.close()
                    dest.unlink()
                    report.skipped.append(f"{member.filename}: size does not match the zip header")
                    continue
                out.write(data)
            total += member.file_size
            report.saved.append(dest.name)


def complete_image(path: Path) -> bool:
    """False for an image file that is empty or cut short — what "Add" sees if pressed while the browser is still
    uploading. Checked by the formats' own end markers, without an image library (the WebUI side stays light);
    anything that is not png/jpg/webp passes."""
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".webp"):
        return True
    size = path.stat().st_size
    if size < 16:
        return False
    with open(path, "rb") as fh:
        head = fh.read(12)
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    if head.startswith(b"\x89PNG"):
        return tail.endswith(b"IEND\xaeB`\x82")
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" in tail
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 <= size
    return True  # another format under an image name: the dataset check reports it


def save_uploads(files: Iterable[Any], folder: Path) -> SaveReport:
    """Copy uploaded images/caption files and the contents of uploaded zips into ``folder``; never overwrite.

    ``files`` are paths, or gradio upload values: a temp-file wrapper with ``.name`` (gradio 3) or a path string
    (gradio 4) — hence ``getattr(f, "name", f)``.
    """
    report = SaveReport()
    folder.mkdir(parents=True, exist_ok=True)
    for upload in files:
        path = Path(upload if isinstance(upload, (str, os.PathLike)) else getattr(upload, "name", upload))
        original = safe_name(getattr(upload, "orig_name", None) or path.name)
        if path.suffix.lower() == ".zip":
            _save_zip(path, folder, report)
        elif _wanted(original) and not complete_image(path):
            report.skipped.append(f"{original}: incomplete image (still uploading?) — add it again")
        elif _wanted(original):
            dest = _free_path(folder, original)
            shutil.copyfile(path, dest)
            report.saved.append(dest.name)
        else:
            report.skipped.append(f"{original}: not an image, caption file or zip")
    log.info("dataset %s: %s", folder, report.summary())
    return report


def list_images(folder: Path) -> list[Path]:
    """The dataset's images, sorted, for the caption editor's grid."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
