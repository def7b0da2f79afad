"""Image datasets for training: find images and captions, skip what is broken, repeat, resize and crop.

Caption sources, in order of precedence (the first that has the image wins):
1. ``metadata.csv`` (``filename,prompt``; ``data.metadata_path``, or ``<train_data_dir>/metadata.csv`` if present),
2. a sidecar ``<image stem><caption_extension>`` next to the image (kohya style),
3. ``data.default_caption``, then the class tokens of a ``<repeats>_<class tokens>`` folder.
An image with none of these is an error naming it. Corrupt, tiny and oversized images (and pictures the trainer does
not read, such as .gif) are skipped and reported by name; images used after a conversion (CMYK, 16-bit, animated:
first frame) are reported by name in ``notes``; exact duplicates (same bytes) are reported and used once. Nothing
here modifies the dataset folder.

``python -m lora_core.dataset check|prepare ...`` runs the dataset tools (see `lora_core.dataset.cli`).
"""
from __future__ import annotations

from ..errors import InputError
import csv
import hashlib
import io
import logging
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from ..files import atomic_write_text
from ..preflight import IMAGE_EXTS
from .buckets import Bucket, assign_bucket, make_buckets

log = logging.getLogger(__name__)

# Pictures the trainer does not read (`prepare` converts them): named as skipped instead of silently ignored.
CONVERTIBLE_EXTS = (".bmp", ".gif", ".tif", ".tiff")
REPEAT_DIR = re.compile(r"^(\d+)_(.*)$")
MIN_SIDE = 32  # px: a smaller image upscaled to the training resolution teaches only blur


class DatasetError(InputError):
    """A dataset problem the user must fix (e.g. an image without a caption), naming the file."""


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int = 1
    subset: str = ""
    width: int = 0
    height: int = 0
    is_reg: bool = False
    bucket: Optional[Bucket] = None
    digest: str = ""  # sha256 of the file: duplicate detection and the disk latent cache key


@dataclass
class DatasetScan:
    """What was found: the usable items plus everything that was skipped, each with its reason."""

    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative file name, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (duplicate, the file kept)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (file used, what was done to it and why)

    @property
    def num_images(self) -> int:
        return sum(i.repeats for i in self.items)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per-subset tag counts in sd-scripts' form (lower-cased, comma-split), for ``ss_tag_frequency``."""
        freq: dict[str, Counter] = {}
        for item in self.items:
            counter = freq.setdefault(item.subset or "images", Counter())
            counter.update(t.strip().lower() for t in item.caption.split(",") if t.strip())
        return {k: dict(v) for k, v in freq.items()}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        dirs: dict[str, dict[str, int]] = {}
        for item in self.items:
            d = dirs.setdefault(item.subset or "images", {"n_repeats": item.repeats, "img_count": 0})
            d["img_count"] += 1
        return dirs


def find_images(root: Path) -> list[Path]:
    """Every image file under root (recursive, hidden folders skipped), in a stable order."""
    found = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            found.append(p)
    return found


def read_metadata_csv(path: Path) -> dict[str, str]:
    """``filename,prompt`` rows (header optional; extra columns ignored). A bad row is an error naming its line."""
    captions: dict[str, str] = {}
    header_columns = 0
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if lineno == 1 and row[0].strip().lower() in ("file_name", "filename", "file", "image"):
                header_columns = len(row)
                continue
            if len(row) < 2:
                raise DatasetError(f"{path.name} line {lineno}: expected 'filename,prompt', got {','.join(row)!r}")
            if len(row) > 2 and row[2].strip() and header_columns == 2:
                raise DatasetError(f"{path.name} line {lineno}: more columns than the header — a caption with "
                                   f"commas must be in double quotes: {row[0]},\"{', '.join(c.strip() for c in row[1:])}\"")
            captions[row[0].strip().replace("\\", "/")] = row[1].strip()
    return captions


def write_metadata_csv(path: Path, captions: dict[str, str]) -> Path:
    """Write ``file_name,text`` rows atomically, the form `read_metadata_csv` and diffusers' imagefolder both read."""
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(["file_name", "text"])
    for name, caption in captions.items():
        writer.writerow([name, caption])
    return atomic_write_text(path, rows.getvalue(), newline="")


def subset_of(root: Path, image: Path) -> tuple[str, int, str]:
    """(subset name, repeats, class tokens) from the first folder level: ``10_mychar`` repeats its images 10×."""
    rel = image.relative_to(root)
    if len(rel.parts) < 2:
        return "", 1, ""
    top = rel.parts[0]
    m = REPEAT_DIR.match(top)
    if m:
        return top, max(1, int(m.group(1))), m.group(2).replace("_", " ").strip()
    return top, 1, ""


def caption_for(root: Path, image: Path, csv_captions: dict[str, str], caption_extension: str) -> Optional[str]:
    rel = image.relative_to(root).as_posix()
    if rel in csv_captions:
        return csv_captions[rel]
    if image.name in csv_captions:
        return csv_captions[image.name]
    sidecar = image.with_suffix(caption_extension)
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class UnusableImage(ValueError):
    """An image file that opens but is not trained on (too small, too large); the message says why."""


def conversion_note(im: Image.Image) -> Optional[str]:
    """What `upright_rgb` does to this image that the user may not expect, or None when it is used as is."""
    frames = getattr(im, "n_frames", 1) if getattr(im, "is_animated", False) else 1
    if frames > 1:
        return f"animated ({frames} frames): only the first frame is used"
    if im.mode == "CMYK":
        return "CMYK: converted to RGB (colours may shift; save it as RGB to be sure)"
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return f"{'16' if im.mode.startswith('I;16') else '32'}-bit grayscale: converted to 8-bit RGB"
    return None


def inspect_image(path: Path) -> tuple[int, int, Optional[str]]:
    """(upright width, height, conversion note) of an image the trainer can use; raises for one it cannot.

    The size is checked from the header before decoding, so a decompression bomb is refused by name instead of
    being decoded (PIL would only warn, without the file name); then the image is fully decoded (``verify`` alone
    misses truncated data)."""
    with warnings.catch_warnings():  # PIL's own bomb warning has no file name; the reason below does
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        w, h = im.size
        if w * h > (Image.MAX_IMAGE_PIXELS or 1 << 62):
            raise UnusableImage(f"too large ({w}×{h} = {w * h / 1e6:.0f} MP, over the {Image.MAX_IMAGE_PIXELS / 1e6:.0f} "
                                f"MP decompression-bomb limit): downscale it")
        if min(w, h) < MIN_SIDE:
            raise UnusableImage(f"too small ({w}×{h}; at least {MIN_SIDE} px a side): upscaled it would teach blur")
        note = conversion_note(im)
        im.load()
        orientation = im.getexif().get(0x0112, 1)
    return (h, w, note) if orientation in (5, 6, 7, 8) else (w, h, note)


def image_size(path: Path) -> tuple[int, int]:
    """Open and fully decode the image; returns its upright size (raises for an image the trainer cannot use)."""
    w, h, _ = inspect_image(path)
    return w, h


def scan_dataset(train_data_dir: str | Path, metadata_path: str | Path | None = None, caption_extension: str = ".txt",
                 default_caption: Optional[str] = None, is_reg: bool = False) -> DatasetScan:
    """Find every usable image with its caption; report, never raise, for corrupt files and duplicates."""
    root = Path(train_data_dir)
    meta = Path(metadata_path) if metadata_path else root / "metadata.csv"
    csv_captions = read_metadata_csv(meta) if meta.is_file() else {}
    scan = DatasetScan()
    seen: dict[str, str] = {}
    missing: list[str] = []
    for other in sorted(p for p in root.rglob("*") if p.suffix.lower() in CONVERTIBLE_EXTS and p.is_file()):
        rel = other.relative_to(root).as_posix()
        if not any(part.startswith(".") for part in other.relative_to(root).parts):
            reason = f"{other.suffix.lower()} is not read by the trainer: convert it (python -m lora_core.dataset prepare)"
            scan.skipped.append((rel, reason))
            log.warning("skipping %s: %s", rel, reason)
    for image in find_images(root):
        rel = image.relative_to(root).as_posix()
        try:
            width, height, note = inspect_image(image)
        except UnusableImage as e:
            scan.skipped.append((rel, str(e)))
            log.warning("skipping %s: %s", rel, e)
            continue
        except Exception as e:  # PIL raises many types for broken files
            scan.skipped.append((rel, f"unreadable image ({type(e).__name__}: {e})"))
            log.warning("skipping %s: unreadable image (%s)", rel, e)
            continue
        digest = file_digest(image)
        if digest in seen:
            scan.duplicates.append((rel, seen[digest]))
            log.warning("%s is an exact duplicate of %s; using it once", rel, seen[digest])
            continue
        seen[digest] = rel
        subset, repeats, class_tokens = subset_of(root, image)
        caption = caption_for(root, image, csv_captions, caption_extension)
        if caption is None:
            caption = default_caption if default_caption is not None else (class_tokens or None)
        if caption is None:
            missing.append(rel)
            continue
        scan.items.append(ImageItem(image, caption, repeats, subset, width, height, is_reg, digest=digest))
        if note:
            scan.notes.append((rel, note))
            log.warning("%s: %s", rel, note)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DatasetError(f"no caption for {shown}: add a line to metadata.csv, a {caption_extension} file next to "
                           f"the image, or set data.default_caption")
    if not scan.items:
        reasons = "; ".join(f"{n}: {r}" for n, r in scan.skipped[:5])
        raise DatasetError(f"{root}: no usable images ({', '.join(e.lstrip('.') for e in IMAGE_EXTS)})"
                           f"{' — ' + reasons if reasons else ''}")
    return scan


def process_caption(caption: str, trigger_word: Optional[str], shuffle: bool, keep_tokens: int,
                    dropout: float, rng: random.Random) -> str:
    """Trigger word first, then tags shuffled after the first ``keep_tokens``; dropped to '' with prob. dropout."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if trigger_word and trigger_word not in tags:
        tags.insert(0, trigger_word)
        keep = keep_tokens + 1
    else:
        keep = keep_tokens
    if shuffle and len(tags) > keep:
        head, tail = tags[:keep], tags[keep:]
        rng.shuffle(tail)
        tags = head + tail
    return ", ".join(tags)


def upright_rgb(im: Image.Image) -> Image.Image:
    """The pixels the trainer sees (and the dataset tools report on): EXIF orientation applied, any transparency
    (alpha modes, palette or tRNS) composited on white, RGB."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):  # 16/32-bit grayscale: scale, don't clip to white
        top = 65535.0 if im.mode != "F" and (im.mode.startswith("I;16") or (im.getextrema()[1] or 0) > 255) else 255.0
        im = im.convert("F").point(lambda v: v * (255.0 / top)).convert("L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, width: int, height: int, center_crop: bool = True, rng: Optional[random.Random] = None,
               flip: bool = False):
    """Upright RGB image scaled to cover (width, height) without stretching, then cropped to it; a [-1,1] tensor."""
    return load_image_with_crop(path, width, height, center_crop, rng, flip)[0]


def load_image_with_crop(path: Path, width: int, height: int, center_crop: bool = True,
                         rng: Optional[random.Random] = None, flip: bool = False):
    """`load_image` plus the crop's (top, left) offset in the scaled image — SDXL is conditioned on it."""
    import numpy as np
    import torch

    with Image.open(path) as im:
        im = upright_rgb(im)
        scale = max(width / im.width, height / im.height)
        new_w, new_h = max(width, round(im.width * scale)), max(height, round(im.height * scale))
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
        if center_crop or rng is None:
            left, top = (new_w - width) // 2, (new_h - height) // 2
        else:
            left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
        im = im.crop((left, top, left + width, top + height))
        if flip:
            im = ImageOps.mirror(im)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (top, left)


def assign_buckets(items: list[ImageItem], resolution: int, enable_bucket: bool, min_reso: int, max_reso: int,
                   steps: int) -> list[Bucket]:
    """Give each item the bucket closest to its aspect ratio (one square bucket when bucketing is off)."""
    buckets = make_buckets(resolution, min_reso, max_reso, steps) if enable_bucket else [Bucket(resolution, resolution)]
    for item in items:
        item.bucket = assign_bucket(item.width, item.height, buckets)
    return buckets
