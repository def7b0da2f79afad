"""``python -m lora_core.train --config my.yaml`` (also ``lora-train``): train a LoRA from one YAML file.

Prints progress on stderr (a bar on a terminal, plain lines otherwise; `lora_core.console`) and, at the end, the path of the finished LoRA on stdout. ``--events FILE`` writes the
JSON-lines event stream the daemon reads (see `lora_core.events`). ``--plan`` prints the memory plan without
training. SIGTERM or Ctrl+C finishes the current step, writes a checkpoint and the current LoRA and exits with code 3;
a second signal aborts at once. Exit codes: `lora_core.events.EXIT_CODES`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Optional

from .config import ConfigError, TrainConfig, config_from_dict, load_config
from . import preflight
from .errors import InputError
from .events import EXIT_ABORTED, EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_OOM, EXIT_STOPPED, EventWriter
from .console import ConsoleProgress, quiet_known_noise
from .loop import OOM_ADVICE, StopFlag, TrainResult, train

log = logging.getLogger("lora_core.train")


def step_down(cfg: TrainConfig) -> Optional[dict]:
    """The next memory saver after an OOM: halve the batch (keeping the effective batch by doubling accumulation),
    then gradient checkpointing, then latent caching. None when nothing is left to give."""
    t, d = cfg.training, cfg.data
    if t.batch_size > 1:
        return {"training.batch_size": t.batch_size // 2,
                "training.gradient_accumulation_steps": t.gradient_accumulation_steps * 2}
    if not t.gradient_checkpointing:
        return {"training.gradient_checkpointing": True}
    if not cfg.is_text and not d.cache_latents:
        return {"data.cache_latents": True}
    return None


def emit_plan(cfg: TrainConfig, events: EventWriter) -> None:
    """The memory plan as the first phase of a run (``--plan-first``, what the daemon asks for), so the tab's Start
    need not wait for it: the plan event lands in the run's row. A plan that fails never stops the run."""
    from .plan import make_plan

    try:
        plan = make_plan(cfg)
    except Exception as e:  # the plan is advice; training itself reports real problems with their own messages
        log.warning("no memory plan: %s: %s", type(e).__name__, e)
        events.emit("plan", error=f"{type(e).__name__}: {e}")
        return
    log.info("memory plan: %s", plan.describe().replace("\n", "; "))
    events.emit("plan", **plan.to_dict())


def run_training(cfg: TrainConfig, events: Optional[EventWriter] = None, stop: Optional[StopFlag] = None,
                 show_progress: bool = True, plan_first: bool = False) -> TrainResult:
    """Train, applying ``oom_policy: step_down`` by resuming from the saved step with smaller settings.

    ``show_progress`` renders the loop's progress on stderr (`lora_core.console`: a bar on a terminal, plain lines
    otherwise)."""
    events = events or EventWriter(enabled=False)
    progress = ConsoleProgress() if show_progress else None
    if cfg.training.auto_fit:
        from .plan import auto_fit

        cfg, plan = auto_fit(cfg)
        events.emit("plan", estimate_mb=round(plan.estimate_mb, 1), capacity_mb=round(plan.capacity_mb, 1),
                    fits=plan.fits, applied=plan.suggestion)
    elif plan_first:
        emit_plan(cfg, events)
    while True:
        result = train(cfg, events, stop, progress)
        if result.status != "oom":
            return result
        change = step_down(cfg) if cfg.training.oom_policy == "step_down" else None
        if change is None:
            events.emit("end", status="oom", step=result.step, output=None, error=result.error, advice=OOM_ADVICE)
            return result
        log.warning("out of memory at step %d: retrying with %s", result.step, change)
        events.emit("oom", step=result.step, batch_size=cfg.training.batch_size, action="step_down",
                    change=change, advice=OOM_ADVICE)
        cfg = config_from_dict(cfg.to_dict(), base_dir=cfg.config_dir,
                               overrides={**change, "training.resume_from_checkpoint": "latest"})


def _parse_set(values: list[str]) -> dict:
    overrides = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError([f"--set {item!r}: expected key=value"])
        import yaml

        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def install_signal_handlers(stop: StopFlag) -> None:
    """First SIGTERM/SIGINT: save and stop after this step. Second: abort now (exit 130)."""

    def handler(signum, frame):
        if stop.is_set():
            os._exit(EXIT_ABORTED)
        log.warning("stop requested: finishing this step, then saving a checkpoint (signal again to abort)")
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if hasattr(signal, "SIGBREAK"):  # Windows: the daemon sends CTRL_BREAK_EVENT to ask for a stop
        signal.signal(signal.SIGBREAK, handler)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-train", description="Train a LoRA from a YAML config.")
    parser.add_argument("--config", help="YAML config (flat or sectioned); required unless --recommend")
    parser.add_argument("--events", help="append JSON-lines progress events to this file")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (overrides training.resume_from_checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set training.batch_size=2 (repeatable)")
    parser.add_argument("--format", choices=["kohya", "diffusers"],
                        help="kohya .safetensors (default; A1111/Forge/ComfyUI/diffusers) or a diffusers/peft folder")
    parser.add_argument("--plan", action="store_true", help="print the memory plan and exit without training")
    parser.add_argument("--json", action="store_true", help="with --plan: print JSON")
    parser.add_argument("--plan-first", action="store_true",
                        help="work out the memory plan as the run's first phase and emit it as a 'plan' event")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (events and logs only)")
    from .recommend import add_arguments as add_recommend_arguments

    rec = parser.add_argument_group("recommended settings (lora_core.recommend)")
    rec.add_argument("--recommend", action="store_true", help="propose settings for --data, each with its reason, "
                     "and exit without training (--json for JSON)")
    add_recommend_arguments(rec, standalone=False)
    args = parser.parse_args(argv)
    if args.recommend:
        from .recommend import run_cli

        if not args.data:
            parser.error("--recommend needs --data DIR")
        return run_cli(args, sys.stdout, sys.stderr)
    if not args.config:
        parser.error("--config is required (or --recommend --data DIR)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_known_noise()
    events = EventWriter(args.events)
    try:
        overrides = _parse_set(args.set)
        if args.format:
            overrides["output.format"] = args.format
        if args.resume:
            overrides["training.resume_from_checkpoint"] = args.resume
        cfg = load_config(args.config, overrides=overrides)
        preflight.require(cfg)  # the same file checks the daemon ran before queueing, for lora-train users too
    except ConfigError as e:
        print("config error:\n  " + "\n  ".join(e.problems), file=sys.stderr)
        events.emit("end", status="failed", step=0, output=None, error=str(e), advice="fix the config")
        return EXIT_CONFIG
    if args.plan:
        from .plan import make_plan

        plan = make_plan(cfg)
        print(json.dumps(plan.to_dict()) if args.json else plan.describe())
        return EXIT_OK
    stop = StopFlag()
    install_signal_handlers(stop)
    try:
        result = run_training(cfg, events, stop, show_progress=not args.no_progress,
                              plan_first=args.plan_first)
    except InputError as e:  # bad data or model files found while loading: the message says what to fix
        events.emit("end", status="failed", step=0, output=None, error=str(e), advice="fix the input named above")
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        events.emit("end", status="stopped", step=0, output=None, error="stopped before training started",
                    advice=None)
        return EXIT_STOPPED
    except Exception as e:  # the message reaches the user and the daemon; the traceback stays in the log
        log.exception("training failed")
        events.emit("end", status="failed", step=0, output=None, error=f"{type(e).__name__}: {e}", advice=None)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        events.close()
    if result.status == "finished":
        if result.output is not None:  # only the main process of a multi-process run writes the file
            print(result.output)
        return EXIT_OK
    if result.status == "stopped":
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}; LoRA so far {result.output}",
              file=sys.stderr)
        return EXIT_STOPPED
    if result.status == "oom":
        print(f"error: {result.error} at step {result.step}. {result.advice}", file=sys.stderr)
        return EXIT_OOM
    print(f"error: {result.error} at step {result.step}. {result.advice or ''}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
