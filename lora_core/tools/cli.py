"""``lora-tools inspect|merge|bake|resize|extract``: the toolbox's command line.

Every command writes atomically and refuses to overwrite without ``--force``; ``--json`` prints the report as JSON
(the last line of output); ``--events FILE`` writes JSON-lines progress for the daemon. Bad input (a pickle, a
missing file, mixed families, a LoRA given as base) prints one line naming the file and exits with code 2 —
nothing is written.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Optional

from ..errors import InputError
from ..events import EXIT_CONFIG, EXIT_OK, EXIT_STOPPED


class Stopped(KeyboardInterrupt):
    """SIGTERM (the daemon's cancel) or Ctrl+C: unwinds like an error, so the half-written temp file is removed."""


def _stop(signum, frame) -> None:
    raise Stopped()

PRECISION_CHOICES = ("fp16", "bf16", "fp32")


def _weighted(values: list[str]) -> list[tuple[str, float]]:
    from .lora_file import parse_weighted

    return [parse_weighted(v) for v in values]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-tools", description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, writes: bool = True) -> None:
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.add_argument("--events", help="append JSON-lines progress events to this file (for the daemon)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if writes:
            p.add_argument("--force", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("inspect", help="family, adapter type, rank/alpha per block, training metadata",
                       allow_abbrev=False)
    p.add_argument("files", nargs="+", help="LoRA .safetensors files (or diffusers LoRA folders)")
    common(p, writes=False)

    p = sub.add_parser("merge", help="combine LoRAs of one family into one file", allow_abbrev=False)
    p.add_argument("loras", nargs="+", help="FILE or FILE:WEIGHT")
    p.add_argument("--out", required=True, help="the merged .safetensors file")
    p.add_argument("--rank", type=int, help="SVD to this rank (approximate); default: concatenate ranks (exact)")
    p.add_argument("--precision", default="fp16", choices=PRECISION_CHOICES)
    common(p)

    p = sub.add_parser("bake", help="merge LoRAs into a base checkpoint (WebUI single file)", allow_abbrev=False)
    p.add_argument("base", help="base checkpoint (.safetensors single file or diffusers folder)")
    p.add_argument("loras", nargs="+", help="FILE or FILE:WEIGHT")
    p.add_argument("--out", required=True, help="the baked .safetensors checkpoint")
    p.add_argument("--precision", default="fp16", choices=PRECISION_CHOICES)
    common(p)

    p = sub.add_parser("resize", help="lower a LoRA's rank by SVD", allow_abbrev=False)
    p.add_argument("file", help="the LoRA to resize")
    p.add_argument("--out", required=True, help="the resized .safetensors file")
    p.add_argument("--rank", type=int, help="the new rank (with --dynamic: the most any module keeps)")
    p.add_argument("--dynamic", choices=("sv_ratio", "sv_fro", "sv_cumulative"),
                   help="choose each module's rank by its singular values (sd-scripts' methods)")
    p.add_argument("--param", type=float, help="the --dynamic method's target (ratio, or share 0-1)")
    p.add_argument("--fro-ratio", type=float, help="shorthand for --dynamic sv_fro --param X")
    p.add_argument("--precision", default="fp16", choices=PRECISION_CHOICES)
    common(p)

    p = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints", allow_abbrev=False)
    p.add_argument("tuned", help="the fine-tuned checkpoint")
    p.add_argument("base", help="the checkpoint it was tuned from")
    p.add_argument("--out", required=True, help="the extracted .safetensors LoRA")
    p.add_argument("--rank", type=int, default=16, help="rank of the linear layers (default 16)")
    p.add_argument("--conv-rank", type=int, help="also extract 3×3 convolutions as LoCon at this rank")
    p.add_argument("--min-diff", type=float, default=1e-6, help="skip layers that changed less (max |Δ|)")
    p.add_argument("--no-text-encoder", action="store_true", help="UNet only")
    p.add_argument("--precision", default="fp16", choices=PRECISION_CHOICES)
    common(p)
    return parser


def run(args: argparse.Namespace) -> dict:
    from .progress import Progress

    progress = Progress(bar=not args.no_progress and not args.json, events=args.events, desc=args.command)
    if args.command == "inspect":
        from .inspect import inspect_file

        return {"files": [inspect_file(f) for f in args.files]}
    if args.command == "merge":
        from .merge import merge_loras

        return merge_loras(_weighted(args.loras), args.out, rank=args.rank, precision=args.precision,
                           force=args.force, progress=progress)
    if args.command == "bake":
        from .bake import bake

        return bake(args.base, _weighted(args.loras), args.out, precision=args.precision, force=args.force,
                    progress=progress)
    if args.command == "resize":
        from .resize import resize_lora

        method, param = args.dynamic, args.param
        if args.fro_ratio is not None:
            method, param = "sv_fro", args.fro_ratio
        return resize_lora(args.file, args.out, rank=args.rank, method=method, param=param,
                           precision=args.precision, force=args.force, progress=progress)
    from .extract import extract_lora

    return extract_lora(args.tuned, args.base, args.out, rank=args.rank, conv_rank=args.conv_rank,
                        min_diff=args.min_diff, text_encoder=not args.no_text_encoder, precision=args.precision,
                        force=args.force, progress=progress)


def _short(report: dict) -> str:
    """The terminal summary: the per-module tables stay in --json."""
    if "files" in report:
        from .inspect import render_text

        return "\n\n".join(render_text(info) for info in report["files"])
    shown = {k: v for k, v in report.items() if k not in ("per_module", "error_per_module")}
    return "\n".join(f"{k}: {v}" for k, v in shown.items())


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    if hasattr(signal, "SIGBREAK"):  # Windows: the daemon's stop request
        signal.signal(signal.SIGBREAK, _stop)
    events = None
    if args.events:
        from ..events import EventWriter

        events = EventWriter(args.events)
        events.emit("start", command=args.command)
    try:
        report = run(args)
    except InputError as e:
        print(f"lora-tools {args.command}: {e}", file=sys.stderr)
        if events:
            events.emit("end", status="failed", error=str(e), output=None)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print(f"lora-tools {args.command}: stopped; nothing was written", file=sys.stderr)
        if events:
            events.emit("end", status="stopped", error=None, output=None)
        return EXIT_STOPPED
    except Exception as e:  # a bug or an environment failure: the traceback goes to the log, the reason to events
        if events:
            events.emit("end", status="failed", error=f"{type(e).__name__}: {e}", output=None)
        raise
    if events:
        events.emit("end", status="finished", output=report.get("output"), error=None,
                    report={k: v for k, v in report.items() if k not in ("per_module", "error_per_module")})
    print(json.dumps(report, default=str) if args.json else _short(report))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
