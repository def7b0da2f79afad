"""Train and generate on one GPU: the WebUI and the daemon hand the card to each other.

Two jobs, one module, because they are one policy:

* **Free the WebUI's VRAM** when the daemon starts a run on the GPU the WebUI uses: the WebUI's checkpoint leaves
  the card in the WebUI process itself, under the generation lock (so never in the middle of a generation). A1111
  moves it to RAM (``modules.sd_models.unload_model_weights``) and moves it back by itself at the next generation
  (``process_images`` calls ``reload_model_weights``); Forge unloads with ``memory_management.unload_all_models``
  and loads on demand at the next generation. So the reload is lazy, as after a restart; `GpuHandoff.reload_now`
  brings it back at once when the user asks.
* **Generate while training**: a generation starting (the AlwaysVisible script's ``process`` hook, which A1111 and
  Forge call inside the generation lock) asks the daemon to pause the run on that GPU and waits (bounded) until it
  is paused — the run writes a checkpoint and its child exits, so all of its VRAM is free — and once the WebUI has
  been idle for ``lora_scripts_resume_idle_s`` seconds the run is resumed (after the WebUI's model is moved off the
  card again). "queue generations until the run ends" makes the generation wait instead; "never pause" does nothing.

The calls into A1111/Forge are isolated in the `Host` classes below, chosen by what is importable. This module
imports neither torch nor the engine: only the WebUI's ``modules`` (lazily) and the daemon client.
"""
from __future__ import annotations

import html
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

# Settings → LoRA Training (values as the WebUI stores them)
HANDOFF_KEY = "lora_scripts_gpu_handoff"
FREE, ASK, NEVER = "free the WebUI's VRAM", "ask", "never"
HANDOFF_CHOICES = (FREE, ASK, NEVER)
GENERATE_KEY = "lora_scripts_generate_while_training"
PAUSE, QUEUE, NO_PAUSE = "pause the run", "queue generations until the run ends", "never pause"
GENERATE_CHOICES = (PAUSE, QUEUE, NO_PAUSE)
IDLE_KEY = "lora_scripts_resume_idle_s"
DEFAULT_IDLE_S = 30.0
PAUSE_WAIT_S = 180.0  # a generation waits at most this long for the run to save and leave the card
GENERATION_REASON = "generation"
ACTIVE = ("running", "pausing")


# --- the WebUI's side: one class per WebUI -------------------------------------------------------------------
class Host:
    """What the hand-off needs from a WebUI: its generation lock, and moving its checkpoint off/onto the GPU."""

    name = "none"

    @contextmanager
    def generation_lock(self) -> Iterator[None]:
        """A1111 and Forge serialise generations with ``modules.call_queue.queue_lock`` (held for the whole job)."""
        from modules import call_queue

        with call_queue.queue_lock:
            yield

    def unload(self) -> None:
        raise NotImplementedError

    def reload(self) -> None:
        raise NotImplementedError


class A1111Host(Host):
    """AUTOMATIC1111: the checkpoint goes to RAM and comes back on the next generation (or `reload`)."""

    name = "a1111"

    def unload(self) -> None:
        from modules import sd_models

        data = getattr(sd_models, "model_data", None)
        if data is not None and getattr(data, "sd_model", "unknown") is None:
            return  # nothing loaded yet: unload_model_weights would read shared.sd_model, which loads it first
        sd_models.unload_model_weights()

    def reload(self) -> None:
        from modules import sd_models

        sd_models.reload_model_weights()


class ForgeHost(Host):
    """Forge: its model manager unloads every model from the GPU and loads them again when a generation needs
    them (``backend.memory_management`` in current Forge, ``ldm_patched.modules.model_management`` in early ones)."""

    name = "forge"

    def __init__(self, memory_management: Any):
        self.mm = memory_management

    def unload(self) -> None:
        self.mm.unload_all_models()
        empty = getattr(self.mm, "soft_empty_cache", None)
        if callable(empty):
            empty()

    def reload(self) -> None:
        """Forge loads on demand at the next generation; there is nothing to call that would not load for nothing."""


def detect_host() -> Optional[Host]:
    """The WebUI this process is, by what imports: Forge's model manager first (Forge also has sd_models, whose
    unload is a no-op there), then A1111's ``sd_models``; None outside a WebUI."""
    for name in ("backend.memory_management", "ldm_patched.modules.model_management"):
        try:
            module = __import__(name, fromlist=["unload_all_models"])
        except ImportError:
            continue
        if hasattr(module, "unload_all_models"):
            return ForgeHost(module)
    try:
        from modules import sd_models
    except ImportError:
        return None
    if hasattr(sd_models, "unload_model_weights") and hasattr(sd_models, "reload_model_weights"):
        return A1111Host()
    return None


def webui_slot() -> str:
    """The daemon slot (``CUDA_VISIBLE_DEVICES`` id, or ``cpu``) of the GPU this WebUI generates on: its
    ``--device-id``, else 0; ``--use-cpu all`` means the WebUI uses no GPU at all."""
    try:
        from modules import shared
    except ImportError:
        return "0"
    opts = shared.cmd_opts
    use_cpu = getattr(opts, "use_cpu", None) or []
    if "all" in use_cpu:
        return "cpu"
    device_id = getattr(opts, "device_id", None)
    return str(device_id) if device_id not in (None, "") else "0"


def webui_vram_mb() -> Optional[float]:
    """What the WebUI holds on its GPU now (torch's allocated bytes in this process), which "free the WebUI's VRAM"
    gives back when the run starts: the run's memory plan counts it as free (``training.webui_vram_mb``). Read
    from the torch the WebUI already imported, never imported here; None without CUDA or another setting."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or read_settings().handoff != FREE or webui_slot() == "cpu":
        return None
    try:
        if not torch.cuda.is_available():
            return None
        allocated = torch.cuda.memory_allocated() / 2**20
    except Exception:  # a WebUI on another backend (DirectML, MPS): nothing to count
        return None
    return round(allocated, 1) if allocated > 0 else None


@dataclass
class HandoffSettings:
    handoff: str = FREE
    generate: str = PAUSE
    idle_s: float = DEFAULT_IDLE_S


def read_settings() -> HandoffSettings:
    """The three settings as saved in the WebUI's config (defaults before the user changed any)."""
    try:
        from modules import shared
    except ImportError:
        return HandoffSettings()
    data = getattr(shared.opts, "data", {}) or {}
    handoff = data.get(HANDOFF_KEY, FREE)
    generate = data.get(GENERATE_KEY, PAUSE)
    try:
        idle = max(0.0, float(data.get(IDLE_KEY, DEFAULT_IDLE_S)))
    except (TypeError, ValueError):
        idle = DEFAULT_IDLE_S
    return HandoffSettings(handoff if handoff in HANDOFF_CHOICES else FREE,
                           generate if generate in GENERATE_CHOICES else PAUSE, idle)


def register_settings(shared: Any, section: tuple) -> None:
    """Add the three settings to the WebUI's Settings → LoRA Training section."""
    import gradio as gr

    options = {
        HANDOFF_KEY: shared.OptionInfo(FREE, "When a training run starts on the GPU this WebUI uses", gr.Radio,
                                       {"choices": list(HANDOFF_CHOICES)}),
        GENERATE_KEY: shared.OptionInfo(PAUSE, "When you press Generate while a run trains on that GPU", gr.Radio,
                                        {"choices": list(GENERATE_CHOICES)}),
        IDLE_KEY: shared.OptionInfo(DEFAULT_IDLE_S, "Resume a run paused for generation after the WebUI has been "
                                                    "idle this many seconds", gr.Slider,
                                    {"minimum": 0, "maximum": 600, "step": 1}),
    }
    for key, info in options.items():
        info.section = section
        shared.opts.add_option(key, info)


# --- the policy -------------------------------------------------------------------------------------------------
class GpuHandoff:
    """Follows the daemon's run events and the WebUI's generations, and moves the card between them.

    One instance per WebUI process (`lora_daemon.ui.webui.Runtime` owns it); its event thread starts in
    ``app_started`` and stops in ``unloaded``, like the Lora-folder watcher.
    """

    def __init__(self, client: Callable[..., Any], host: Optional[Host] = None,
                 settings: Callable[[], HandoffSettings] = read_settings, slot: Callable[[], str] = webui_slot):
        self.client = client
        self.host = host
        self.settings = settings
        self.slot = slot
        self.freed = False  # the WebUI's checkpoint is off the card because of us
        self.asked: Optional[str] = None  # "ask": the run waiting for the user's answer
        self.asked_name: Optional[str] = None  # ... and its name, for the question
        self.kept: set[str] = set()  # runs the user answered "Keep" for: not asked again
        self.paused: set[str] = set()  # runs we paused for a generation, to resume after idling
        self.generating = 0
        self._lock = threading.RLock()
        self._idle_timer: Optional[threading.Timer] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the WebUI's model --------------------------------------------------------------------------------------
    def free_now(self) -> bool:
        """Move the WebUI's checkpoint off the GPU, under the generation lock; False outside a known WebUI."""
        if self.host is None:
            return False
        with self.host.generation_lock():
            self._unload_locked()
        return True

    def _unload_locked(self) -> None:
        log.info("lora-scripts: moving the WebUI's model off the GPU for training (%s)", self.host.name)
        self.host.unload()
        self.freed, self.asked, self.asked_name = True, None, None

    def keep(self) -> None:
        """The user answered "Keep": the WebUI's model stays on the card for this run (it is not asked again)."""
        with self._lock:
            if self.asked:
                self.kept.add(self.asked)
            self.asked, self.asked_name = None, None

    def answer(self, action: str) -> dict:
        """The tab's buttons (REST ``POST handoff/{action}``): "free" or "keep" answer the question, "reload"
        brings the WebUI's model back now; returns the new `view`."""
        if action == "free":
            if not self.free_now():
                raise ValueError("free: no WebUI model to move here (not inside A1111/Forge)")
        elif action == "keep":
            self.keep()
        elif action == "reload":
            if not self.reload_now():
                raise ValueError("reload: no WebUI model to reload here (not inside A1111/Forge)")
        else:
            raise ValueError(f"action: one of free, keep, reload, got {action!r}")
        return self.view()

    def view(self) -> dict:
        """What the tab shows (the live poll carries it): the three settings, the question if one is open, where
        the WebUI's model is, and the same as HTML (`question_html`, `setting_html`)."""
        s = self.settings()
        view = {"setting": s.handoff, "generate": s.generate, "idle_s": s.idle_s, "asked": self.asked,
                "asked_name": self.asked_name, "freed": self.freed, "host": self.host.name if self.host else None,
                "paused": sorted(self.paused)}
        view["question_html"] = question_html(view)
        view["setting_html"] = setting_html(view)
        return view

    def reload_now(self) -> bool:
        """Bring the WebUI's checkpoint back at once (the user asked; otherwise the next generation does it)."""
        if self.host is None:
            return False
        with self.host.generation_lock():
            self.host.reload()
            self.freed = False
        return True

    # -- daemon events ------------------------------------------------------------------------------------------
    def on_event(self, event: dict) -> None:
        """A daemon event: a run starting on our GPU frees the WebUI's VRAM (or asks); the queue running empty
        lets the WebUI reload lazily."""
        kind = event.get("type")
        training = event.get("kind") not in ("caption", "tools")
        if kind == "run.started" and training and str(event.get("device")) == self.slot():
            mode = self.settings().handoff
            if mode == FREE and not self.freed and self.host is not None and not self.generating:
                self.free_now()
            elif mode == ASK and not self.freed and self.host is not None and event.get("run_id") not in self.kept:
                self.asked, self.asked_name = event.get("run_id"), event.get("name") or event.get("run_id")
        elif kind in ("run.finished", "run.failed", "run.cancelled", "run.paused"):
            if self.asked == event.get("run_id"):  # the run left the card: nothing to answer any more
                self.asked, self.asked_name = None, None
            if kind == "run.paused":
                return
            self.paused.discard(event.get("run_id"))
            self.kept.discard(event.get("run_id"))
            if self.freed and not self._runs_on_slot(("running", "pausing", "paused", "queued")):
                self.freed = False  # nothing left to train: the next generation loads the model as after a start
                log.info("lora-scripts: the training queue is empty; the WebUI reloads its model when needed")

    def _runs_on_slot(self, statuses: tuple[str, ...]) -> list[dict]:
        slot = self.slot()
        runs = self.client().list_runs()
        return [r for r in runs if r["status"] in statuses and r["kind"] not in ("caption", "tools")
                and (r["status"] == "queued" or str(r.get("device")) == slot)]

    def start(self) -> None:
        """Follow the daemon's events in a thread (reconnecting while the daemon is down)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow, name="lora-scripts-handoff", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._cancel_idle_timer()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _follow(self) -> None:
        from ..client import DaemonError, DaemonNotRunning

        while not self._stop.is_set():
            try:
                sub = self.client().subscribe(("run.",))
            except (DaemonNotRunning, DaemonError, OSError):
                self._stop.wait(2.0)
                continue
            try:
                self._catch_up()
                while not self._stop.is_set():
                    event = sub.next(0.5)
                    if event is not None:
                        try:
                            self.on_event(event)
                        except Exception:  # a daemon gone mid-call, a WebUI call failing: keep following
                            log.exception("lora-scripts: GPU hand-off could not handle %s", event.get("type"))
            finally:
                sub.close()

    def _catch_up(self) -> None:
        """A run already training when the WebUI (re)connects counts as one starting now: subscribing only sees
        what happens from here on."""
        from ..client import DaemonError, DaemonNotRunning

        try:
            running = self._runs_on_slot(("running",))
        except (DaemonNotRunning, DaemonError):
            return
        for run in running:
            self.on_event({"type": "run.started", "run_id": run["id"], "device": run.get("device"),
                           "kind": run["kind"], "name": run.get("name")})

    # -- generations ----------------------------------------------------------------------------------------------
    def before_generation(self, interrupted: Callable[[], bool] = lambda: False) -> list[str]:
        """Called inside the generation lock as a generation starts. "pause the run": pause the runs training on our
        GPU and wait until they are paused; "queue generations…": wait until no run trains there; returns the ids
        of the runs paused (waited for)."""
        from ..client import DaemonError, DaemonNotRunning

        with self._lock:
            self.generating += 1
            self._cancel_idle_timer()
        mode = self.settings().generate
        if mode == NO_PAUSE:
            return []
        try:
            active = self._runs_on_slot(ACTIVE)
        except (DaemonNotRunning, DaemonError):
            return []
        if not active:
            return []
        ids = [r["id"] for r in active]
        if mode == QUEUE:
            log.info("lora-scripts: this generation waits until %s ends", ", ".join(ids))
            self._wait(lambda: not self._runs_on_slot(ACTIVE + ("paused",)), None, interrupted)
            return ids
        client = self.client()
        for run_id in ids:
            try:
                client.pause(run_id, reason=GENERATION_REASON)
                with self._lock:
                    self.paused.add(run_id)
            except DaemonError as e:  # it ended meanwhile
                log.info("lora-scripts: run %s not paused: %s", run_id, e)
        self._wait(lambda: all(client.get(i)["status"] not in ACTIVE for i in ids), PAUSE_WAIT_S, interrupted)
        self.freed = False  # the WebUI loads its model back for this generation
        return ids

    def _wait(self, done: Callable[[], bool], limit: Optional[float], interrupted: Callable[[], bool]) -> None:
        deadline = None if limit is None else time.monotonic() + limit
        while not done():
            if interrupted() or (deadline is not None and time.monotonic() > deadline):
                log.warning("lora-scripts: generating before the run left the GPU (it may run out of memory)")
                return
            time.sleep(0.2)

    def after_generation(self) -> None:
        """Called when a generation ends: once the WebUI has been idle for the set time, resume what we paused."""
        with self._lock:
            self.generating = max(0, self.generating - 1)
            if self.generating or not self.paused:
                return
            self._cancel_idle_timer()
            self._idle_timer = threading.Timer(self.settings().idle_s, self._resume_if_idle)
            self._idle_timer.daemon = True
            self._idle_timer.name = "lora-scripts-resume"
            self._idle_timer.start()

    def _cancel_idle_timer(self) -> None:
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

    def _resume_if_idle(self) -> None:
        """The WebUI stayed idle: its model leaves the card again (setting "free"), then the paused runs go on."""
        from ..client import DaemonError, DaemonNotRunning

        with self._lock:
            if self.generating or not self.paused:
                return
            ids, self.paused = sorted(self.paused), set()
        if self.host is not None and self.settings().handoff == FREE:
            with self.host.generation_lock():  # a generation that started meanwhile finishes first
                self._unload_locked()
        for run_id in ids:
            try:
                self.client().resume(run_id)
                log.info("lora-scripts: the WebUI is idle; run %s resumes", run_id)
            except (DaemonNotRunning, DaemonError) as e:
                log.warning("lora-scripts: could not resume run %s: %s", run_id, e)


def pause_text(run: dict) -> str:
    """How the tab and the Runs view name a paused run: "paused for generation" (the daemon stores why)."""
    status = run.get("status")
    if status not in ("pausing", "paused"):
        return str(status)
    return f"{status} for {run.get('pause_reason') or 'user'}"


def question_html(view: dict) -> str:
    """The "ask" setting's question while a run waits for an answer; the buttons are wired by the tab's script
    (``javascript/lora_scripts.js``: ``POST handoff/free`` or ``handoff/keep``)."""
    if not view.get("asked"):
        return ""
    name = html.escape(str(view.get("asked_name") or view["asked"]))
    run_id = html.escape(str(view["asked"]))
    return (f'<div id="lora_scripts_handoff_question" class="lora-scripts-msg lora-scripts-info" '
            f'data-run-id="{run_id}">Run {name} wants the GPU: free the WebUI\'s VRAM now? '
            '<button class="lora-scripts-handoff lora-scripts-action" data-handoff="free">Free</button> '
            '<button class="lora-scripts-handoff lora-scripts-action" data-handoff="keep">Keep</button></div>')


def setting_html(view: dict) -> str:
    """The Daemon section's line on the hand-off: the setting (it lives in Settings → LoRA Training) and where the
    WebUI's model is now."""
    where = ("off the GPU (moved off for training; it comes back at the next generation, or with the button "
             "below)" if view.get("freed") else "where the WebUI keeps it")
    return (f'<div id="lora_scripts_handoff_setting" data-setting="{html.escape(str(view.get("setting")))}" '
            f'data-freed="{str(bool(view.get("freed"))).lower()}">GPU hand-off (Settings → LoRA Training): when a '
            f'run starts on the WebUI\'s GPU: <b>{html.escape(str(view.get("setting")))}</b>; when you press '
            f'Generate while it trains: <b>{html.escape(str(view.get("generate")))}</b> (resume after '
            f'{float(view.get("idle_s") or 0):g} s idle). The WebUI\'s model is {where}.</div>')
