"""``dataset prepare``: copy a raw folder into a new, clean training folder; the source is only ever read.

What changes on the way: EXIF orientation is applied to the pixels, every image becomes RGB (transparent and palette
images are composited on white, CMYK converted), the short side is optionally capped, BMP/GIF/TIFF become PNG, file
and folder names become safe on every OS (``10_my char/Foto 1.JPG`` → ``10_my_char/Foto_1.jpg``), and corrupt files,
exact duplicates and (by default) near duplicates are left out. Every decision is in the returned `PrepareReport`.
Captions travel with their image, under its new name, as sidecar ``.txt`` files or one ``metadata.csv``.

The output is assembled in a hidden sibling folder and renamed into place at the end, so a crash never leaves a
half-written dataset where the trainer would pick it up.
"""
from __future__ import annotations

import logging
import re
import shutil
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from ..files import atomic_path
from .scan import DatasetError, IMAGE_EXTS, read_metadata_csv, write_metadata_csv
from .check import (DEFAULT_MAX_ASPECT, DEFAULT_NEAR_THRESHOLD, UNREADABLE_EXTS, ImageInfo, Problem,
                            duplicate_problems, image_problems, inspect_image, orphan_captions,
                            picture_files, upright_rgb)

log = logging.getLogger(__name__)

WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_NAME_CHARS = 100
CAPTION_FORMATS = ("txt", "csv")
KEPT_WARNINGS = ("too_small", "extreme_aspect", "no_caption")  # copied anyway: only the user can judge these


@dataclass
class PreparedImage:
    source: str
    target: str
    changes: list[str] = field(default_factory=list)  # e.g. "exif_rotated", "rgb_from_RGBA", "resized 96x96→64x64"
    caption: Optional[str] = None


@dataclass
class PrepareReport:
    source: str
    out: str
    written: list[PreparedImage] = field(default_factory=list)
    left_out: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "out": self.out, "written": [asdict(w) for w in self.written],
                "left_out": [p.to_dict() for p in self.left_out], "warnings": [p.to_dict() for p in self.warnings]}

    def to_text(self) -> str:
        changed = sum(1 for w in self.written if w.changes)
        lines = [f"{self.out}: {len(self.written)} images written ({changed} changed) from {self.source}, "
                 f"{len(self.left_out)} left out"]
        lines += [f"  left out  {p.file}: {p.kind}, {p.detail}" + (f" (of {p.other})" if p.other else "")
                  for p in self.left_out]
        lines += [f"  changed   {w.source} → {w.target}: {', '.join(w.changes)}" for w in self.written if w.changes]
        lines += [f"  warning   {p.file}: {p.kind}, {p.detail}" for p in self.warnings]
        return "\n".join(lines)


def safe_name(name: str) -> str:
    """A file or folder name that is valid and unambiguous on Windows, macOS and Linux (letters of any script kept)."""
    norm = unicodedata.normalize("NFC", name)
    norm = re.sub(r"[^\w.-]+", "_", norm).strip("._ ")
    norm = re.sub(r"_{2,}", "_", norm) or "image"
    if norm.split(".")[0].upper() in WINDOWS_RESERVED:
        norm = "_" + norm
    return norm[:MAX_NAME_CHARS]


def unique_target(rel_parent: tuple[str, ...], stem: str, ext: str, taken: set[str]) -> str:
    """``folder/stem.ext`` made safe and unique ignoring case (``a.png`` and ``A.PNG`` collide on Windows)."""
    parent = "/".join(safe_name(p) for p in rel_parent)
    base = safe_name(stem)
    candidate, n = base, 1
    while True:
        rel = f"{parent}/{candidate}{ext}" if parent else f"{candidate}{ext}"
        if rel.lower() not in taken:
            taken.add(rel.lower())
            return rel
        n += 1
        candidate = f"{base}_{n}"


def resolve_out(src: Path, out: Path) -> None:
    """Refuse an output that overlaps the source (the source must stay untouched) or already holds files."""
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise DatasetError(f"--out {out}: must be outside the source folder {src} (and not contain it)")
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise DatasetError(f"--out {out}: already exists and is not empty; choose a new folder")


def planned_changes(path: Path, info: ImageInfo, max_short_side: Optional[int]) -> tuple[list[str], Optional[tuple]]:
    """What must change for this image to be clean, and its new size if the short side is capped (never upscaled)."""
    changes = []
    if info.orientation != 1:
        changes.append("exif_rotated")
    if info.mode != "RGB":
        changes.append(f"rgb_from_{info.mode}")
    if path.suffix.lower() not in IMAGE_EXTS:
        changes.append(f"converted_from_{path.suffix.lower().lstrip('.')}")
    short = min(info.width, info.height)
    new_size = None
    if max_short_side and short > max_short_side:
        scale = max_short_side / short
        new_size = (max(1, round(info.width * scale)), max(1, round(info.height * scale)))
        changes.append(f"resized {info.width}x{info.height}→{new_size[0]}x{new_size[1]}")
    return changes, new_size


def target_ext(info: ImageInfo, src_ext: str, reencode: bool) -> str:
    """Copied files keep their format; re-encoded JPEGs stay JPEG (quality 95), everything else becomes PNG."""
    if not reencode:
        return ".jpg" if src_ext == ".jpeg" else src_ext
    return ".jpg" if info.format == "JPEG" else ".png"


def write_prepared(path: Path, dst: Path, reencode: bool, new_size: Optional[tuple]) -> None:
    """Copy the bytes when nothing needs changing; otherwise decode upright, flatten to RGB, resize, re-encode."""
    if not reencode:
        shutil.copyfile(path, dst)
        return
    with Image.open(path) as im:
        im = upright_rgb(im)
        if new_size:
            im = im.resize(new_size, Image.Resampling.LANCZOS)
        if dst.suffix == ".jpg":
            im.save(dst, quality=95, subsampling=0)
        else:
            im.save(dst)


def prepare_dataset(src: str | Path, out: str | Path, max_short_side: Optional[int] = None,
                    caption_extension: str = ".txt", metadata_path: str | Path | None = None,
                    captions: str = "txt", drop_near_duplicates: bool = True,
                    near_threshold: int = DEFAULT_NEAR_THRESHOLD, resolution: int = 0,
                    max_aspect: float = DEFAULT_MAX_ASPECT,
                    progress: Optional[Callable[[int, int], None]] = None) -> PrepareReport:
    """Build a clean copy of ``src`` in ``out`` (which must be new or empty); ``src`` is never written to.

    ``max_short_side`` caps the short side (no upscaling); ``resolution`` and ``max_aspect`` only add warnings.
    ``captions`` is ``"txt"`` (a sidecar per image) or ``"csv"`` (one ``metadata.csv``).
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"{src}: no such folder")
    if captions not in CAPTION_FORMATS:
        raise DatasetError(f"captions: must be one of {', '.join(CAPTION_FORMATS)}, got {captions!r}")
    resolve_out(src, out)
    meta = Path(metadata_path) if metadata_path else src / "metadata.csv"
    csv_captions = read_metadata_csv(meta) if meta.is_file() else {}
    report = PrepareReport(str(src), str(out))

    pictures = picture_files(src)
    infos: list[ImageInfo] = []
    for path in pictures:
        rel = path.relative_to(src).as_posix()
        if path.suffix.lower() in UNREADABLE_EXTS:
            report.left_out.append(Problem(rel, "unsupported_format", f"{path.suffix.lower()} cannot be read"))
            continue
        try:
            infos.append(inspect_image(src, path, csv_captions, caption_extension))
        except Exception as e:  # PIL raises many types for broken files
            report.left_out.append(Problem(rel, "corrupt", f"cannot be decoded ({type(e).__name__}: {e})"))
    dups = duplicate_problems(infos, near_threshold)
    dropped = {p.file for p in dups if p.kind == "exact_duplicate" or drop_near_duplicates}
    report.left_out += [p for p in dups if p.file in dropped]
    report.left_out += orphan_captions(src, pictures, csv_captions, caption_extension, meta.name)
    keep = [i for i in infos if i.file not in dropped]

    taken: set[str] = set()
    out_captions: dict[str, str] = {}
    with atomic_path(out) as staging:  # the prepared folder appears whole, or not at all
        staging.mkdir()
        for n, info in enumerate(keep, start=1):
            path = src / info.file
            changes, new_size = planned_changes(path, info, max_short_side)
            rel_path = Path(info.file)
            target = unique_target(rel_path.parent.parts, rel_path.stem,
                                   target_ext(info, path.suffix.lower(), bool(changes)), taken)
            dst = staging / target
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_prepared(path, dst, bool(changes), new_size)
            report.written.append(PreparedImage(info.file, target, changes, info.caption))
            report.warnings += [Problem(target, p.kind, p.detail) for p in image_problems(info, resolution, max_aspect)
                                if p.kind in KEPT_WARNINGS]
            if info.caption:
                out_captions[target] = info.caption
                if captions == "txt":
                    dst.with_suffix(caption_extension).write_text(info.caption + "\n", encoding="utf-8")
            if progress:
                progress(n, len(keep))
        if captions == "csv" and out_captions:
            write_metadata_csv(staging / "metadata.csv", out_captions)
    log.info("prepared %d images into %s (%d left out)", len(report.written), out, len(report.left_out))
    return report
