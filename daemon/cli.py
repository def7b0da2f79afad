"""``lora-daemon``: start/stop the daemon and drive its queue from a terminal.

Subcommands live in one table, `SUBCOMMANDS`: a name, a help line, a function that adds its arguments and a
function that runs it (returns the exit code). Adding one — e.g. ``lora-daemon ui`` from another module — is one
entry: ``Subcommand("ui", "open the Train tab", ui_cli.add_arguments, ui_cli.run)``. Every read command takes
``--json``; every subcommand takes ``--home``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .client import DaemonClient, DaemonError, DaemonNotRunning
from .home import read_info, resolve_home
from .states import TERMINAL
from . import tools_cli
from .ui import setup_env as ui_setup
from .ui import standalone as ui_standalone

TERMINAL_EVENTS = ("run.finished", "run.failed", "run.cancelled")


@dataclass
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cli_user(args: argparse.Namespace) -> Optional[str]:
    """Who this command is for: ``--user``, else the OS user (`users.command_line_user`)."""
    from .users import command_line_user

    return command_line_user(getattr(args, "user", None))


def _client(args: argparse.Namespace, timeout: float = 1.5) -> DaemonClient:
    return DaemonClient(home=args.home, timeout=timeout, user=cli_user(args))


def _fmt_num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def fmt_duration(seconds: Any) -> str:
    """``3725`` → ``1h02m``, ``75`` → ``1m15s``, ``9`` → ``9s``; ``-`` when unknown."""
    if not isinstance(seconds, (int, float)) or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def phase_text(run: dict) -> str:
    """What a running run does besides training steps, in words: ``sampling prompt 1/2, step 7/20``."""
    phase = run.get("phase") or {}
    if phase.get("phase") != "sample":
        return ""
    text = f"sampling prompt {phase.get('prompt_index') or '?'}/{phase.get('prompts') or '?'}"
    if phase.get("denoise_steps"):
        text += f", step {phase.get('denoise_step') or 0}/{phase['denoise_steps']}"
    return text


def plan_text(plan: dict) -> str:
    """The memory plan the run worked out as its first phase, in one line."""
    if plan.get("error"):
        return f"not available ({plan['error']})"
    if plan.get("estimate_mb") is None:
        return "-"
    fits = "fits" if plan.get("fits") else "does NOT fit"
    text = f"peak ~{plan['estimate_mb']:,.0f} MB of {plan.get('capacity_mb') or 0:,.0f} MB on {plan.get('device', '?')} ({fits})"
    if plan.get("suggestion"):
        text += "; suggested: " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in plan["suggestion"].items())
    return text


LIST_HEADER = (f"{'ID':<24} {'STATUS':<10} {'KIND':<7} {'PRIO':>4} {'STEP':>11} {'LOSS':>8} {'IT/S':>7} "
               f"{'ETA':>7}  NAME")


def _run_line(run: dict) -> str:
    steps = f"{run.get('step') or 0}/{run.get('total_steps') or '?'}"
    running = run["status"] in ("running", "cancelling")
    eta = fmt_duration(run.get("eta_s")) if running else "-"
    phase = phase_text(run) if running else ""
    if run["status"] in ("pausing", "paused"):
        phase = f"{run['status']} for {run.get('pause_reason') or 'user'}"
    return (f"{run['id']:<24} {run['status']:<10} {run['kind']:<7} {run['priority']:>4} {steps:>11} "
            f"{_fmt_num(run.get('loss'), '.4f'):>8} {_fmt_num(run.get('it_s'), '.2f'):>7} {eta:>7}  {run['name']}"
            + (f"  ({phase})" if phase else ""))


# --- start / stop / status ----------------------------------------------------------------------------------
def _add_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--foreground", action="store_true", help="stay attached (for service managers and debugging)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; beyond loopback needs --curve-dir")
    p.add_argument("--port", type=int, default=0, help="request port (default: a free one, see daemon.json)")
    p.add_argument("--events-port", type=int, default=0, help="event (PUB) port (default: a free one)")
    p.add_argument("--lora-dir", help="the WebUI Lora folder where finished LoRAs are published")
    p.add_argument("--adapters-dir", help="where finished text adapters are published (default <home>/adapters)")
    p.add_argument("--checkpoint-dir", help="the WebUI checkpoint folder `tools bake/extract` read and write "
                   "(default <home>/Stable-diffusion)")
    p.add_argument("--gpus", help="device slots: '0,1', or 'cpu' (default: CUDA_VISIBLE_DEVICES, else nvidia-smi)")
    p.add_argument("--grace", type=float, default=60.0, help="seconds a job may take to checkpoint before a kill")
    p.add_argument("--max-attempts", type=int, default=3, help="automatic resumes per run after daemon crashes")
    p.add_argument("--curve-dir", help="folder made by `lora-daemon keys`: encrypt and authenticate with CURVE")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-file", help="write the daemon's log here, rotated at 5 MB, 3 old files kept (a detached "
                   "start uses <home>/daemon.log)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept configs with model.allow_pickle over the protocol (a pickle .ckpt can run code when "
                   "loaded: only for clients and files you trust)")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a detached daemon to answer")
    p.add_argument("--max-per-device", type=int, default=1, help="runs one device may run at once when their memory "
                   "plans fit together with a margin (2-4 on a big card; default 1)")
    p.add_argument("--device-memory-mb", help="device memory for packing runs: '80000' for every device or "
                   "'0=80000,1=24000' (default: nvidia-smi; a CPU slot has none unless given)")


# Where the engine looks for captioner weights (`lora_core.dataset.captioners.MODELS_ENV`); the daemon points it
# into its own state folder, so a daemon with --home or LORA_DAEMON_HOME does not look in the user's data folder.
CAPTIONERS_ENV = "LORA_SCRIPTS_CAPTIONERS"


def _start_foreground(args: argparse.Namespace, home: Path) -> int:
    from .server import DaemonOptions, DaemonStartError, run_daemon

    os.environ.setdefault(CAPTIONERS_ENV, str(home / "captioners"))  # children inherit it

    _setup_logging(args, home)
    options = DaemonOptions(home=home, host=args.host, port=args.port, events_port=args.events_port,
                            lora_dir=Path(args.lora_dir) if args.lora_dir else None,
                            adapters_dir=Path(args.adapters_dir) if args.adapters_dir else None, gpus=args.gpus,
                            checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
                            grace_s=args.grace, max_attempts=args.max_attempts,
                            curve_dir=Path(args.curve_dir).resolve() if args.curve_dir else None,
                            allow_pickle=args.allow_pickle, max_per_device=args.max_per_device,
                            device_memory_mb=args.device_memory_mb)
    try:
        return run_daemon(options, on_started=lambda info: print(
            f"lora-daemon listening on {info['endpoint']} (events {info['events']}), pid {info['pid']}", flush=True))
    except DaemonStartError as e:
        print(f"lora-daemon: {e}", file=sys.stderr)
        return 1


LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3


def _setup_logging(args: argparse.Namespace, home: Path) -> None:
    """stderr, or with --log-file a rotating file (owner-only: it names files and runs), so the log is bounded."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if not args.log_file:
        logging.basicConfig(level=args.log_level.upper(), format=fmt)
        return
    from logging.handlers import RotatingFileHandler

    from .home import make_private_dir, private_file

    path = Path(args.log_file).expanduser().resolve()
    make_private_dir(home)
    private_file(path)
    handler = RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])


def _start_detached(args: argparse.Namespace, home: Path) -> int:
    """Re-run ourselves with --foreground in a new session, its output in <home>/daemon.log, and wait for it."""
    from . import procs

    cmd = [sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "start", "--foreground"]
    for flag, value in (("--host", args.host), ("--port", args.port), ("--events-port", args.events_port),
                        ("--lora-dir", args.lora_dir), ("--adapters-dir", args.adapters_dir), ("--gpus", args.gpus),
                        ("--checkpoint-dir", args.checkpoint_dir),
                        ("--grace", args.grace), ("--max-attempts", args.max_attempts),
                        ("--curve-dir", args.curve_dir), ("--log-level", args.log_level),
                        ("--log-file", args.log_file or home / "daemon.log"),
                        ("--max-per-device", args.max_per_device), ("--device-memory-mb", args.device_memory_mb)):
        if value is not None:
            cmd += [flag, str(Path(value).resolve()) if flag.endswith(("-dir", "-file")) else str(value)]
    if args.allow_pickle:
        cmd.append("--allow-pickle")
    from .home import make_private_dir, private_file

    make_private_dir(home)
    # The log itself rotates (--log-file); stdout/stderr keep only what escapes logging (a crash at start-up).
    with open(private_file(home / "daemon.out"), "ab") as out_file:
        proc = procs.spawn(cmd, out_file, cwd=home, detach=True)
    client = DaemonClient(home=home, timeout=1.0, retries=0)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            from .worker import tail_lines

            print("lora-daemon did not start:\n" + "\n".join(tail_lines(home / "daemon.log", 15) +
                                                            tail_lines(home / "daemon.out", 15)), file=sys.stderr)
            return 1
        info = read_info(home)
        if info and info.get("pid") == proc.pid:
            try:
                client.ping()
                print(f"lora-daemon started: {info['endpoint']} (events {info['events']}), pid {proc.pid}")
                return 0
            except (DaemonNotRunning, DaemonError):
                pass
        time.sleep(0.1)
    print(f"lora-daemon (pid {proc.pid}) did not answer within {args.wait:g} s; see {home / 'daemon.log'}",
          file=sys.stderr)
    return 1


def _run_start(args: argparse.Namespace) -> int:
    home = resolve_home(args.home)
    try:
        _client(args).ping()
        print(f"lora-daemon is already running for {home}", file=sys.stderr)
        return 1
    except (DaemonNotRunning, DaemonError):
        pass
    return _start_foreground(args, home) if args.foreground else _start_detached(args, home)


def _add_stop(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for running jobs to checkpoint")


def _run_stop(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        reply = client.shutdown()
    except DaemonNotRunning:
        print("lora-daemon is not running")
        return 0
    if reply.get("running"):
        print(f"saving checkpoints of {', '.join(reply['running'])}…")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            client.ping()
        except DaemonNotRunning:
            print("lora-daemon stopped")
            return 0
        except DaemonError:
            pass
        time.sleep(0.2)
    print(f"lora-daemon did not stop within {args.timeout:g} s", file=sys.stderr)
    return 1


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _run_status(args: argparse.Namespace) -> int:
    status = _client(args).status()
    if args.json:
        _print_json(status)
        return 0
    print(f"lora-daemon {status['version']} up {status['uptime_s']:.0f} s, pid {status['pid']}, {status['endpoint']}")
    for gpu in status["gpus"]:
        print(f"  {gpu['slot']}: {gpu['run_id'] or 'idle'}")
    print(f"queue: {status['queue_length']} waiting, {status['running']} running; LoRAs go to {status['lora_dir']}")
    for captioner in status.get("captioners") or []:
        where = "ready" if captioner["ready"] else f"no weights in {captioner['model_dir']}"
        print(f"  captioner {captioner['name']}: {where}")
    return 0


# --- runs ---------------------------------------------------------------------------------------------------
def _read_config(path: str) -> tuple[str, str]:
    """YAML text and the folder its relative paths mean (stdin: the current folder)."""
    if path == "-":
        return sys.stdin.read(), os.getcwd()
    file = Path(path)
    try:
        return file.read_text(encoding="utf-8"), str(file.resolve().parent)
    except OSError as e:
        raise SystemExit(f"lora-daemon: cannot read {path}: {e.strerror or e}")


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file ('-' reads stdin)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first; equal priorities run in order")
    p.add_argument("--name", help="name the run and its LoRA file, <lora:NAME:w> (default: the config's "
                                  "output_name)")
    p.add_argument("--lora-dir", help="publish this run's LoRA here instead of the daemon's Lora folder")
    p.add_argument("--wait", action="store_true", help="follow the run to its end; exit 0 only if it finished")
    _add_json(p)


def _follow(client: DaemonClient, run_id: str, sub: Any, show_logs: bool) -> dict:
    """Print a run's live events until it ends; returns its final record."""
    while True:
        event = sub.next(1.0)
        if event is None:
            run = client.get(run_id)
            if run["status"] in TERMINAL:
                return run
            continue
        if event.get("run_id") != run_id:
            continue
        kind = event["type"]
        if kind == "run.log" and show_logs:
            for line in event["lines"]:
                print(line)
        elif kind == "run.progress" and not show_logs and event.get("phase"):
            print(phase_text(event))
        elif kind == "run.progress" and not show_logs:
            print(f"step {event.get('step')}/{event.get('total_steps')}  loss {_fmt_num(event.get('loss'), '.4f')}"
                  f"  {_fmt_num(event.get('it_s'), '.2f')} it/s  eta {fmt_duration(event.get('eta_s'))}")
        elif kind == "run.health" and not show_logs:
            print(f"health at step {event.get('step')}: {event.get('message')}. {event.get('advice')}")
        elif kind == "run.plan" and not show_logs:
            print(f"memory plan: {plan_text(event.get('plan') or {})}")
        elif kind in ("lora.published", "run.started", "run.requeued") and not show_logs:
            print(f"{kind}: {event.get('path') or event.get('device') or event.get('reason')}")
        if kind in TERMINAL_EVENTS:
            return client.get(run_id)


def _run_submit(args: argparse.Namespace) -> int:
    text, folder = _read_config(args.config)
    client = _client(args)
    extra = {"lora_dir": str(Path(args.lora_dir).resolve())} if args.lora_dir else {}
    sub = client.subscribe() if args.wait else None
    try:
        run = client.submit(text, priority=args.priority, name=args.name, config_dir=folder, **extra)
        if not args.wait:
            _print_json(run) if args.json else print(run["id"])
            return 0
        print(run["id"], flush=True)
        run = _follow(client, run["id"], sub, show_logs=False)
    finally:
        if sub is not None:
            sub.close()
    if args.json:
        _print_json(run)
    else:
        print(f"{run['status']}: {run.get('published_file') or run.get('error') or ''}")
    return 0 if run["status"] == "finished" else 1


def _add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file ('-' reads stdin)")
    _add_json(p)


def _run_validate(args: argparse.Namespace) -> int:
    text, folder = _read_config(args.config)
    result = _client(args).validate(text, config_dir=folder)
    if args.json:
        _print_json(result)
    else:
        print("config is valid" if result["ok"] else "\n".join(result["problems"]))
    return 0 if result["ok"] else 2


def _add_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every run, not only active, queued and recent ones")
    _add_json(p)


def _run_list(args: argparse.Namespace) -> int:
    runs = _client(args).list_runs(all=args.all)
    if args.json:
        _print_json(runs)
        return 0
    print(LIST_HEADER)
    for run in runs:
        print(_run_line(run))
    return 0


RUN_REF_HELP = "the run: its id, any part of the id only one run has (e.g. its last characters), its name, or 'last'"


def _add_run_ref(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help=RUN_REF_HELP)
    _add_json(p)


def _add_show(p: argparse.ArgumentParser) -> None:
    _add_run_ref(p)
    p.add_argument("--events", type=int, default=20, metavar="N", help="how many of the run's last stored events "
                   "to show (queued, started, checkpoints, samples, published, finished …; default 20, 0: none)")


def _event_line(event: dict) -> str:
    fields = {k: v for k, v in event.items() if k not in ("type", "time", "run_id") and v not in (None, "", [], {})}
    shown = " ".join(f"{k}={v}" for k, v in fields.items())
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.get("time") or 0))
    return f"    {when} {event.get('type')} {shown}"[:300]


def _run_show(args: argparse.Namespace) -> int:
    client = _client(args)
    run = client.get(args.run)
    events = client.run_events(run["id"], last=args.events) if args.events > 0 else []
    if args.json:
        _print_json({**run, "events": events} if args.events > 0 else run)
        return 0
    for key in ("id", "name", "kind", "status", "priority", "device", "step", "total_steps", "loss", "it_s",
                "eta_s", "attempts", "checkpoint", "output_file", "published_file", "run_dir", "error", "advice"):
        if run.get(key) not in (None, ""):
            print(f"{key:>15}: {run[key]}")
    if run.get("plan"):
        print(f"{'memory plan':>15}: {plan_text(run['plan'])}")
    if phase_text(run):
        print(f"{'now':>15}: {phase_text(run)}")
    if run.get("log_tail"):
        print("  last log lines:\n" + "\n".join("    " + line for line in run["log_tail"].splitlines()))
    if events:
        print(f"  last {len(events)} events:\n" + "\n".join(_event_line(e) for e in events))
    return 0


def _add_logs(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help=RUN_REF_HELP)
    p.add_argument("--tail", type=int, default=200, help="how many last lines")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the run ends")
    _add_json(p)


def _run_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    sub = client.subscribe(("run.log",) + TERMINAL_EVENTS) if args.follow else None
    try:
        lines = client.logs(args.run, tail=args.tail)
        if args.json and not args.follow:
            _print_json(lines)
            return 0
        for line in lines:
            print(line)
        if sub is not None:
            run = client.get(args.run)
            if run["status"] not in TERMINAL:
                _follow(client, run["id"], sub, show_logs=True)
    finally:
        if sub is not None:
            sub.close()
    return 0


def _run_action(action: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        result = getattr(_client(args), action)(args.run)
        _print_json(result) if args.json else print(f"{result['id']}: {result['status']}")
        return 0
    return run


def _add_caption(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="image folder to caption")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for `python -m lora_core.dataset.auto_label` (repeatable)")
    _add_json(p)


def _run_caption(args: argparse.Namespace) -> int:
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"lora-daemon: --option {item!r}: write KEY=VALUE")
        options[key.strip()] = value
    run = _client(args).caption(args.folder, priority=args.priority, **options)
    _print_json(run) if args.json else print(run["id"])
    return 0


def _add_recommend(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="the training images folder")
    p.add_argument("--base", help="base model (.safetensors or diffusers folder): enables the memory plan")
    p.add_argument("--kind", choices=["style", "character", "concept"], help="what the LoRA is for (character)")
    p.add_argument("--optimizer", help="the optimizer to tune the learning rate for (adamw)")
    _add_json(p)


def recommend_text(rec: dict) -> str:
    """A recommendation as lines: each setting with its reason and source, then what history changed, then notes."""
    d = rec.get("dataset") or {}
    lines = [f"{d.get('folder')}: {d.get('images')} images ({d.get('unique_images')} unique), kind {rec.get('kind')}"]
    for r in rec.get("reasons") or []:
        lines.append(f"  {r['field']:<24} {json.dumps(r['value']):<14} {r['reason']}  [{r['source']}]")
    for h in rec.get("history") or []:
        lines.append(f"  history: {h['field']} {h['from']} -> {h['to']}: {h['why']}")
    lines += [f"  note: {n}" for n in rec.get("notes") or []]
    return "\n".join(lines)


def _run_recommend(args: argparse.Namespace) -> int:
    rec = _client(args).recommend(args.folder, base_model=args.base, kind=args.kind, optimizer=args.optimizer)
    _print_json(rec) if args.json else print(recommend_text(rec))
    return 0


def _add_rate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help=RUN_REF_HELP)
    p.add_argument("rating", choices=["up", "down", "clear"], help="👍 up, 👎 down, or clear")
    _add_json(p)


def _run_rate(args: argparse.Namespace) -> int:
    run = _client(args).rate(args.run, None if args.rating == "clear" else args.rating)
    _print_json(run) if args.json else print(f"{run['id']}: rated {run.get('rating') or 'none'}")
    return 0


def _add_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to create the server and client CURVE certificates in")


def _run_keys(args: argparse.Namespace) -> int:
    from .curve import create_keys

    folder = create_keys(Path(args.dir))
    print(f"CURVE keys in {folder}; start with `lora-daemon start --host 0.0.0.0 --curve-dir {folder}` and copy "
          f"the folder plus daemon.json to the client machine")
    return 0


def _nothing(p: argparse.ArgumentParser) -> None:
    _add_json(p)


def _run_queue(args: argparse.Namespace) -> int:
    """The queue in the order the daemon will take it, and why each run waits (fair share, a limit, memory)."""
    reply = _client(args).queue()
    if args.json:
        _print_json(reply)
        return 0
    for run in reply["running"]:
        memory = f", ~{run['memory_mb']:,.0f} MB" if run.get("memory_mb") else ""
        print(f"  {run['status']:<8} on {run['device']}: {run['name']} ({run.get('user') or '-'}{memory})")
    if not reply["queue"]:
        print("queue: empty")
    for row in reply["queue"]:
        print(f"{row['position']:>3}. {row['id'] or '-':<24} {row.get('user') or '-':<12} prio {row['priority']:>3}  "
              f"{row['name']}\n       {row['why']}")
    return 0


def _run_whoami(args: argparse.Namespace) -> int:
    reply = _client(args).whoami()
    if args.json:
        _print_json(reply)
        return 0
    if not reply["shared"]:
        print(f"{reply['user'] or '(no user)'}: this daemon has no users.yaml (one person's daemon: no limits)")
    else:
        print(f"{reply['user'] or '(token holder)'}: role {reply['role']!r} — {reply['limits']}; "
              f"{reply['gpu_hours_today']:.2f} GPU-hours in the last 24 h, {reply['queued']} queued")
    return 0


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("start", "start the daemon (detached unless --foreground)", _add_start, _run_start),
    Subcommand("stop", "stop the daemon; running jobs save a checkpoint first", _add_stop, _run_stop),
    Subcommand("status", "is the daemon up, its devices and queue", _nothing, _run_status),
    Subcommand("submit", "queue a training run from a YAML config", _add_submit, _run_submit),
    Subcommand("validate", "check a config without queueing it", _add_validate, _run_validate),
    Subcommand("list", "runs: active, queued and recent (--all: every run)", _add_list, _run_list),
    Subcommand("show", "one run in detail, with its last stored events", _add_show, _run_show),
    Subcommand("logs", "a run's log (--follow to keep reading)", _add_logs, _run_logs),
    Subcommand("cancel", "cancel a run (a running one saves a checkpoint first)", _add_run_ref, _run_action("cancel")),
    Subcommand("retry", "run a failed or cancelled run again from the start", _add_run_ref, _run_action("retry")),
    Subcommand("resume", "continue a paused, failed or cancelled run from its checkpoint", _add_run_ref,
               _run_action("resume")),
    Subcommand("pause", "pause a running run: it saves a checkpoint and waits, holding its GPU, until resume",
               _add_run_ref, _run_action("pause")),
    Subcommand("queue", "the queue in the order it will run, and why each run waits", _nothing, _run_queue),
    Subcommand("whoami", "who the daemon takes you for: user, role and limits (users.yaml)", _nothing, _run_whoami),
    Subcommand("caption", "queue an auto-label job for an image folder", _add_caption, _run_caption),
    Subcommand("recommend", "recommended settings for a dataset, each with its reason (learns from rated runs)",
               _add_recommend, _run_recommend),
    Subcommand("rate", "rate a run 👍 (up) or 👎 (down); recommend learns from it", _add_rate, _run_rate),
    Subcommand("tools", "LoRA toolbox jobs: inspect, merge, bake, resize, extract", tools_cli.add_arguments,
               tools_cli.run),
    Subcommand("keys", "create CURVE keys for binding beyond this machine", _add_keys, _run_keys),
    Subcommand("ui", "serve the LoRA Training tab on 127.0.0.1 (needs gradio)", ui_standalone.add_arguments,
               ui_standalone.run),
    Subcommand("setup", "give the training engine its own venv with the WebUI's torch build", ui_setup.add_arguments,
               ui_setup.run),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-daemon", description="lora-scripts training daemon")
    home_help = "state folder (default: LORA_DAEMON_HOME or the user data folder)"
    parser.add_argument("--home", help=home_help)
    user_help = "who you are to a daemon a team shares (its users.yaml; default: your OS user name)"
    parser.add_argument("--user", help=user_help)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for sub in SUBCOMMANDS:
        p = subs.add_parser(sub.name, help=sub.help, description=sub.help)
        p.add_argument("--home", default=argparse.SUPPRESS, help=home_help)
        p.add_argument("--user", default=argparse.SUPPRESS, help=user_help)
        sub.add_arguments(p)
        p.set_defaults(handler=sub.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DaemonNotRunning as e:
        print(f"lora-daemon: {e}", file=sys.stderr)
        return 1
    except DaemonError as e:
        print(f"lora-daemon: {e.message}", file=sys.stderr)
        return 2 if e.code == "config_invalid" else 1


if __name__ == "__main__":
    raise SystemExit(main())
