"""``lora-daemon tools inspect|merge|bake|resize|extract``: the LoRA toolbox run by the daemon.

The same commands as ``lora-tools`` (`lora_core.tools`), but the work runs in the daemon's queue as a job with
progress (``lora-daemon list`` shows it, ``--wait`` follows it), and the files live in the daemon's folders: a bare
name means its Lora folder (LoRAs) or checkpoint folder (models); a path that exists here is sent as an absolute
path, which the daemon accepts only inside its folders.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .client import DaemonClient, DaemonError, DaemonNotRunning
from .states import TERMINAL

PRECISIONS = ("fp16", "bf16", "fp32")


def _path(value: str) -> str:
    """An existing local path as absolute (the daemon may run elsewhere in the tree); a bare name as given."""
    return str(Path(value).resolve()) if os.path.exists(value) else value


def _weighted(value: str) -> dict:
    head, sep, tail = value.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            return {"path": _path(head), "weight": float(tail)}
        except ValueError:
            pass
    return {"path": _path(value), "weight": 1.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tool", required=True)

    def job(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", required=True, help="output file name (bare: the daemon's Lora/checkpoint folder)")
        q.add_argument("--precision", default="fp16", choices=PRECISIONS)
        q.add_argument("--force", action="store_true", help="replace --out if it exists")
        q.add_argument("--wait", action="store_true", help="follow the job to its end; exit 0 only if it finished")
        q.add_argument("--json", action="store_true", help="print machine-readable JSON")

    q = sub.add_parser("inspect", help="family, adapter type, rank/alpha, training metadata of a LoRA")
    q.add_argument("file")
    q.add_argument("--json", action="store_true", help="print machine-readable JSON")
    q = sub.add_parser("merge", help="combine LoRAs of one family (concatenation, or SVD with --rank)")
    q.add_argument("loras", nargs="+", help="FILE or FILE:WEIGHT")
    q.add_argument("--rank", type=int)
    job(q)
    q = sub.add_parser("bake", help="merge LoRAs into a base checkpoint")
    q.add_argument("base")
    q.add_argument("loras", nargs="+", help="FILE or FILE:WEIGHT")
    job(q)
    q = sub.add_parser("resize", help="lower a LoRA's rank by SVD")
    q.add_argument("file")
    q.add_argument("--rank", type=int)
    q.add_argument("--dynamic", choices=("sv_ratio", "sv_fro", "sv_cumulative"))
    q.add_argument("--param", type=float)
    job(q)
    q = sub.add_parser("extract", help="a LoRA from the difference of two checkpoints")
    q.add_argument("tuned")
    q.add_argument("base")
    q.add_argument("--rank", type=int, default=16)
    q.add_argument("--conv-rank", type=int)
    job(q)


def request_args(args: argparse.Namespace) -> dict:
    """The `tools` request for the parsed command line."""
    req: dict[str, Any] = {"out": args.out, "precision": args.precision, "force": args.force}
    if args.tool == "merge":
        req.update(loras=[_weighted(v) for v in args.loras], rank=args.rank)
    elif args.tool == "bake":
        req.update(base=_path(args.base), loras=[_weighted(v) for v in args.loras])
    elif args.tool == "resize":
        req.update(file=_path(args.file), rank=args.rank, dynamic=args.dynamic, param=args.param)
    else:
        req.update(tuned=_path(args.tuned), base=_path(args.base), rank=args.rank, conv_rank=args.conv_rank)
    return {k: v for k, v in req.items() if v is not None}


def _follow(client: DaemonClient, run_id: str) -> dict:
    shown = None
    while True:
        run = client.get(run_id)
        progress = (run.get("step"), run.get("total_steps"))
        if progress != shown and progress[1]:
            print(f"{run['name']}: {progress[0]}/{progress[1]}", flush=True)
            shown = progress
        if run["status"] in TERMINAL:
            return run
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from .users import command_line_user

    client = DaemonClient(home=args.home, timeout=5.0, user=command_line_user(getattr(args, "user", None)))
    try:
        if args.tool == "inspect":
            info = client.tools_inspect(_path(args.file))
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                print(f"{info['file']}: {info['family']} {', '.join(info['adapter_types'])}, rank {info['rank']}, "
                      f"alpha {info['alpha']}, {info['modules']} modules")
            return 0
        job = client.tools(args.tool, **request_args(args))
        if not args.wait:
            print(json.dumps(job, indent=2) if args.json else job["id"])
            return 0
        print(job["id"], flush=True)
        job = _follow(client, job["id"])
    except (DaemonNotRunning, DaemonError) as e:
        print(f"lora-daemon tools: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(f"{job['status']}: {job.get('output_file') or job.get('error') or ''}")
    return 0 if job["status"] == "finished" else 1
