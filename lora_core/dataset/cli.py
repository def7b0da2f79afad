"""``python -m lora_core.dataset check|prepare``: the dataset tools at the command line.

``check FOLDER`` prints the report (``--json`` for machines) and exits 1 when it found errors (corrupt or unsupported
files, images without captions), so a script can stop before training. ``prepare SRC --out DST`` builds a clean copy.
Bad arguments and missing folders exit 2 with one line naming the problem.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from .scan import DatasetError
from .check import DEFAULT_MAX_ASPECT, DEFAULT_NEAR_THRESHOLD, check_dataset
from .prepare import CAPTION_FORMATS, prepare_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_core.dataset", description="Check or prepare an image dataset.")
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
    return p


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
