"""Caption editing for a whole folder: read all, set one, apply one edit to all, merge metadata.csv with sidecars.

The Train tab's caption editor calls these through the daemon, so they take a folder and plain values and return
dataclasses with ``to_dict()``. Captions are read exactly as the trainer reads them (`lora_core.dataset.scan.caption_for`:
``metadata.csv`` wins over a sidecar ``.txt``), and a caption is written back to the place it was read from, so an edit
always changes what trains. Every write is atomic (temporary file + ``os.replace``): a crash leaves the old caption
or the new one, never half of one.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..files import atomic_write_text
from .scan import IMAGE_EXTS, DatasetError, caption_for, find_images, read_metadata_csv, write_metadata_csv
from .check import tag_frequency

log = logging.getLogger(__name__)

SOURCES = ("csv", "txt")


class CaptionError(DatasetError):
    """A caption request the user must fix (unknown edit, missing parameter, image outside the folder)."""


@dataclass
class CaptionEntry:
    file: str  # path relative to the folder, with forward slashes
    caption: Optional[str]
    source: Optional[str]  # "csv", "txt", or None when the image has no caption yet

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionSet:
    folder: str
    entries: list[CaptionEntry] = field(default_factory=list)

    def get(self, file: str) -> CaptionEntry:
        for e in self.entries:
            if e.file == file:
                return e
        raise CaptionError(f"{file}: not an image in {self.folder}")

    def to_dict(self) -> dict:
        return {"folder": self.folder, "entries": [asdict(e) for e in self.entries]}


@dataclass
class CaptionChange:
    file: str
    before: Optional[str]
    after: str


@dataclass
class EditReport:
    op: str
    changed: list[CaptionChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"op": self.op, "changed": [asdict(c) for c in self.changed], "notes": self.notes}


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: list[str]) -> str:
    return ", ".join(tags)


def add_trigger(caption: str, word: str) -> str:
    """The trigger word as the first tag, once (an existing occurrence elsewhere moves to the front)."""
    return join_tags([word] + [t for t in split_tags(caption) if t.lower() != word.lower()])


def add_tags(caption: str, tags: list[str]) -> str:
    """Append the tags the caption lacks (compared case-insensitively), in the order given."""
    have = {t.lower() for t in split_tags(caption)}
    extra = [t.strip() for t in tags if t.strip() and t.strip().lower() not in have]
    return join_tags(split_tags(caption) + list(dict.fromkeys(extra)))


def remove_tags(caption: str, tags: list[str]) -> str:
    """Drop whole tags, compared case-insensitively (``remove_tags("1girl, Solo", ["solo"])`` → ``"1girl"``)."""
    gone = {t.strip().lower() for t in tags}
    return join_tags([t for t in split_tags(caption) if t.lower() not in gone])


def replace_text(caption: str, find: str, replace: str, regex: bool = False) -> str:
    """Plain or regular-expression find/replace anywhere in the caption."""
    if not find:
        raise CaptionError("find: must not be empty")
    if not regex:
        return caption.replace(find, replace)
    try:
        return re.sub(find, replace, caption)
    except re.error as e:
        raise CaptionError(f"find: not a valid regular expression ({e})") from e


def sort_tags(caption: str, frequency: dict[str, int], keep: int = 0) -> str:
    """Tags after the first ``keep`` ordered by how often they occur in the folder (most frequent first, stable)."""
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    tail.sort(key=lambda t: -frequency.get(t.lower(), 0))
    return join_tags(head + tail)


def dedupe_tags(caption: str) -> str:
    seen: set[str] = set()
    kept = []
    for t in split_tags(caption):
        if t.lower() not in seen:
            seen.add(t.lower())
            kept.append(t)
    return join_tags(kept)


# name → (function of (caption, folder tag frequency, params), required params, optional params)
EDIT_OPS: dict[str, tuple[Callable[[str, dict[str, int], dict], str], tuple[str, ...], tuple[str, ...]]] = {
    "add_trigger": (lambda c, f, p: add_trigger(c, p["word"]), ("word",), ()),
    "remove_trigger": (lambda c, f, p: remove_tags(c, [p["word"]]), ("word",), ()),
    "add_tags": (lambda c, f, p: add_tags(c, p["tags"]), ("tags",), ()),
    "remove_tags": (lambda c, f, p: remove_tags(c, p["tags"]), ("tags",), ()),
    "replace": (lambda c, f, p: replace_text(c, p["find"], p.get("replace", ""), bool(p.get("regex", False))),
                ("find",), ("replace", "regex")),
    "sort_by_frequency": (lambda c, f, p: sort_tags(c, f, int(p.get("keep", 0))), (), ("keep",)),
    "dedupe": (lambda c, f, p: dedupe_tags(c), (), ()),
}


def metadata_file(folder: Path, metadata_path: str | Path | None) -> Path:
    return Path(metadata_path) if metadata_path else folder / "metadata.csv"


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def csv_key(rel: str, csv_captions: dict[str, str]) -> Optional[str]:
    """The metadata.csv key that holds this image's caption (relative path, or bare file name), as caption_for reads."""
    if rel in csv_captions:
        return rel
    name = rel.rsplit("/", 1)[-1]
    return name if name in csv_captions else None


def read_captions(folder: str | Path, caption_extension: str = ".txt",
                  metadata_path: str | Path | None = None) -> CaptionSet:
    """Every image of the folder with the caption the trainer would use and where it comes from."""
    root = Path(folder)
    if not root.is_dir():
        raise CaptionError(f"{root}: no such folder")
    meta = metadata_file(root, metadata_path)
    csv_captions = read_metadata_csv(meta) if meta.is_file() else {}
    result = CaptionSet(str(root))
    for image in find_images(root):
        rel = image.relative_to(root).as_posix()
        caption = caption_for(root, image, csv_captions, caption_extension)
        source = "csv" if csv_key(rel, csv_captions) is not None else ("txt" if caption is not None else None)
        result.entries.append(CaptionEntry(rel, caption, source))
    return result


def confined_image(root: Path, file: str) -> str:
    """``file`` as a relative posix path of an image inside ``root``; anything escaping the folder is refused."""
    target = (root / file).resolve()
    base = root.resolve()
    if base not in target.parents:
        raise CaptionError(f"{file}: outside the dataset folder {root}")
    if target.suffix.lower() not in IMAGE_EXTS or not target.is_file():
        raise CaptionError(f"{file}: not an image in {root}")
    return target.relative_to(base).as_posix()


def write_captions(root: Path, updates: dict[str, str], captions: CaptionSet, caption_extension: str,
                   metadata_path: str | Path | None) -> None:
    """Write each caption where the trainer reads it: its csv row, its sidecar, or (new) the folder's usual place."""
    meta = metadata_file(root, metadata_path)
    csv_captions = read_metadata_csv(meta) if meta.is_file() else {}
    csv_dirty = False
    sources = {e.file: e.source for e in captions.entries}
    for rel, caption in updates.items():
        source = sources[rel] or ("csv" if meta.is_file() else "txt")
        if source == "csv":
            csv_captions[csv_key(rel, csv_captions) or rel] = caption
            csv_dirty = True
        else:
            write_text_atomic((root / rel).with_suffix(caption_extension), caption + "\n")
    if csv_dirty:
        write_metadata_csv(meta, csv_captions)


def set_caption(folder: str | Path, file: str, caption: str, caption_extension: str = ".txt",
                metadata_path: str | Path | None = None) -> CaptionEntry:
    """Replace one image's caption (``file`` relative to the folder)."""
    root = Path(folder)
    captions = read_captions(root, caption_extension, metadata_path)
    rel = confined_image(root, file)
    if "\n" in caption.strip():
        raise CaptionError(f"{file}: a caption is one line; got {caption.count(chr(10)) + 1} lines")
    write_captions(root, {rel: caption.strip()}, captions, caption_extension, metadata_path)
    return read_captions(root, caption_extension, metadata_path).get(rel)


def apply_edit(folder: str | Path, op: str, params: Optional[dict] = None, caption_extension: str = ".txt",
               metadata_path: str | Path | None = None, dry_run: bool = False) -> EditReport:
    """Apply one edit (``EDIT_OPS``) to every caption in the folder; uncaptioned images are left alone.

    ``dry_run`` reports the changes without writing, for the tab's preview.
    """
    params = dict(params or {})
    if op not in EDIT_OPS:
        raise CaptionError(f"op: unknown edit {op!r}; one of {', '.join(EDIT_OPS)}")
    func, required, optional = EDIT_OPS[op]
    missing = [k for k in required if params.get(k) in (None, "", [])]
    if missing:
        raise CaptionError(f"{op}: missing parameter {', '.join(missing)}")
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise CaptionError(f"{op}: unknown parameter {', '.join(unknown)}")
    if op in ("add_tags", "remove_tags") and isinstance(params["tags"], str):
        params["tags"] = split_tags(params["tags"])
    root = Path(folder)
    captions = read_captions(root, caption_extension, metadata_path)
    frequency = tag_frequency([e.caption for e in captions.entries if e.caption])
    report = EditReport(op)
    updates = {}
    for entry in captions.entries:
        if entry.caption is None:
            continue
        after = func(entry.caption, frequency, params)
        if after != entry.caption:
            updates[entry.file] = after
            report.changed.append(CaptionChange(entry.file, entry.caption, after))
    uncaptioned = sum(1 for e in captions.entries if e.caption is None)
    if uncaptioned:
        report.notes.append(f"{uncaptioned} images have no caption and were left alone")
    if not dry_run:
        write_captions(root, updates, captions, caption_extension, metadata_path)
    log.info("%s: %d captions changed in %s%s", op, len(report.changed), root, " (dry run)" if dry_run else "")
    return report


@dataclass
class CaptionStats:
    """How a folder's captions look, for ``captions stats``: coverage, sources, length and the commonest tags."""
    folder: str
    images: int
    captioned: int
    sources: dict[str, int]
    tags_per_caption: float
    tag_frequency: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self, top: int = 20) -> str:
        lines = [f"{self.folder}: {self.images} images, {self.captioned} captioned, "
                 f"{self.images - self.captioned} without a caption",
                 "captions from: " + (", ".join(f"{k} {v}" for k, v in sorted(self.sources.items())) or "-"),
                 f"{len(self.tag_frequency)} distinct tags, {self.tags_per_caption:.1f} per caption"]
        lines += [f"  {n:5}  {tag}" for tag, n in list(self.tag_frequency.items())[:top]]
        return "\n".join(lines)


def caption_stats(folder: str | Path, caption_extension: str = ".txt",
                  metadata_path: str | Path | None = None) -> CaptionStats:
    captions = read_captions(Path(folder), caption_extension, metadata_path)
    texts = [e.caption for e in captions.entries if e.caption]
    sources: dict[str, int] = {}
    for e in captions.entries:
        if e.source:
            sources[e.source] = sources.get(e.source, 0) + 1
    per = sum(len(split_tags(t)) for t in texts) / len(texts) if texts else 0.0
    return CaptionStats(captions.folder, len(captions.entries), len(texts), sources, per, tag_frequency(texts))


@dataclass
class MergeReport:
    into: str
    prefer: str
    written: int = 0
    conflicts: list[dict] = field(default_factory=list)  # {file, csv, txt, kept}
    moved_aside: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def merge_captions(folder: str | Path, prefer: str = "csv", into: str = "csv", caption_extension: str = ".txt",
                   metadata_path: str | Path | None = None) -> MergeReport:
    """Combine ``metadata.csv`` rows and sidecar files into one source.

    Where both hold a caption for an image and they differ, ``prefer`` decides (and the conflict is reported).
    ``into="csv"`` writes every caption to metadata.csv (sidecars stay, unused). ``into="txt"`` writes every sidecar
    and renames metadata.csv to ``metadata.csv.bak``, since the trainer would otherwise keep reading the csv.
    """
    for name, value in (("prefer", prefer), ("into", into)):
        if value not in SOURCES:
            raise CaptionError(f"{name}: must be one of {', '.join(SOURCES)}, got {value!r}")
    root = Path(folder)
    if not root.is_dir():
        raise CaptionError(f"{root}: no such folder")
    meta = metadata_file(root, metadata_path)
    csv_captions = read_metadata_csv(meta) if meta.is_file() else {}
    report = MergeReport(into, prefer)
    merged: dict[str, str] = {}
    for image in find_images(root):
        rel = image.relative_to(root).as_posix()
        key = csv_key(rel, csv_captions)
        from_csv = csv_captions[key] if key is not None else None
        from_txt = caption_for(root, image, {}, caption_extension)
        first, second = (from_csv, from_txt) if prefer == "csv" else (from_txt, from_csv)
        kept = first if first else second
        if from_csv and from_txt and from_csv != from_txt:
            report.conflicts.append({"file": rel, "csv": from_csv, "txt": from_txt, "kept": kept})
        if kept:
            merged[rel] = kept
    if into == "csv":
        write_metadata_csv(meta, merged)
    else:
        for rel, caption in merged.items():
            write_text_atomic((root / rel).with_suffix(caption_extension), caption + "\n")
        if meta.is_file():
            aside = meta.with_name(meta.name + ".bak")
            n = 1
            while aside.exists():
                n += 1
                aside = meta.with_name(f"{meta.name}.bak{n}")
            os.replace(meta, aside)
            report.moved_aside = str(aside)
    report.written = len(merged)
    return report
