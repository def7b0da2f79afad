"""The one training loop, for image and text LoRAs alike: prepare → (resume) → optimizer steps → checkpoints → export.

`train` only loops; `TrainingRun` holds one attempt's state (declared in its ``__init__``) and its phases, each a named
method: `prepare` (accelerator, task, optimizer, LR schedule, resume, announce), `optimizer_step` (one group of
micro-batches, the NaN guard, periodic saves and samples, stop = save), `end_epoch` and `finish`. Every step is
reported from one place (`StepReporter`): the JSON-lines events, TensorBoard, and the caller's progress callback —
the loop draws no progress bar itself; the CLI (`lora_core.train`) renders one. A stop request (signal) is honoured
between optimizer steps: checkpoint + current LoRA, then status "stopped". CUDA out-of-memory never escapes as a
traceback: the loop saves the last completed step and reports "oom" with what to change.

No per-step host sync: the loss stays on the device and is read every ``training.log_every_n_steps`` steps (and
before anything that is reported after a step: a save, a validation, a sample, a stop, the end of an epoch or of the
run) — see `TrainingRun.flush_logs`, the one place logged values become Python floats.
"""
from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from .checkpoint import (Position, capture_rng, latest_checkpoint, load_checkpoint, restore_training_state,
                         save_checkpoint)
from .config import TrainConfig, save_resolved_config
from .errors import InputError
from .events import OOM_ADVICE, EventWriter
from .health import HealthMonitor, HealthWarning, image_hashes
from .optimizers import evaluation_weights
from .task import TrainingTask

log = logging.getLogger(__name__)

__all__ = ["OOM_ADVICE", "StopFlag", "TrainResult", "TrainingRun", "train", "make_task", "make_accelerator",
           "make_optimizer", "make_lr_scheduler", "ProgressCallback"]

MAX_BAD_STEPS = 3
DIVERGED = f"the loss was not a finite number for {MAX_BAD_STEPS} steps in a row (training diverged)"
DIVERGED_ADVICE = ("lower training.learning_rate, use training.mixed_precision bf16 instead of fp16, or resume from "
                   "an earlier checkpoint")
FAULT_OOM_ENV = "LORA_CORE_FAULT_OOM"

ProgressCallback = Callable[[str, dict], None]
"""What a front end (the CLI's bar) is told, on the main process only, as ``(kind, fields)``:
``("cache", {what, done, total})`` for every cached item, ``("start", {step, total_steps})`` once before the first
step, ``("step", {step, total_steps, epoch, loss, lr, it_s, eta_s, peak_mem_mb})`` after every optimizer step and
``("close", {})`` when the attempt ends. It must not raise."""


class StopFlag:
    """Set from a signal handler (or another thread): the loop saves and stops after the current step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass
class TrainResult:
    status: str  # finished | stopped | oom | failed
    output: Optional[Path]
    step: int
    epoch: int
    total_steps: int
    checkpoint: Optional[Path] = None
    error: Optional[str] = None
    advice: Optional[str] = None
    losses: list[float] = field(default_factory=list)
    peak_mem_mb: float = 0.0


@dataclass
class PendingStep:
    """A finished optimizer step not reported yet: its loss (and gradient norm) may still be device tensors —
    reading them would make the host wait for the GPU; the rest was known on the host when the step ended."""

    step: int
    epoch: int
    loss: Any  # a 0-d tensor (on the device) or, once read, a float
    lr: float
    peak_mb: float
    at: float  # time.perf_counter() when the step ended: the rate is the steps' own, not the reading's
    guarded: bool  # its loss was read before the update (the non-finite guard already judged it)
    grad_norm: Any = None  # a tensor or None, read by the health monitor at its own checks


GPU_LOG_EVERY = 10


def log_interval(cfg: TrainConfig, device: torch.device) -> int:
    """How often the loss is read (``training.log_every_n_steps``): empty = every step on a CPU, where the read
    costs nothing, and every `GPU_LOG_EVERY` steps on a GPU, where each read waits for the queued kernels."""
    every = cfg.training.log_every_n_steps
    return every if every else (GPU_LOG_EVERY if device.type == "cuda" else 1)


def make_task(cfg: TrainConfig, progress: Optional[Callable[[str, int, int], None]] = None) -> TrainingTask:
    if cfg.is_text:
        from .text.task import TextTask

        return TextTask(cfg)
    from .image.flux import is_flux_config

    if is_flux_config(cfg):  # the FLUX.1 family (model_family flux, or a FLUX model picked with auto)
        from .image.flux_task import FluxTask

        return FluxTask(cfg, progress=progress)
    from .image.task import ImageTask

    return ImageTask(cfg, progress=progress)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = cfg.training.device
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"training.device: {device!r} was asked for but no CUDA device is available")
    if cpu and cfg.training.mixed_precision == "fp16":
        raise InputError("training.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    # accelerate keeps one AcceleratorState per process and refuses another mixed_precision in it; a process that
    # trains more than once (run_training from Python, OOM step-down, tests) starts each run from a clean state.
    # The distributed PartialState (process group) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision, cpu=cpu,
                              # text-encoder LoRA in a layer whose output is unused (SDXL and clip_skip > 1 condition
                              # on the penultimate layer) gets no gradient; DDP must be told, or it waits forever
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=cfg.model.train_text_encoder)])
    from .speed import apply_backend, resolve

    apply_backend(resolve(cfg, accelerator.device))  # refuses CUDA-only settings on a CPU, by field name
    return accelerator


def make_optimizer(cfg: TrainConfig, groups: list[dict]):
    """The optimizer for the task's parameter groups: the one place an optimizer type is chosen."""
    t = cfg.training
    if t.optimizer not in ("adamw", "adamw8bit"):  # prodigy, adafactor, lion, schedule-free, came: their table
        from .optimizers import make_optimizer as make_listed

        return make_listed(cfg, groups)
    if t.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise InputError("training.optimizer: adamw8bit needs bitsandbytes and a CUDA GPU; use adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InputError("training.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None

        return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    from .speed import resolve

    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    fused = resolve(cfg, device).fused_optimizer  # one kernel for every LoRA tensor (training.fused_optimizer)
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay, **({"fused": True} if fused
                                                                                          else {}))


def make_lr_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    t = cfg.training
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                         num_training_steps=total_steps)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # Windows has no resource module
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


@dataclass(frozen=True)
class InjectedOOM:
    """Fault injection for tests and drills: LORA_CORE_FAULT_OOM="STEP[:MIN_BATCH]" raises a CUDA OOM at that step
    while the batch size is at least MIN_BATCH — so step-down can be proven on a machine without a GPU. Read once
    per attempt, not per micro-batch."""

    at_step: int
    min_batch: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Optional["InjectedOOM"]:
        spec = environ.get(FAULT_OOM_ENV)
        if not spec:
            return None
        at, _, min_batch = spec.partition(":")
        return cls(int(at), int(min_batch or 1))

    def check(self, step: int, batch_size: int) -> None:
        if step == self.at_step and batch_size >= self.min_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_OOM_ENV})")


class StepReporter:
    """Events + TensorBoard + the progress callback, fed from one place (main process only)."""

    def __init__(self, cfg: TrainConfig, events: EventWriter, total: int, start: int, main: bool,
                 progress: Optional[ProgressCallback]):
        self.events, self.total, self.main = events, total, main
        self.progress = progress if main else None
        self.start_step, self.t0 = start, time.perf_counter()
        self.tb: Any = None
        self.closed = False
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.output.logging_dir)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs")
        if self.progress is not None:
            self.progress("start", {"step": start, "total_steps": total})

    def step(self, step: int, epoch: int, loss: float, lr: float, peak_mb: float,
             at: Optional[float] = None) -> None:
        """Report one step; ``at`` is when it ended (deferred steps are reported later than that)."""
        if not self.main:
            return
        done = step - self.start_step
        elapsed = (at if at is not None else time.perf_counter()) - self.t0
        it_s = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / it_s if it_s > 0 else None
        fields = {"step": step, "total_steps": self.total, "epoch": epoch, "loss": loss, "lr": lr,
                  "it_s": round(it_s, 4), "eta_s": round(eta, 1) if eta is not None else None,
                  "peak_mem_mb": round(peak_mb, 1)}
        self.events.emit("step", **fields)
        if self.progress is not None:
            self.progress("step", fields)
        if self.tb is not None:
            self.tb.add_scalar("loss/train", loss, step)
            self.tb.add_scalar("lr", lr, step)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.progress is not None:
            self.progress("close", {})
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


class TrainingRun:
    """One training attempt: its state, declared here, and its phases as named methods (`train` drives them)."""

    def __init__(self, cfg: TrainConfig, events: Optional[EventWriter] = None, stop: Optional[StopFlag] = None,
                 progress: Optional[ProgressCallback] = None):
        self.cfg = cfg
        self.events = events or EventWriter(enabled=False)
        self.stop = stop or StopFlag()
        self.progress = progress
        self.out_dir = Path(cfg.output.output_dir)
        self.batch_size = cfg.training.batch_size
        self.accumulation = cfg.training.gradient_accumulation_steps
        self.fault = InjectedOOM.from_env()
        # set by prepare()
        self.accelerator: Any = None
        self.main = True
        self.rank, self.world = 0, 1
        self.generator = torch.Generator()
        self.task: Optional[TrainingTask] = None
        self.optimizer: Any = None
        self.lr_scheduler: Any = None
        self.scaler: Any = None  # fp16's grad scaler, or None
        self.modules: list[torch.nn.Module] = []
        self.params: list[torch.nn.Parameter] = []
        self.total = 0  # optimizer steps of the whole run
        self.num_epochs = 0
        self.reporter: Optional[StepReporter] = None
        # advanced by every optimizer step
        self.pos = Position()
        self.losses: list[float] = []
        self.pending: list[PendingStep] = []  # steps whose loss is not read yet (`flush_logs`)
        self.log_every = 1  # read the loss every N steps (`log_interval`, set by start_accelerator)
        self.bad_steps = 0  # non-finite losses in a row
        self.sampled = False  # an image was rendered: finish() renders a card preview only for runs without one
        # training health (lora_core.health): warnings as `health` events; training.stop_on ends the run early
        self.health = HealthMonitor(cfg.training.stop_on)
        self.grad_norm: Any = None  # the last step's gradient norm, a tensor read by the monitor every few steps
        self.best: Optional[tuple[int, float, dict]] = None  # (step, validation loss, LoRA state) of the best eval
        self.hashed = False  # the training images' hashes were taken for the sample-copy check

    # ---- prepare -------------------------------------------------------------------------------------------------
    def prepare(self) -> Optional[TrainResult]:
        """Everything before the first step; a TrainResult when the run ended already (stopped while caching)."""
        self.start_accelerator()
        if not self.setup_task():
            return TrainResult("stopped", None, 0, 0, 0)
        self.setup_optimization()
        resumed_from = self.resume()
        self.announce(resumed_from)
        return None

    def start_accelerator(self) -> None:
        t = self.cfg.training
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = make_accelerator(self.cfg)
        self.main = self.accelerator.is_main_process
        if self.main:
            save_resolved_config(self.cfg, self.out_dir / "config.yaml")
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.log_every = log_interval(self.cfg, self.accelerator.device)
        seed = t.seed + self.rank
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.generator = torch.Generator().manual_seed(seed)

    def on_cache(self, what: str, done: int, total: int) -> None:
        """Progress of the one-off latent/text caching; a stop request cancels it (nothing is trained yet)."""
        if self.stop.is_set():
            raise KeyboardInterrupt("stopped while caching")
        if self.main and self.progress is not None:
            self.progress("cache", {"what": what, "done": done, "total": total})
        if self.main and (done == total or done % 10 == 0):
            self.events.emit("cache", what=what, done=done, total=total)

    def setup_task(self) -> bool:
        """Build and set up the task; False when a stop request cancelled its caching."""
        self.task = make_task(self.cfg, progress=self.on_cache)
        try:
            self.task.setup(self.accelerator)
        except KeyboardInterrupt:  # cancelled while caching: nothing trained, nothing to save
            if self.main:
                self.events.emit("end", status="stopped", step=0, output=None, error="stopped while caching",
                                 advice=None)
            return False
        return True

    def setup_optimization(self) -> None:
        """Optimizer, run length (steps per epoch from this rank's batches) and LR schedule."""
        t = self.cfg.training
        self.optimizer = self.accelerator.prepare_optimizer(
            make_optimizer(self.cfg, self.task.param_groups(t.learning_rate)))
        steps_per_epoch = max(1, math.ceil(len(self.batches_for(0)) / self.accumulation))
        self.total = t.max_train_steps or t.epochs * steps_per_epoch
        self.num_epochs = math.ceil(self.total / steps_per_epoch)
        self.lr_scheduler = make_lr_scheduler(self.cfg, self.optimizer, self.total)
        self.scaler = getattr(self.accelerator, "scaler", None)

    def resume(self) -> Optional[str]:
        """Restore the checkpoint asked for (``latest`` or a folder); returns its path, or None for a fresh run."""
        source = self.cfg.training.resume_from_checkpoint
        ckpt_path = latest_checkpoint(self.out_dir) if source == "latest" else (Path(source) if source else None)
        if ckpt_path is None:
            return None
        ckpt = load_checkpoint(ckpt_path)
        self.task.load_lora_state_dict(ckpt.lora)
        restore_training_state(ckpt, self.optimizer, self.lr_scheduler, self.scaler, self.generator)
        saved_bs = ckpt.state.get("config", {}).get("training", {}).get("batch_size", self.batch_size)
        self.pos = ckpt.position
        if saved_bs != self.batch_size:  # OOM step-down changed the batch size: continue from the same example
            self.pos.batch_in_epoch = self.pos.examples_in_epoch // self.batch_size
        log.info("resumed from %s at step %d", ckpt_path, self.pos.step)
        return str(ckpt_path)

    def announce(self, resumed_from: Optional[str]) -> None:
        """Dataset and start events, the reporter, and the modules in training mode."""
        task, pos = self.task, self.pos
        summary = task.dataset_summary() if self.main else None
        if summary is not None:
            self.events.emit("dataset", **summary)
        task.started_at = time.time()
        task.total_steps = self.total
        if self.main:
            self.events.emit("start", step=pos.step, total_steps=self.total, epoch=pos.epoch,
                             output_dir=str(self.out_dir), resumed_from=resumed_from,
                             device=str(self.accelerator.device), task_type=self.cfg.model.task_type,
                             num_examples=task.num_examples(), num_processes=self.world)
        self.reporter = StepReporter(self.cfg, self.events, self.total, pos.step, self.main, self.progress)
        self.modules = task.trainable_modules()
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for m in self.modules:
            m.train()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- steps ---------------------------------------------------------------------------------------------------
    def batches_for(self, epoch: int) -> list[list[int]]:
        """This rank's batches of one epoch (the task's deterministic order, split between processes)."""
        batches = self.task.epoch_batches(epoch, self.batch_size)
        if self.world > 1:  # every rank must run the same number of steps, or DDP waits forever
            batches = batches[: max(self.world, len(batches) // self.world * self.world)]
            batches = batches[self.rank::self.world]
        return batches

    def optimizer_step(self, batches: list[list[int]]) -> Optional[TrainResult]:
        """One optimizer step over the next group of micro-batches; a TrainResult when the run ends here."""
        pos = self.pos
        group = batches[pos.batch_in_epoch: pos.batch_in_epoch + self.accumulation]
        rng_at_group_start = capture_rng(self.generator)
        try:
            group_loss = self.forward_backward(group)
        except torch.OutOfMemoryError:
            return self.out_of_memory(rng_at_group_start)
        guarded = (pos.step + 1) % self.log_every == 0  # read before the update: this step is guarded
        loss: Any = group_loss.item() if guarded else group_loss
        if not self.update(loss if guarded else None):
            self.flush_logs()
            return self.diverged()
        pos.step += 1
        pos.batch_in_epoch += len(group)
        pos.examples_in_epoch += sum(len(b) for b in group)
        self.pending.append(PendingStep(pos.step, pos.epoch, loss, self.lr_scheduler.get_last_lr()[0],
                                        peak_memory_mb(self.accelerator.device), time.perf_counter(), guarded,
                                        self.grad_norm))
        return self.after_step(epoch_ends=pos.batch_in_epoch >= len(batches))

    def flush_logs(self) -> bool:
        """Read the pending steps' losses (one host sync for all of them) and report each step in order: events,
        TensorBoard, the progress callback, `losses` and the health monitor. The one place logged values become
        Python floats — whatever is fed from them belongs here. Returns False when the run diverged.

        The non-finite guard: a step whose loss is read before its update (every ``log_every``-th step; every step
        with 1, the CPU default) skips a non-finite update, as `update` says. Between reads updates are applied
        unguarded and the guard runs here, every ``log_every`` steps: a non-finite loss poisons the LoRA, so the
        losses after it are non-finite too and the run ends as diverged at this check (without saving)."""
        if not self.pending:
            return True
        deferred = [p for p in self.pending if not isinstance(p.loss, float)]
        if deferred:
            values = torch.stack([p.loss.detach().float().reshape(()) for p in deferred]).tolist()
            for p, value in zip(deferred, values):
                p.loss = value
        pending, self.pending = self.pending, []
        diverged = False
        for p in pending:
            if not p.guarded:
                self.bad_steps = 0 if (math.isfinite(p.loss) or self.scaler is not None) else self.bad_steps + 1
                diverged = diverged or self.bad_steps >= MAX_BAD_STEPS
            self.losses.append(p.loss)
            self.reporter.step(p.step, p.epoch, p.loss, p.lr, p.peak_mb, p.at)
            if self.main:
                self.report_health(self.health.observe_step(p.step, p.loss, p.grad_norm))
        return not diverged

    def forward_backward(self, group: list[list[int]]) -> torch.Tensor:
        """Accumulate the gradients of a group of micro-batches; returns their mean loss (over all processes) as a
        0-d tensor on the device — read where `flush_logs` reads (a read waits for the GPU)."""
        accelerator, task = self.accelerator, self.task
        group_loss: Any = 0.0
        for k, indices in enumerate(group):
            if self.fault is not None:
                self.fault.check(self.pos.step + 1, self.batch_size)
            batch = task.collate(indices, self.pos.epoch)
            sync = k == len(group) - 1
            ctx = accelerator.no_sync(self.modules[0]) if (self.world > 1 and not sync) else nullcontext()
            with ctx, accelerator.autocast():
                loss = task.loss(batch, self.generator)
                accelerator.backward(loss / len(group))
            group_loss = group_loss + loss.detach().float() / len(group)
        if self.world > 1:
            group_loss = accelerator.reduce(group_loss, "mean")
        return group_loss

    def update(self, group_loss: Optional[float]) -> bool:
        """Apply the accumulated gradients; False when the run diverged.

        A non-finite loss would poison the LoRA: that update is skipped (fp16's grad scaler does the same for
        overflows), and the run gives up with advice when it keeps happening. ``None``: the loss is not read at this
        step, the update is applied and `flush_logs` guards it at the next read."""
        finite = group_loss is None or math.isfinite(group_loss) or self.scaler is not None
        if group_loss is not None:
            self.bad_steps = 0 if finite else self.bad_steps + 1
        self.grad_norm = None
        if finite:
            if self.cfg.training.max_grad_norm > 0:  # clipping returns the norm before clipping: kept, not read
                self.grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.training.max_grad_norm)
            elif self.scaler is None:  # no clipping: the norm of the LoRA's gradients, on the device
                grads = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
                self.grad_norm = torch.stack(grads).norm() if grads else None
            self.optimizer.step()
        elif self.bad_steps >= MAX_BAD_STEPS:
            return False
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def after_step(self, epoch_ends: bool = False) -> Optional[TrainResult]:
        """Report the pending steps when it is time (`flush_logs`), periodic checkpoint and samples; a stop request
        saves and ends the run."""
        o, step = self.cfg.output, self.pos.step
        reports = (o.save_steps, self.cfg.data.validation_every, self.cfg.sample.sample_every_n_steps)
        if (step % self.log_every == 0 or step >= self.total or epoch_ends or self.stop.is_set()
                or any(n and step % n == 0 for n in reports)):  # a step is reported before what it triggers
            if not self.flush_logs():
                return self.diverged()
        if o.save_steps and step % o.save_steps == 0 and step < self.total:
            self.save_step()
        saved = bool(o.save_steps and step % o.save_steps == 0 and step < self.total)
        every = self.cfg.data.validation_every
        validated = bool(every and step % every == 0 and not saved and step < self.total)
        if validated:
            self.validate()
        if self.cfg.sample.sample_every_n_steps and step % self.cfg.sample.sample_every_n_steps == 0:
            self.samples()
        if step < self.total and self.health_says_stop(step, validated or saved):
            return self.stop_early()
        if self.stop.is_set():
            path, lora = self.save_step("stop")
            if self.main:
                self.events.emit("end", status="stopped", step=step, output=str(lora) if lora else None,
                                 error=None, advice=None)
            return self.result("stopped", lora, checkpoint=path)
        return None

    def end_epoch(self) -> None:
        pos, o = self.pos, self.cfg.output
        pos.epoch += 1
        pos.batch_in_epoch = 0
        pos.examples_in_epoch = 0
        if o.save_every_n_epochs and pos.epoch % o.save_every_n_epochs == 0 and pos.step < self.total:
            self.save_step("epoch")
        if self.cfg.sample.sample_every_n_epochs and pos.epoch % self.cfg.sample.sample_every_n_epochs == 0:
            self.samples()

    # ---- endings -------------------------------------------------------------------------------------------------
    def out_of_memory(self, rng_at_group_start) -> TrainResult:
        """Drop the half-accumulated gradients and save the last completed step (with the RNG as it was before this
        group, so a resumed run replays it)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
        self.flush_logs()  # the steps completed before the OOM are reported
        path = self.checkpoint(rng_at_group_start) if self.main else None
        if self.main:
            self.events.emit("oom", step=self.pos.step, batch_size=self.batch_size,
                             action=self.cfg.training.oom_policy, advice=OOM_ADVICE, checkpoint=str(path))
        return self.result("oom", checkpoint=path, error="CUDA out of memory", advice=OOM_ADVICE)

    def diverged(self) -> TrainResult:
        if self.main:
            self.events.emit("end", status="failed", step=self.pos.step, output=None, error=DIVERGED,
                             advice=DIVERGED_ADVICE)
        return self.result("failed", error=DIVERGED, advice=DIVERGED_ADVICE)

    def finish(self) -> TrainResult:
        """The final checkpoint (lets a finished run be continued with more steps), the LoRA and its metrics."""
        pos, main = self.pos, self.main
        self.flush_logs()  # every step is reported before the final checkpoint, preview and export
        self.accelerator.wait_for_everyone()
        final_ckpt = self.checkpoint() if main else None
        if main and not self.sampled and not any((self.out_dir / "samples").glob("step*.png")):
            try:  # the card preview; a failed render must not cost the finished LoRA
                self.samples(preview=True)
            except Exception as e:
                log.warning("no preview image: %s: %s", type(e).__name__, e)
        with evaluation_weights(self.optimizer):  # schedule-free: the averaged weights are the result
            output = self.task.export(self.out_dir / self.cfg.output.output_name, pos.step, pos.epoch) if main \
                else None
            metrics = self.task.evaluate(pos.step) if main else None
        if metrics:
            self.events.emit("eval", step=pos.step, **metrics)
            self.observe_eval(metrics)
        if main:
            self.events.emit("end", status="finished", step=pos.step, output=str(output), error=None, advice=None)
        return self.result("finished", output, checkpoint=final_ckpt)

    def checkpoint(self, rng_override=None) -> Path:
        return save_checkpoint(self.out_dir, self.pos, self.task.lora_state_dict(), self.optimizer,
                               self.lr_scheduler, self.scaler, self.generator, self.cfg.to_dict(),
                               self.cfg.output.keep_last_checkpoints, rng_override)

    def save_step(self, reason: str = "checkpoint") -> tuple[Optional[Path], Optional[Path]]:
        """Checkpoint + this step's LoRA (+ validation metrics) on the main process."""
        if not self.main:
            return None, None
        pos = self.pos
        path = self.checkpoint()
        with evaluation_weights(self.optimizer):
            lora = self.task.export(self.out_dir / f"{self.cfg.output.output_name}-step{pos.step:08d}", pos.step,
                                    pos.epoch)
        self.events.emit("checkpoint", step=pos.step, epoch=pos.epoch, path=str(path), lora=str(lora), reason=reason)
        metrics = self.task.evaluate(pos.step)
        if metrics:
            self.events.emit("eval", step=pos.step, **metrics)
            self.observe_eval(metrics)
        return path, lora

    # ---- training health -----------------------------------------------------------------------------------------
    def report_health(self, warnings: list[HealthWarning]) -> None:
        """Each warning as a ``health`` event, a TensorBoard text and a log line (main process only)."""
        for w in warnings:
            self.events.emit("health", **w.to_event())
            log.warning("health at step %d: %s: %s. %s", w.step, w.kind, w.message, w.advice)
            tb = self.reporter.tb if self.reporter is not None else None
            if tb is not None:
                tb.add_text(f"health/{w.kind}", f"{w.message}. {w.advice}", w.step)

    def validate(self) -> None:
        """The validation loss now (``data.validation_every``), as an ``eval`` event and health input."""
        if not self.main:
            return
        with evaluation_weights(self.optimizer), self.accelerator.autocast():
            metrics = self.task.evaluate(self.pos.step)
        if metrics:
            self.events.emit("eval", step=self.pos.step, **metrics)
            self.observe_eval(metrics)

    def observe_eval(self, metrics: dict) -> None:
        """Feed the monitor; with ``stop_on`` keep the LoRA state of the lowest validation loss (on the CPU: a LoRA
        is small) so an early stop can write that one."""
        loss = metrics.get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        if self.reporter is not None and self.reporter.tb is not None:
            self.reporter.tb.add_scalar("loss/validation", loss, self.pos.step)
        if self.cfg.training.stop_on and (self.best is None or loss < self.best[1]):
            self.best = (self.pos.step, loss, {k: v.detach().cpu().clone()
                                               for k, v in self.task.lora_state_dict().items()})
        self.report_health(self.health.observe_eval(self.pos.step, loss))

    def health_says_stop(self, step: int, evaluated: bool) -> bool:
        """Whether ``training.stop_on`` ends the run now. Only the main process watches health, so with several
        processes its answer is shared (a sum over ranks) at the steps where it can change: every check and every
        evaluation, never on other steps."""
        if not self.cfg.training.stop_on:
            return False
        wanted = self.health.stop_reason is not None
        if self.world == 1:
            return wanted
        if step % self.health.check_every and not evaluated:
            return False
        flag = torch.tensor([1.0 if wanted else 0.0], device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum").item() > 0

    def stop_early(self) -> TrainResult:
        """``training.stop_on`` matched a warning: write the best LoRA by validation loss (or the current one when
        there is no validation) as the run's result, and say which step it is from."""
        reason, step = self.health.stop_reason, self.pos.step
        if self.best is not None:
            best_step, best_loss, state = self.best
            self.task.load_lora_state_dict(state)
            kept = f"the LoRA written is the one from step {best_step} (lowest validation loss {best_loss:.4g})"
        else:
            best_step, best_loss = step, None
            kept = "no validation split: the LoRA written is the current one"
        if self.main and reason is not None:
            self.events.emit("health", kind="early_stop", step=step, message=f"stopped at step {step} of "
                             f"{self.total} on {reason.kind} (training.stop_on); {kept}", advice=reason.advice,
                             value=best_loss, best_step=best_step, reason=reason.kind)
            log.warning("stopping early at step %d on %s; %s", step, reason.kind, kept)
        self.total = step  # the LoRA's metadata and the end event tell the steps actually trained
        return self.finish()

    def samples(self, preview: bool = False) -> None:
        """Render the sample prompts (``preview``: the card picture of a run that asked for none), reporting each
        prompt and denoising step as ``sample_progress`` and saying in the log how long it took."""
        if not self.main:
            return
        step = self.pos.step

        def progress(fields: dict) -> None:
            self.events.emit("sample_progress", step=step, **fields)

        started = time.perf_counter()
        with evaluation_weights(self.optimizer):  # schedule-free: sample the averaged weights
            written = self.task.sample(step, self.out_dir / "samples", progress=progress, preview=preview)
        for path, prompt in written:
            self.events.emit("sample", step=step, path=str(path), prompt=prompt, **({"preview": True} if preview
                                                                                        else {}))
        if written and not self.hashed:  # the copy check compares samples with the images trained on
            self.hashed = True
            self.health.training_hashes = image_hashes(getattr(self.task, "training_images", list)())
        if written:
            self.report_health(self.health.observe_samples(step, [path for path, _ in written]))
        if written:
            self.sampled = True
            log.info("%s at step %d: %d image(s) in %.1f s", "preview" if preview else "samples", step,
                     len(written), time.perf_counter() - started)

    def result(self, status: str, output: Optional[Path] = None, **kw: Any) -> TrainResult:
        self.flush_logs()  # no step goes unreported, however the run ends
        self.close()
        return TrainResult(status, output, self.pos.step, self.pos.epoch, self.total, losses=self.losses,
                           peak_mem_mb=peak_memory_mb(self.accelerator.device), **kw)

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.close()


def train(cfg: TrainConfig, events: Optional[EventWriter] = None, stop: Optional[StopFlag] = None,
          progress: Optional[ProgressCallback] = None) -> TrainResult:
    """Run one training attempt with ``cfg``; never raises for OOM (returns status "oom")."""
    run = TrainingRun(cfg, events, stop, progress)
    try:
        ended = run.prepare()
        if ended is not None:
            return ended
        while run.pos.step < run.total and run.pos.epoch < run.num_epochs + 1:
            batches = run.batches_for(run.pos.epoch)
            while run.pos.batch_in_epoch < len(batches) and run.pos.step < run.total:
                ended = run.optimizer_step(batches)
                if ended is not None:
                    return ended
            if run.pos.batch_in_epoch >= len(batches):
                run.end_epoch()
        return run.finish()
    finally:
        run.close()
