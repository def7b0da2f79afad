"""One worker per device slot: take the next queued run, train it in a child process, follow it, settle its outcome.

The child is ``python -m lora_core.train`` (or ``python -m lora_core.dataset.auto_label`` for caption jobs). It writes its
JSON-lines events to ``<run_dir>/events.jsonl`` and its stdout/stderr to ``<run_dir>/train.log``; the worker tails
both, stores what matters, and republishes it as live events. Because the child talks to files, not pipes, it keeps
working if the daemon dies, and a restarted daemon can read what happened (`reconcile`).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import procs, states
from .bus import Bus
from .gpus import child_env
from .publish import (Publication, plan_adapter, plan_lora, publish_adapter, publish_lora, rollback,
                      sidecar_text)
from .queue import caption_command_args
from .store import Store

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 30
# Exit codes of `python -m lora_core.train`, mirrored from `lora_core.events` (the daemon must not import the engine
# outside config validation; tests/test_daemon_publish.py checks the two agree).
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_OOM = 4
# How a child that was asked to pause may leave: saved and stopped, gone while the daemon was down (no code), or
# ended by the stop request itself before it could install its handler (nothing trained yet)
PAUSE_EXITS = (EXIT_STOPPED, None, -15)
# What a `sample_progress` event of the engine carries: the training step, prompt i of n, denoising step j of m.
SAMPLE_PROGRESS_FIELDS = ("step", "prompt_index", "prompts", "denoise_step", "denoise_steps", "prompt")


def oom_advice() -> str:
    """For a child that exited with EXIT_OOM without saying why, or was killed by a signal (the system's OOM killer,
    perhaps): the engine's one advice text, hedged. Imported here, not at the top: `lora_core.events` is stdlib-only,
    but the daemon must start even where the engine is missing."""
    from lora_core.events import OOM_ADVICE

    return "if the system ran out of memory: " + OOM_ADVICE


@dataclass
class Settings:
    home: Path
    lora_dir: Path
    adapters_dir: Path
    grace_s: float = 60.0  # how long a child may take to save its checkpoint before it is killed
    max_attempts: int = 3  # automatic resumes after crashes of the daemon, per run
    poll_s: float = 0.02  # how often the child's event file is read: bounds event latency
    preferred_weight: float = 1.0
    requeue_oom_solo: bool = False  # runs share devices (--max-per-device > 1): an OOM runs again alone, once


@dataclass
class RunFiles:
    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def events(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"


# Terminal control sequences (colours, tqdm's cursor-up ``ESC[A``, OSC titles): meaningless in a log pane.
TERMINAL_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def readable(line: str) -> str:
    """A log line as a person reads it: terminal escapes removed, and a progress bar redrawn with carriage returns
    (``10%\r20%\r30%``) shown as its last state — children write to files, but a library may still draw bars."""
    line = TERMINAL_ESCAPES.sub("", line.rstrip("\n"))
    if "\r" in line:
        drawn = [part for part in line.split("\r") if part.strip()]
        line = drawn[-1] if drawn else ""
    return line


def tail_lines(path: Path, n: int) -> list[str]:
    """The last `n` lines of a run's log, readable (`readable`): what `logs`, the tab and failure reports show."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="\n") as fh:
            return [readable(line) for line in deque(fh, maxlen=max(n, 0))]
    except FileNotFoundError:
        return []


def read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended since `offset`; a half-written last line waits for the next call."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    text = chunk[: end + 1].decode("utf-8", errors="replace")
    # split on newlines only: a progress bar's carriage returns stay inside its line for `readable` to collapse
    return text[:-1].split("\n"), offset + end + 1


def last_end_event(path: Path) -> Optional[dict]:
    """The child's final ``end`` event in its events file, read from the start (None when it never ended)."""
    end = None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if '"end"' in line:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and event.get("type") == "end":
                        end = event
    except FileNotFoundError:
        return None
    return end


def job_command(run: dict) -> list[str]:
    files = RunFiles(Path(run["run_dir"]))
    if run["kind"] == "caption":
        job = run["config"]
        return [sys.executable, "-m", "lora_core.dataset.auto_label", f"--input={job['folder']}",
                f"--events={files.events}", *caption_command_args(job.get("options") or {})]
    if run["kind"] == "tools":  # a LoRA-toolbox job: argv was built from checked values by `tools_job`
        return [sys.executable, "-m", "lora_core.tools", *run["config"]["argv"], f"--events={files.events}",
                "--no-progress", "--json"]
    cmd = [sys.executable, "-m", "lora_core.train", "--config", str(files.config), "--events", str(files.events),
           "--no-progress"]
    if run["resume"] and any((files.output_dir / "checkpoints").glob("step-*")):
        cmd += ["--resume", "latest"]
    elif not run.get("plan"):
        cmd.append("--plan-first")  # the memory plan is the run's first phase, not a wait behind the tab's Start
    return cmd


class RunFollower:
    """Turns the child's events and log lines into store updates and live events; shared by worker and reconcile."""

    def __init__(self, store: Store, bus: Bus, run: dict):
        self.store = store
        self.bus = bus
        self.run_id = run["id"]
        self.files = RunFiles(Path(run["run_dir"]))
        self.events_offset = run.get("events_offset") or 0
        self.log_offset = run.get("log_offset") or 0
        self.end: Optional[dict] = None
        self.advice: Optional[str] = None
        self.in_phase = bool(run.get("phase"))  # a phase (e.g. sampling) is shown until the next training step

    def poll(self) -> None:
        lines, offset = read_new_lines(self.files.events, self.events_offset)
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("run %s: skipping a malformed event line: %.200s", self.run_id, line)
                continue
            if isinstance(event, dict):
                self._handle(event)
        log_lines, log_offset = read_new_lines(self.files.log, self.log_offset)
        if log_lines:
            self.bus.emit("run.log", self.run_id, lines=[readable(line) for line in log_lines])
        if offset != self.events_offset or log_offset != self.log_offset:
            self.events_offset, self.log_offset = offset, log_offset
            self.store.update_run(self.run_id, events_offset=offset, log_offset=log_offset)

    def _handle(self, event: dict) -> None:
        kind = event.get("type")
        rid = self.run_id
        if kind == "start":
            self.store.update_run(rid, total_steps=event.get("total_steps"), step=event.get("step") or 0)
        elif kind == "plan":
            plan = {k: v for k, v in event.items() if k not in ("type", "time")}
            self.store.update_run(rid, plan=plan)
            self.bus.emit("run.plan", rid, plan=plan)
        elif kind == "sample_progress":  # rendering samples: prompt i/n, denoising step j/m (no steps meanwhile)
            phase = {"phase": "sample", **{k: event.get(k) for k in SAMPLE_PROGRESS_FIELDS}}
            self.in_phase = True
            self.store.update_run(rid, phase=phase)
            self.bus.emit("run.progress", rid, phase=phase, step=event.get("step"), child_time=event.get("time"))
        elif kind == "step":
            fields = {k: event.get(k) for k in ("step", "total_steps", "loss", "lr", "it_s", "eta_s", "peak_mem_mb")}
            fields = {k: v for k, v in fields.items() if v is not None}
            if self.in_phase:
                self.in_phase = False
                fields["phase"] = None
            self.store.update_run(rid, **fields)
            fields.pop("phase", None)
            self.store.add_metric(rid, int(event.get("step") or 0), event.get("loss"), event.get("lr"),
                                  event.get("time", time.time()))
            self.bus.emit("run.progress", rid, **fields, epoch=event.get("epoch"), child_time=event.get("time"))
        elif kind in ("caption", "progress"):  # auto-label batches, toolbox steps: done of total, like steps
            fields = {"step": event.get("done"), "total_steps": event.get("total"), "it_s": event.get("it_s"),
                      "eta_s": event.get("eta_s")}
            fields = {k: v for k, v in fields.items() if v is not None}
            self.store.update_run(rid, **fields)
            self.bus.emit("run.progress", rid, **fields, child_time=event.get("time"))
        elif kind == "checkpoint":
            self.store.update_run(rid, checkpoint=event.get("path"))
            self.bus.emit("run.checkpoint", rid, step=event.get("step"), path=event.get("path"),
                          lora=event.get("lora"))
        elif kind == "sample":
            path = event.get("path")
            if isinstance(path, str) and path.lower().endswith(".png"):
                self.store.update_run(rid, preview_file=path)
            self.bus.emit("run.sample", rid, step=event.get("step"), path=path, prompt=event.get("prompt"))
        elif kind == "oom":
            self.advice = event.get("advice") or self.advice
        elif kind in ("health", "eval"):  # training health warnings and validation losses: stored, shown by `show`
            self.bus.emit(f"run.{kind}", rid, **{k: v for k, v in event.items() if k not in ("type", "time",
                                                                                              "run_id")})
        elif kind == "end":
            self.end = event
            self.advice = event.get("advice") or self.advice
            if event.get("output"):
                self.store.update_run(rid, output_file=event["output"])
            if self.in_phase:
                self.in_phase = False
                self.store.update_run(rid, phase=None)


_PLANNING = threading.Lock()  # two workers finishing at once must not choose the same free name


def _publish(store: Store, bus: Bus, settings: Settings, run: dict) -> dict:
    """Copy a finished run's result where the WebUI finds it, as a recorded step: the name is chosen once and
    stored (``publish.pending``) before any file is written, so a daemon killed at any point finishes the same
    publication on restart — never a second copy, never an orphan sidecar (see `lora_daemon.publish`)."""
    if run["kind"] in ("caption", "tools") or run.get("published_file"):  # tools write into place themselves
        return run
    cfg = run["config"]
    name = cfg["output"]["output_name"]
    targets = dict(run.get("publish") or {})
    pending = targets.pop("pending", None)
    text = run["kind"] == "text"
    output = Path(run["output_file"]) if run.get("output_file") else \
        Path(cfg["output"]["output_dir"]) / (name if text else f"{name}.safetensors")
    if pending:
        pub = Publication.from_dict(pending)
        log.info("run %s: finishing the publication of %s that a stopped daemon began", run["id"], pub.stem)
    else:
        with _PLANNING:
            folder = Path(targets.get("adapters_dir") or settings.adapters_dir) if text else \
                Path(targets.get("lora_dir") or settings.lora_dir)
            reserved = [p["stem"] for rid, p in store.pending_publications()
                        if rid != run["id"] and Path(p.get("folder", "")) == folder]
            pub = (plan_adapter if text else plan_lora)(folder, name, run["id"], reserved)
            store.update_run(run["id"], publish={**targets, "pending": pub.to_dict()})
    preview = Path(run["preview_file"]) if run.get("preview_file") and not text else None
    trigger = cfg["data"].get("trigger_word")
    weight = float(targets.get("preferred_weight") or settings.preferred_weight)
    try:
        if text:
            done = publish_adapter(output, pub)
        else:
            done = publish_lora(output, pub, trigger_words=trigger, preferred_weight=weight, preview=preview,
                                base_model=cfg["model"].get("base_model"))
    except Exception:
        sources: dict = {pub.folder / pub.stem: output} if text else {
            pub.folder / f"{pub.stem}.safetensors": output, pub.folder / f"{pub.stem}.json":
            sidecar_text(output, trigger, weight, cfg["model"].get("base_model")), **({pub.folder / f"{pub.stem}.png": preview} if preview else {})}
        rollback(pub, sources)
        store.update_run(run["id"], publish=targets)
        raise
    store.update_run(run["id"], published_file=str(done.path), publish=targets)
    bus.emit("lora.published", run["id"], path=str(done.path), name=done.path.name.rsplit(".safetensors", 1)[0],
             kind=run["kind"], sidecar=str(done.sidecar) if done.sidecar else None,
             preview=str(done.preview) if done.preview else None)
    return store.get_run(run["id"])


def settle(store: Store, bus: Bus, settings: Settings, run_id: str, follower: RunFollower,
           exit_code: Optional[int], daemon_stopping: bool) -> dict:
    """Decide what a run's child leaving means: finished, cancelled, back in the queue, or failed (with why)."""
    follower.poll()
    run = store.get_run(run_id)
    end = follower.end or {}
    now = time.time()
    finished = end.get("status") == "finished" or (run["kind"] == "caption" and exit_code == 0)
    common = {"pid": None, "pid_create_time": None, "exit_code": exit_code}
    if finished:
        try:
            run = _publish(store, bus, settings, run)
        except Exception as e:  # a full disk or a vanished file: the run must still end in a state, with the reason
            log.exception("run %s: publishing failed", run_id)
            run = store.transition(run_id, states.FAILED, finished_at=now, error=f"publish failed: {e}", **common)
            bus.emit("run.failed", run_id, error=run["error"])
            return run
        run = store.transition(run_id, states.FINISHED, finished_at=now, error=None, **common)
        bus.emit("run.finished", run_id, output=run.get("output_file"), published=run.get("published_file"),
                 step=run.get("step"))
        return run
    if run["status"] == states.CANCELLING:
        run = store.transition(run_id, states.CANCELLED, finished_at=now, **common)
        bus.emit("run.cancelled", run_id, checkpoint=run.get("checkpoint"), step=run.get("step"))
        return run
    if run["status"] == states.PAUSING and (end.get("status") == "stopped" or exit_code in PAUSE_EXITS):
        # the pause asked for: checkpoint written (or the child died before its first one: it starts over), the
        # run waits holding its device until `resume`; a daemon stopping meanwhile changes nothing about that.
        # A child still importing torch has no signal handler yet: our stop request ends it (-SIGTERM) with
        # nothing trained, so that too is a pause, not a failure.
        run = store.transition(run_id, states.PAUSED, paused_at=now, resume=1, **common)
        bus.emit("run.paused", run_id, reason=run.get("pause_reason"), checkpoint=run.get("checkpoint"),
                 step=run.get("step"), device=run.get("device"))
        return run
    if settings.requeue_oom_solo and run["status"] == states.RUNNING and not run.get("solo") and \
            (exit_code == EXIT_OOM or end.get("status") == "oom") and store.shared_device(run):
        # out of memory on a device it may have shared: the plans were estimates; it runs again with the card to
        # itself (from its checkpoint, if any), and fails as usual if it runs out of memory alone too
        run = store.transition(run_id, states.QUEUED, resume=1, solo=1, **common)
        bus.emit("run.requeued", run_id, reason="out of memory beside other runs; it runs again alone",
                 checkpoint=run.get("checkpoint"), solo=True)
        return run
    if daemon_stopping:
        run = store.transition(run_id, states.QUEUED, resume=1, **common)
        bus.emit("run.requeued", run_id, reason="daemon stopped", checkpoint=run.get("checkpoint"))
        return run
    tail = tail_lines(follower.files.log, LOG_TAIL_LINES)
    if end.get("error"):
        error = str(end["error"])
    elif exit_code == EXIT_STOPPED:
        error = "stopped by a signal from outside the daemon after saving a checkpoint; `lora-daemon resume` continues it"
    elif exit_code == EXIT_CONFIG:
        error = "the engine refused the config"
    elif exit_code is not None and exit_code < 0:
        error = f"the training process was killed by signal {-exit_code}"
    else:
        error = f"the training process exited with code {exit_code}"
    if tail:
        error += " — last log line: " + tail[-1]
    advice = follower.advice or (oom_advice() if exit_code == EXIT_OOM or (exit_code or 0) < 0 else None)
    run = store.transition(run_id, states.FAILED, finished_at=now, error=error, advice=advice,
                           log_tail="\n".join(tail), **common)
    bus.emit("run.failed", run_id, error=error, advice=advice, log_tail=tail, exit_code=exit_code)
    return run


class Worker(threading.Thread):
    """Runs one job at a time on one device slot until the daemon stops."""

    def __init__(self, slot: str, store: Store, bus: Bus, settings: Settings, wake: threading.Event,
                 stopping: threading.Event, device: Optional[object] = None, role_of: Optional[object] = None,
                 index: int = 0):
        """`device` (a `fair.Device`): claim only what fits beside the device's other runs — several workers
        share a slot when the daemon packs runs (--max-per-device); `role_of` gives users' roles (users.yaml)."""
        super().__init__(name=f"worker-{slot}" + (f"-{index}" if index else ""), daemon=True)
        self.slot = slot
        self.device = device
        self.role_of = role_of
        self.store = store
        self.bus = bus
        self.settings = settings
        self.wake = wake
        self.stopping = stopping
        self.current: Optional[str] = None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                run = self.store.claim_next(self.device or self.slot, self.role_of)
            except Exception:
                log.exception("worker %s: could not read the queue", self.slot)
                run = None
            if run is None:
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            self.current = run["id"]
            try:
                self.execute(run)
            except Exception as e:  # our own bug must not kill the worker or leave the run 'running' forever
                log.exception("worker %s: run %s crashed the worker", self.slot, run["id"])
                self._fail_unexpectedly(run["id"], e)
            finally:
                self.current = None
        self.store.close()

    def _fail_unexpectedly(self, run_id: str, error: Exception) -> None:
        try:
            current = self.store.get_run(run_id)["status"]
            if current in states.ACTIVE:
                self.store.transition(run_id, states.FAILED, finished_at=time.time(),
                                      error=f"daemon error while running: {error}")
                self.bus.emit("run.failed", run_id, error=str(error))
        except Exception:
            log.exception("run %s: could not record the failure", run_id)

    def execute(self, run: dict) -> dict:
        files = RunFiles(Path(run["run_dir"]))
        files.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = job_command(run)
        with open(files.log, "ab") as log_file:
            proc = procs.spawn(cmd, log_file, env=child_env(self.slot), cwd=files.run_dir)
        started = procs.create_time(proc.pid)
        self.store.update_run(run["id"], pid=proc.pid, pid_create_time=started)
        self.bus.emit("run.started", run["id"], device=self.slot, pid=proc.pid, attempt=run["attempts"],
                      resumed=bool(run["resume"]), name=run["name"], kind=run["kind"])
        log.info("run %s started on %s (pid %d): %s", run["id"], self.slot, proc.pid, " ".join(cmd))
        follower = RunFollower(self.store, self.bus, self.store.get_run(run["id"]))
        stop_sent: Optional[float] = None
        next_check = 0.0
        while proc.poll() is None:
            follower.poll()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.25
                wants_stop = self.stopping.is_set() or \
                    self.store.get_run(run["id"])["status"] in (states.CANCELLING, states.PAUSING)
                if wants_stop and stop_sent is None:
                    procs.request_stop(proc.pid)
                    stop_sent = now
                elif stop_sent is not None and now - stop_sent > self.settings.grace_s:
                    log.warning("run %s: no checkpoint after %.0f s; killing pid %d", run["id"],
                                self.settings.grace_s, proc.pid)
                    procs.kill(proc.pid)
            time.sleep(self.settings.poll_s)
        return settle(self.store, self.bus, self.settings, run["id"], follower, proc.returncode,
                      daemon_stopping=self.stopping.is_set())


def prepare_retry(store: Store, run: dict, resume: bool) -> dict:
    """Put a failed or cancelled run back in the queue: from its last checkpoint, or from scratch.

    Starting over moves the old output folder aside (``output.prev-N``) instead of deleting it.
    """
    files = RunFiles(Path(run["run_dir"]))
    if not resume and files.output_dir.exists():
        aside = files.run_dir / f"output.prev-{run['attempts'] or 0}"
        if aside.exists():
            shutil.rmtree(aside)
        files.output_dir.rename(aside)
    return store.transition(run["id"], states.QUEUED, expect=(states.FAILED, states.CANCELLED),
                            resume=int(resume), attempts=0, error=None, advice=None, log_tail=None,
                            finished_at=None, exit_code=None, checkpoint=run["checkpoint"] if resume else None)


def reconcile(store: Store, bus: Bus, settings: Settings) -> list[dict]:
    """On start: settle every run a dead daemon left running, so no run stays 'running' with nobody watching it.

    A child that outlived its daemon is asked to save and stop (and killed after the grace period); then whatever it
    wrote decides: finished → published; cancel requested → cancelled; otherwise back in the queue to resume from its
    last checkpoint, at most `max_attempts` times, else failed with the reason.
    """
    settled = []
    for run in store.runs_in(states.ACTIVE):
        pid, started = run.get("pid"), run.get("pid_create_time")
        if procs.same_process(pid, started):
            log.info("run %s: its child (pid %d) outlived the daemon; asking it to save and stop", run["id"], pid)
            procs.request_stop(pid)
            if not procs.wait_gone(pid, started, settings.grace_s):
                procs.kill(pid)
                procs.wait_gone(pid, started, 10)
        follower = RunFollower(store, bus, run)
        follower.poll()
        if follower.end is None:  # read by the dead daemon already (it may have died publishing): look again,
            end = last_end_event(follower.files.events)  # counting only an end written by this attempt's child
            if end and float(end.get("time") or 0) >= float(run.get("started_at") or 0):
                follower.end = end
        end = follower.end or {}
        if end.get("status") == "finished" or run["status"] in (states.CANCELLING, states.PAUSING):
            settled.append(settle(store, bus, settings, run["id"], follower, None, daemon_stopping=False))
        elif (run["attempts"] or 0) < settings.max_attempts:
            store.transition(run["id"], states.QUEUED, resume=1, pid=None, pid_create_time=None)
            bus.emit("run.requeued", run["id"], reason="the daemon stopped while this run trained",
                     checkpoint=store.get_run(run["id"])["checkpoint"])
            settled.append(store.get_run(run["id"]))
        else:
            error = (f"the daemon stopped while this run trained, {run['attempts']} times; not resuming again "
                     f"(`lora-daemon resume {run['id']}` to try anyway)")
            settled.append(store.transition(run["id"], states.FAILED, finished_at=time.time(), error=error,
                                            pid=None, pid_create_time=None))
            bus.emit("run.failed", run["id"], error=error)
    return settled
