"""``python -m lora_core.dataset check|prepare|captions``: the dataset tools at the command line.

``check FOLDER`` prints the report (``--json`` for machines) and exits 1 when it found errors (corrupt or unsupported
files, images without captions), so a script can stop before training. ``prepare SRC --out DST`` builds a clean copy.
``captions ACTION FOLDER`` edits captions (add-tags, remove-tags, replace, trigger, sort, dedupe, merge; ``--dry-run``
shows the changes without writing) or shows ``stats``.
Bad arguments and missing folders exit 2 with one line naming the problem.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from .scan import DatasetError
from .check import DEFAULT_MAX_ASPECT, DEFAULT_NEAR_THRESHOLD, check_dataset
from .prepare import CAPTION_FORMATS, prepare_dataset
from .captions import SOURCES, apply_edit, caption_stats, merge_captions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_core.dataset", description="Check, prepare or caption an image dataset.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--caption-extension", default=".txt")
        sp.add_argument("--metadata", help="metadata.csv with the captions (default <folder>/metadata.csv)")
        sp.add_argument("--near-threshold", type=int, default=DEFAULT_NEAR_THRESHOLD,
                        help=f"near-duplicate distance in hash bits out of 192 ({DEFAULT_NEAR_THRESHOLD})")
        sp.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT)
        sp.add_argument("--json", action="store_true", help="print the report as JSON")

    check = sub.add_parser("check", help="report problems; changes nothing")
    check.add_argument("folder")
    check.add_argument("--resolution", type=int, default=512, help="training resolution; smaller images are flagged")
    check.add_argument("--top-tags", type=int, default=30)
    common(check)

    prep = sub.add_parser("prepare", help="copy into a new, clean folder; the source is never modified")
    prep.add_argument("source")
    prep.add_argument("--out", required=True, help="new (or empty) output folder, outside the source")
    prep.add_argument("--resolution", type=int,
                      help="cap the short side at this size (no upscaling) and flag smaller images")
    prep.add_argument("--captions", choices=CAPTION_FORMATS, default="txt",
                      help="write captions as sidecar .txt files (default) or one metadata.csv")
    prep.add_argument("--keep-near-duplicates", action="store_true", help="copy near duplicates instead of "
                      "leaving them out (exact duplicates are always left out)")
    common(prep)
    add_caption_commands(sub)
    return p


# `captions ACTION FOLDER …` → (help, apply_edit op or None for stats/merge, how its arguments become params)
CAPTION_ACTIONS = {
    "stats": "how many images have captions, from where, and the commonest tags",
    "add-tags": "append tags to every caption that lacks them (comma-separated)",
    "remove-tags": "remove whole tags from every caption (comma-separated, any case)",
    "replace": "find and replace text in every caption (--regex for a regular expression)",
    "trigger": "put a trigger word first in every caption (--remove takes it out again)",
    "sort": "order each caption's tags by how often they occur in the folder (--keep N leaves the first N)",
    "dedupe": "drop repeated tags within each caption",
    "merge": "combine metadata.csv and .txt sidecars into one source",
}


def add_caption_commands(sub) -> None:
    """``captions ACTION FOLDER``: the caption tools the tab has, at the command line, with ``--dry-run``."""
    caps = sub.add_parser("captions", help="edit or inspect the captions of a folder (see `captions -h`)",
                          description="Edit or inspect the captions of an image folder. Every edit takes --dry-run "
                                      "to show what would change without writing.")
    actions = caps.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in CAPTION_ACTIONS.items():
        a = actions.add_parser(name, help=help_text, description=help_text)
        a.add_argument("folder")
        if name in ("add-tags", "remove-tags"):
            a.add_argument("tags", help="tags, comma-separated: 'red, blue sky'")
        elif name == "replace":
            a.add_argument("find")
            a.add_argument("replace", nargs="?", default="", help="the new text (default: remove it)")
            a.add_argument("--regex", action="store_true")
        elif name == "trigger":
            a.add_argument("word")
            a.add_argument("--remove", action="store_true", help="take the trigger word out instead")
        elif name == "sort":
            a.add_argument("--keep", type=int, default=0, help="leave the first N tags in place (e.g. a trigger)")
        elif name == "merge":
            a.add_argument("--prefer", choices=SOURCES, default="csv", help="which wins where both differ")
            a.add_argument("--into", choices=SOURCES, default="csv", help="the one source to keep")
        elif name == "stats":
            a.add_argument("--top", type=int, default=20, help="how many of the commonest tags to list")
        a.add_argument("--caption-extension", default=".txt")
        a.add_argument("--metadata", help="metadata.csv with the captions (default <folder>/metadata.csv)")
        a.add_argument("--json", action="store_true", help="print the result as JSON")
        if name not in ("stats", "merge"):
            a.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")


def _edit_of(args: argparse.Namespace) -> tuple[str, dict]:
    if args.action == "add-tags":
        return "add_tags", {"tags": args.tags}
    if args.action == "remove-tags":
        return "remove_tags", {"tags": args.tags}
    if args.action == "replace":
        return "replace", {"find": args.find, "replace": args.replace, "regex": args.regex}
    if args.action == "trigger":
        return ("remove_trigger" if args.remove else "add_trigger"), {"word": args.word.strip()}
    if args.action == "sort":
        return "sort_by_frequency", {"keep": args.keep}
    return "dedupe", {}


def run_captions(args: argparse.Namespace) -> int:
    if not Path(args.folder).is_dir():
        raise DatasetError(f"{args.folder}: no such folder")
    if args.action == "stats":
        stats = caption_stats(args.folder, args.caption_extension, args.metadata)
        emit(json.dumps(stats.to_dict(), indent=2, ensure_ascii=False) if args.json else stats.to_text(args.top))
        return 0
    if args.action == "merge":
        merged = merge_captions(args.folder, args.prefer, args.into, args.caption_extension, args.metadata)
        emit(json.dumps(merged.to_dict(), indent=2, ensure_ascii=False) if args.json else
             f"{merged.written} captions written to {merged.into}; {len(merged.conflicts)} conflicts "
             f"(kept {merged.prefer})" + (f"; metadata.csv moved to {merged.moved_aside}" if merged.moved_aside else ""))
        return 0
    op, params = _edit_of(args)
    report = apply_edit(args.folder, op, params, args.caption_extension, args.metadata, dry_run=args.dry_run)
    if args.json:
        emit(json.dumps({**report.to_dict(), "dry_run": args.dry_run}, indent=2, ensure_ascii=False))
        return 0
    lines = [f"{c.file}: {c.before!r} → {c.after!r}" for c in report.changed] + report.notes
    verb = "would change (dry run: nothing written)" if args.dry_run else "changed"
    lines.append(f"{len(report.changed)} caption(s) {verb}")
    emit("\n".join(lines))
    return 0


def emit(text: str) -> None:
    """Print a report; a reader that stopped early (``check --json | head``) ends the output quietly, no
    BrokenPipe traceback: stdout is pointed at the null device so the interpreter's final flush cannot fail."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "captions":
            return run_captions(args)
        if args.command == "check":
            report = check_dataset(args.folder, args.resolution, args.caption_extension, args.metadata,
                                   args.near_threshold, args.max_aspect)
            emit(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json
                 else report.to_text(args.top_tags))
            return 0 if report.ok else 1
        report = prepare_dataset(args.source, args.out, max_short_side=args.resolution,
                                 caption_extension=args.caption_extension, metadata_path=args.metadata,
                                 captions=args.captions, drop_near_duplicates=not args.keep_near_duplicates,
                                 near_threshold=args.near_threshold, resolution=args.resolution or 0,
                                 max_aspect=args.max_aspect)
        emit(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.to_text())
        return 0
    except DatasetError as e:
        print(f"dataset {args.command}: {e}", file=sys.stderr)
        return 2
