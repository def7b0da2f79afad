"""Auto-labeling: caption every image of a folder with a pluggable captioner, in batches, into what the trainer reads.

``python -m lora_core.dataset.auto_label --input data/style --captioner blip --model models/blip`` (also ``lora-label``)
writes ``data/style/metadata.csv``; ``--format txt`` writes sidecar ``.txt`` files instead. By default only images
without a caption are labelled (``--overwrite`` relabels all), so a run can be repeated after adding images. The
output is rewritten atomically after every batch: stopping a long run keeps every caption made so far.

`label_folder` takes any `Captioner` object, so a captioner registered with `register_captioner` labels a folder the
same way as the built-in ones.

``--events FILE`` appends JSON lines (`lora_core.events`) for a caller that follows the job, as the daemon does for
training runs: a ``caption`` event after every batch (done, total, it_s in images per second, eta_s) and one
``end`` event (status "finished" or "failed", done, total, output, failed, error).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from .captions import add_trigger, read_captions, write_text_atomic
from .captioners import (DEVICES, Captioner, CaptionerError, available_captioners, load_captioner)
from .scan import DatasetError, read_metadata_csv, upright_rgb, write_metadata_csv
from ..events import EventWriter

log = logging.getLogger(__name__)

FORMATS = ("csv", "txt")
DEFAULT_BATCH_SIZE = 8


@dataclass
class LabelReport:
    folder: str
    output: str  # the metadata.csv written, or the folder holding the sidecars
    format: str
    captioner: str
    captions: dict[str, str] = field(default_factory=dict)  # image (relative) → new caption
    kept_existing: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {file, reason}
    batches: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_upright_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return upright_rgb(im)


def label_folder(folder: str | Path, captioner: Captioner, fmt: str = "csv", output: str | Path | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, trigger: Optional[str] = None, overwrite: bool = False,
                 caption_extension: str = ".txt",
                 progress: Optional[Callable[[int, int], None]] = None) -> LabelReport:
    """Caption the folder's images in batches of ``batch_size`` and write them as ``fmt`` ("csv" or "txt").

    ``output`` is the csv path (default ``<folder>/metadata.csv``; rows use paths relative to the folder, as
    ``data.metadata_path`` expects). ``trigger`` becomes the first tag of every new caption. Unreadable images are
    reported in ``failed`` and skipped, as are images the captioner gives an empty caption (a trigger word alone
    is not a caption); ``progress(done, total)`` is called after each batch.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"--input {root}: no such folder")
    if fmt not in FORMATS:
        raise DatasetError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch_size < 1:
        raise DatasetError(f"batch_size: must be >= 1, got {batch_size}")
    csv_path = Path(output) if output else root / "metadata.csv"
    if fmt == "csv" and csv_path.suffix.lower() != ".csv":
        raise DatasetError(f"--output {csv_path}: a csv output must end in .csv")
    existing = read_captions(root, caption_extension, csv_path if fmt == "csv" else None)
    report = LabelReport(str(root), str(csv_path if fmt == "csv" else root), fmt, captioner.name)
    todo = [e.file for e in existing.entries if overwrite or not e.caption]
    report.kept_existing = [e.file for e in existing.entries if e.file not in todo]
    if fmt == "txt" and (root / "metadata.csv").is_file():
        report.notes.append("metadata.csv exists in the folder and wins over .txt files for the images it lists; "
                            "merge them with the caption tools or write --format csv")
    csv_rows = read_metadata_csv(csv_path) if fmt == "csv" and csv_path.is_file() else {}
    for start in range(0, len(todo), batch_size):
        names, images = [], []
        for rel in todo[start:start + batch_size]:
            try:
                images.append(load_upright_rgb(root / rel))
                names.append(rel)
            except Exception as e:  # PIL raises many types for broken files
                report.failed.append({"file": rel, "reason": f"unreadable image ({type(e).__name__}: {e})"})
        if images:
            captions = captioner.caption_batch(images)
            if len(captions) != len(images):
                raise CaptionerError(f"captioner {captioner.name!r} returned {len(captions)} captions "
                                     f"for {len(images)} images")
            report.batches += 1
            for rel, caption in zip(names, captions):
                if not caption.strip():
                    report.failed.append({"file": rel, "reason": f"{captioner.name} returned an empty caption"})
                    continue
                caption = add_trigger(caption, trigger) if trigger else caption.strip()
                report.captions[rel] = caption
                if fmt == "txt":
                    write_text_atomic((root / rel).with_suffix(caption_extension), caption + "\n")
                else:
                    csv_rows[rel] = caption
            if fmt == "csv":
                write_metadata_csv(csv_path, csv_rows)
        if progress:
            progress(min(start + batch_size, len(todo)), len(todo))
    log.info("labelled %d images in %s with %s (%d batches, %d kept, %d failed)", len(report.captions), root,
             captioner.name, report.batches, len(report.kept_existing), len(report.failed))
    return report


# CLI option → the captioner it belongs to (passing one to another captioner is a usage error, not silently ignored)
CAPTIONER_OPTIONS = {"max_length": "blip", "min_length": "blip", "num_beams": "blip", "prompt": "blip",
                     "threshold": "wd14", "character_threshold": "wd14", "include_rating": "wd14",
                     "exclude_tags": "wd14"}


def build_parser() -> argparse.ArgumentParser:
    names = [s.name for s in available_captioners()]
    # allow_abbrev=False: the daemon builds this command line from checked options, and an abbreviation such as
    # --inp or --even must never reach --input or --events
    p = argparse.ArgumentParser(prog="lora-label", description="Caption a folder of images with BLIP or a WD14 "
                                "tagger, from local model folders.", allow_abbrev=False)
    p.add_argument("--input", required=True, help="folder of images")
    p.add_argument("--output", help="metadata.csv to write (default <input>/metadata.csv)")
    p.add_argument("--format", choices=FORMATS, help="csv (default) or txt sidecar files next to the images")
    p.add_argument("--captioner", choices=names, default="blip")
    p.add_argument("--model", help="local model folder (default: $LORA_SCRIPTS_CAPTIONERS/<captioner> or the "
                   "per-user data folder)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--trigger", "--prefix", dest="trigger", help="trigger word put first in every new caption")
    p.add_argument("--overwrite", action="store_true", help="relabel images that already have a caption")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--max-length", type=int, help="blip: most new tokens per caption (75)")
    p.add_argument("--min-length", type=int, help="blip: fewest new tokens per caption (5)")
    p.add_argument("--num-beams", type=int, help="blip: beam search width (3)")
    p.add_argument("--prompt", help="blip: conditional prefix such as 'a photo of'")
    p.add_argument("--threshold", type=float, help="wd14: general tag threshold (0.35)")
    p.add_argument("--character-threshold", type=float, help="wd14: character tag threshold (0.85)")
    p.add_argument("--include-rating", action="store_true", default=None, help="wd14: add the rating tag")
    p.add_argument("--exclude-tags", help="wd14: comma-separated tags never to write")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--events", help="append JSON-lines progress events (caption per batch, end) to this file")
    return p


def captioner_options(args: argparse.Namespace) -> dict:
    options = {}
    for key, owner in CAPTIONER_OPTIONS.items():
        value = getattr(args, key)
        if value is None:
            continue
        if owner != args.captioner:
            raise CaptionerError(f"--{key.replace('_', '-')}: applies to --captioner {owner}, not {args.captioner}")
        options[key] = tuple(t.strip() for t in value.split(",") if t.strip()) if key == "exclude_tags" else value
    return options


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fmt = args.format or "csv"
    if args.output and fmt == "txt":
        print("lora-label: --output names a csv file; it cannot be used with --format txt", file=sys.stderr)
        return 2
    # closing() so the events file is closed on every way out, an unexpected exception included
    with closing(EventWriter(args.events)) as events:
        started = time.monotonic()
        counts = {"done": 0, "total": None}
        try:
            captioner = load_captioner(args.captioner, args.model, args.device, **captioner_options(args))
            from tqdm import tqdm

            with tqdm(total=None, unit="img", desc=f"{args.captioner}") as bar:
                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)
                    counts.update(done=done, total=total)
                    rate = done / max(time.monotonic() - started, 1e-6)
                    events.emit("caption", done=done, total=total, it_s=round(rate, 3),
                                eta_s=round((total - done) / rate, 1) if rate else None)

                report = label_folder(args.input, captioner, fmt, args.output, args.batch_size, args.trigger,
                                      args.overwrite, args.caption_extension, progress)
        except (CaptionerError, DatasetError) as e:
            print(f"lora-label: {e}", file=sys.stderr)
            events.emit("end", status="failed", **counts, output=None, failed=[], error=str(e))
            return 2
        failed_error = f"{len(report.failed)} image(s) not labelled: " + "; ".join(
            f"{f['file']}: {f['reason']}" for f in report.failed[:5]) if report.failed else None
        events.emit("end", status="failed" if report.failed else "finished", **counts, output=report.output,
                    failed=report.failed, error=failed_error)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        else:
            print(f"{len(report.captions)} captions written to {report.output} in {report.batches} batches; "
                  f"{len(report.kept_existing)} existing kept, {len(report.failed)} unreadable")
            for f in report.failed:
                print(f"  failed {f['file']}: {f['reason']}")
            for note in report.notes:
                print(f"  note: {note}")
        return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
