"""``dataset check``: open every image of a folder for real and say, by file name, what would hurt training.

The report is plain data (``CheckReport.to_dict()`` is JSON) because the daemon serves it as the ``check`` command and
the Train tab shows it. Problems come in two severities: ``error`` (the trainer skips the file or refuses the folder:
corrupt images, unsupported formats, images without a caption, a broken ``metadata.csv``) and ``warning`` (it trains,
but probably not the way the user wants: too small, extreme aspect ratio, duplicates, alpha/CMYK/EXIF-rotated images
that ``prepare`` would normalise, captions without an image). Nothing here writes to the folder.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from .scan import (CONVERTIBLE_EXTS, IMAGE_EXTS, DatasetError, caption_for, file_digest, find_images,
                   read_metadata_csv, upright_rgb)

log = logging.getLogger(__name__)

# Formats people have lying around that PIL opens but the trainer does not pick up (`CONVERTIBLE_EXTS`, from the
# scan): `prepare` converts them to PNG. Other picture formats we see in raw folders and cannot read without extra plugins.
UNREADABLE_EXTS = (".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".raw", ".cr2", ".nef", ".dng")
EXIF_ORIENTATION = 0x0112
HASH_SIZE = 8  # per colour channel: 8×8 bits, 192 bits per image
DEFAULT_NEAR_THRESHOLD = 12  # bits out of 192; a resized or re-encoded copy stays well below, unrelated images ~96
DEFAULT_MAX_ASPECT = 3.0

ERROR_KINDS = ("corrupt", "unsupported_format", "no_caption", "bad_metadata", "no_images")


@dataclass
class Problem:
    """One thing wrong with one file. ``other`` names the file a duplicate duplicates; ``distance`` is in bits."""

    file: str
    kind: str
    detail: str
    other: Optional[str] = None
    distance: Optional[int] = None

    @property
    def severity(self) -> str:
        return "error" if self.kind in ERROR_KINDS else "warning"

    def to_dict(self) -> dict:
        return {**asdict(self), "severity": self.severity}


@dataclass
class ImageInfo:
    """What opening one image told us; the upright size (EXIF orientation applied)."""

    file: str
    width: int
    height: int
    mode: str
    format: str
    orientation: int
    has_alpha: bool
    digest: str
    phash: int
    caption: Optional[str]
    mtime: float = 0.0  # when the file was last written: of two duplicates the older is taken for the original

    def to_dict(self) -> dict:
        return {"file": self.file, "width": self.width, "height": self.height, "mode": self.mode,
                "format": self.format, "orientation": self.orientation, "has_alpha": self.has_alpha,
                "caption": self.caption}


@dataclass
class CheckReport:
    folder: str
    resolution: int
    images: list[ImageInfo] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    tag_frequency: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing would stop or silently change training (warnings are allowed)."""
        return not any(p.severity == "error" for p in self.problems)

    def by_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def summary(self) -> dict:
        widths = [i.width for i in self.images]
        heights = [i.height for i in self.images]
        return {
            "readable_images": len(self.images),
            "captioned": sum(1 for i in self.images if i.caption),
            "errors": sum(1 for p in self.problems if p.severity == "error"),
            "warnings": sum(1 for p in self.problems if p.severity == "warning"),
            "min_size": [min(widths), min(heights)] if widths else None,
            "max_size": [max(widths), max(heights)] if widths else None,
            "problem_counts": dict(Counter(p.kind for p in self.problems)),
        }

    def to_dict(self) -> dict:
        return {"folder": self.folder, "resolution": self.resolution, "ok": self.ok, "summary": self.summary(),
                "images": [i.to_dict() for i in self.images], "problems": [p.to_dict() for p in self.problems],
                "tag_frequency": self.tag_frequency}

    def to_text(self, top_tags: int = 30) -> str:
        """The human-readable report the CLI prints."""
        s = self.summary()
        lines = [f"{self.folder}: {s['readable_images']} readable images, {s['captioned']} captioned, "
                 f"{s['errors']} errors, {s['warnings']} warnings (resolution {self.resolution})"]
        if s["min_size"]:
            lines.append(f"sizes: smallest {s['min_size'][0]}x{s['min_size'][1]}, "
                         f"largest {s['max_size'][0]}x{s['max_size'][1]}")
        for p in self.problems:
            extra = f" (of {p.other}" + (f", distance {p.distance}" if p.distance is not None else "") + ")" \
                if p.other else ""
            lines.append(f"  {p.severity:7} {p.kind:21} {p.file}: {p.detail}{extra}")
        if self.tag_frequency:
            lines.append(f"tags ({len(self.tag_frequency)} distinct, top {min(top_tags, len(self.tag_frequency))}):")
            for tag, n in list(self.tag_frequency.items())[:top_tags]:
                lines.append(f"  {n:5}  {tag}")
        return "\n".join(lines)


def colour_dhash(im: Image.Image, hash_size: int = HASH_SIZE) -> int:
    """Difference hash of each RGB channel, concatenated (3·hash_size² bits).

    Per channel, not on grey, so a red and a blue version of the same shape do not count as near duplicates.
    """
    small = np.asarray(im.convert("RGB").resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:, :] > small[:, :-1, :]).transpose(2, 0, 1).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def inspect_image(root: Path, path: Path, csv_captions: dict[str, str], caption_extension: str) -> ImageInfo:
    """Fully decode one image (``verify`` alone misses truncated data) and hash its upright pixels."""
    with Image.open(path) as im:
        im.load()
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        mode, fmt = im.mode, im.format or ""
        has_alpha = mode in ("RGBA", "LA", "PA") or "transparency" in im.info
        upright = upright_rgb(im)
        width, height = upright.size
        phash = colour_dhash(upright)
    return ImageInfo(path.relative_to(root).as_posix(), width, height, mode, fmt, orientation, has_alpha,
                     file_digest(path), phash, caption_for(root, path, csv_captions, caption_extension),
                     path.stat().st_mtime)


def image_problems(info: ImageInfo, resolution: int, max_aspect: float) -> list[Problem]:
    """Per-image findings that need no other image to decide."""
    found = []
    short, long_ = min(info.width, info.height), max(info.width, info.height)
    if short < resolution:
        found.append(Problem(info.file, "too_small",
                             f"{info.width}x{info.height} is below the training resolution {resolution}; "
                             f"it will be upscaled and look soft"))
    if long_ / max(1, short) > max_aspect:
        found.append(Problem(info.file, "extreme_aspect",
                             f"{info.width}x{info.height} has aspect ratio {long_ / short:.1f}:1 "
                             f"(over {max_aspect:g}:1); most of it is cropped away"))
    if info.has_alpha:
        found.append(Problem(info.file, "alpha", f"mode {info.mode}: transparent pixels train as white"))
    elif info.mode not in ("RGB", "L"):
        found.append(Problem(info.file, "colour_mode", f"mode {info.mode}: converted to RGB when loaded"))
    if info.orientation != 1:
        found.append(Problem(info.file, "exif_rotated",
                             f"EXIF orientation {info.orientation}: the stored pixels are rotated or mirrored"))
    if not info.caption:
        found.append(Problem(info.file, "no_caption", "no metadata.csv row and no caption file"))
    return found


# A file name as copies get them: "dup.png", "x_copy.png", "x - Copy (2).jpg", "Copy of x.png", "x (1).png".
COPY_NAME = re.compile(r"(?i)(^copy of\b|(^|[\s_.(-])(copy|dup|duplicate)(\s*\(?\d+\)?|[\s_-]?\d+)?\)?$|\s\(\d+\)$)")


def looks_like_copy(file: str) -> bool:
    return bool(COPY_NAME.search(Path(file).stem))


def _why_kept(kept: ImageInfo, other: ImageInfo) -> str:
    if looks_like_copy(other.file) and not looks_like_copy(kept.file):
        return "the one not named like a copy"
    if kept.mtime < other.mtime:
        return "the older file"
    return "the first by name"


def duplicate_problems(infos: list[ImageInfo], near_threshold: int) -> list[Problem]:
    """Exact duplicates (same bytes) and near duplicates (colour dHash within ``near_threshold`` bits).

    Of each group the original is kept: the file not named like a copy (``dup.png``, ``x_copy.png``, ``x (1).png``),
    else the older one, else the first by name; each other file is reported against it, saying why it is the copy.
    """
    found = []
    first_by_digest: dict[str, ImageInfo] = {}
    unique: list[ImageInfo] = []
    for info in sorted(infos, key=lambda i: (looks_like_copy(i.file), i.mtime, i.file)):
        kept = first_by_digest.get(info.digest)
        if kept:
            found.append(Problem(info.file, "exact_duplicate", f"same bytes as {kept.file} (kept: "
                                 f"{_why_kept(kept, info)})", other=kept.file, distance=0))
            continue
        first_by_digest[info.digest] = info
        near = min(((hash_distance(info.phash, u.phash), u) for u in unique), default=None, key=lambda t: t[0])
        if near and near[0] <= near_threshold:
            found.append(Problem(info.file, "near_duplicate",
                                 f"looks like {near[1].file} ({near[0]} of {3 * HASH_SIZE ** 2} hash bits differ; "
                                 f"kept: {_why_kept(near[1], info)})", other=near[1].file, distance=near[0]))
            continue
        unique.append(info)
    return sorted(found, key=lambda p: p.file)


def picture_files(root: Path) -> list[Path]:
    """Every file that looks like a picture, readable by the trainer or not (hidden folders skipped)."""
    exts = IMAGE_EXTS + CONVERTIBLE_EXTS + UNREADABLE_EXTS
    return [p for p in sorted(root.rglob("*")) if p.suffix.lower() in exts and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)]


def orphan_captions(root: Path, pictures: list[Path], csv_captions: dict[str, str], caption_extension: str,
                    metadata_name: str) -> list[Problem]:
    """Caption files and metadata rows that name no picture (often a renamed or deleted one)."""
    image_rels = {p.relative_to(root).as_posix() for p in pictures}
    image_stems = {str(p.with_suffix("")) for p in pictures}
    image_names = {p.name for p in pictures}
    found = []
    for txt in sorted(root.rglob(f"*{caption_extension}")):
        rel = txt.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not txt.is_file():
            continue
        if str(txt.with_suffix("")) not in image_stems:
            found.append(Problem(rel.as_posix(), "caption_without_image", "no image with this name"))
    for name in csv_captions:
        if name not in image_rels and name not in image_names:
            found.append(Problem(metadata_name, "caption_without_image", f"row for {name!r}, which is not there"))
    return found


def unsupported_files(pictures: list[Path], root: Path) -> list[Problem]:
    """Picture files the trainer will not read, by extension."""
    found = []
    for p in pictures:
        rel = p.relative_to(root)
        ext = p.suffix.lower()
        if ext in CONVERTIBLE_EXTS:
            found.append(Problem(rel.as_posix(), "unsupported_format",
                                 f"{ext} is not read by the trainer (use png/jpg/webp); `prepare` converts it"))
        elif ext in UNREADABLE_EXTS:
            found.append(Problem(rel.as_posix(), "unsupported_format",
                                 f"{ext} is not supported; convert it to png or jpg"))
    return found


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Comma-separated tags, lower-cased, most frequent first (ties alphabetical), as ``ss_tag_frequency`` counts."""
    counter = Counter(t.strip().lower() for c in captions for t in c.split(",") if t.strip())
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def check_dataset(folder: str | Path, resolution: int = 512, caption_extension: str = ".txt",
                  metadata_path: str | Path | None = None, near_threshold: int = DEFAULT_NEAR_THRESHOLD,
                  max_aspect: float = DEFAULT_MAX_ASPECT) -> CheckReport:
    """Inspect every image under ``folder`` and report problems by file name and kind; never modifies anything.

    Raises `DatasetError` only when the folder itself is missing; everything else is a `Problem` in the report.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    report = CheckReport(str(root), resolution)
    meta = Path(metadata_path) if metadata_path else root / "metadata.csv"
    csv_captions: dict[str, str] = {}
    if meta.is_file():
        try:
            csv_captions = read_metadata_csv(meta)
        except (DatasetError, UnicodeDecodeError) as e:
            report.problems.append(Problem(meta.name, "bad_metadata", str(e)))
    images = find_images(root)
    for path in images:
        try:
            info = inspect_image(root, path, csv_captions, caption_extension)
        except Exception as e:  # PIL raises many types for broken files
            rel = path.relative_to(root).as_posix()
            report.problems.append(Problem(rel, "corrupt", f"cannot be decoded ({type(e).__name__}: {e})"))
            log.debug("corrupt image %s: %s", rel, e)
            continue
        report.images.append(info)
        report.problems.extend(image_problems(info, resolution, max_aspect))
    report.problems.extend(duplicate_problems(report.images, near_threshold))
    pictures = picture_files(root)
    report.problems.extend(unsupported_files(pictures, root))
    report.problems.extend(orphan_captions(root, pictures, csv_captions, caption_extension, meta.name))
    if not report.images:  # nothing to train on: an error, so neither Check nor the CLI says "0 errors" for it
        found = f"{len(images)} image file(s), none readable" if images else "no png, jpg or webp images"
        report.problems.insert(0, Problem(".", "no_images", f"{found} in {root} (subfolders included): "
                                                            f"add images before training"))
    report.tag_frequency = tag_frequency([i.caption for i in report.images if i.caption])
    return report
