"""The one training loop, for image and text LoRAs alike: setup → (resume) → steps → checkpoints → export.

Read top to bottom: build the accelerator and the task, the optimizer and the LR schedule, restore a checkpoint if
asked, then for each epoch replay the task's deterministic batch order from the saved position. Progress goes to three
places from one source (`_report_step`): the tqdm bar, the JSON-lines events and TensorBoard. A stop request (signal)
is honoured between optimizer steps: checkpoint + current LoRA, then status "stopped". CUDA out-of-memory never
escapes as a traceback: the loop saves the last completed step and reports "oom" with what to change.
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
from typing import Optional

import numpy as np
import torch

from .checkpoint import (Position, capture_rng, latest_checkpoint, load_checkpoint, restore_training_state,
                         save_checkpoint)
from .config import TrainConfig, save_resolved_config
from .errors import InputError
from .events import EventWriter

log = logging.getLogger(__name__)

OOM_ADVICE = ("out of GPU memory: lower training.batch_size, turn on training.gradient_checkpointing and "
              "data.cache_latents, use training.mixed_precision fp16/bf16 or optimizer adamw8bit, or lower "
              "data.resolution / model.lora_rank (or set training.oom_policy: step_down to let the trainer do it)")


MAX_BAD_STEPS = 3
DIVERGED = f"the loss was not a finite number for {MAX_BAD_STEPS} steps in a row (training diverged)"
DIVERGED_ADVICE = ("lower training.learning_rate, use training.mixed_precision bf16 instead of fp16, or resume from "
                   "an earlier checkpoint")


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


def make_task(cfg: TrainConfig, progress=None):
    if cfg.is_text:
        from .text.task import TextTask

        return TextTask(cfg)
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
    return Accelerator(mixed_precision=cfg.training.mixed_precision, cpu=cpu,
                       # text-encoder LoRA in a layer whose output is unused (SDXL and clip_skip > 1 condition on the
                       # penultimate layer) gets no gradient; DDP must be told, or it waits for it forever
                       kwargs_handlers=[DistributedDataParallelKwargs(
                           find_unused_parameters=cfg.model.train_text_encoder)])


def make_optimizer(cfg: TrainConfig, groups: list[dict]):
    t = cfg.training
    if t.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise InputError("training.optimizer: adamw8bit needs bitsandbytes and a CUDA GPU; use adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InputError("training.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None

        return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)


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


def _injected_oom(step: int, batch_size: int) -> bool:
    """Fault injection for tests and drills: LORA_CORE_FAULT_OOM="STEP[:MIN_BATCH]" raises a CUDA OOM at that step
    while the batch size is at least MIN_BATCH — so step-down can be proven on a machine without a GPU."""
    spec = os.environ.get("LORA_CORE_FAULT_OOM")
    if not spec:
        return False
    at, _, min_batch = spec.partition(":")
    return step == int(at) and batch_size >= int(min_batch or 1)


class _Progress:
    """tqdm bar + events + TensorBoard, fed from one place."""

    def __init__(self, cfg: TrainConfig, events: EventWriter, total: int, start: int, main: bool, show_bar: bool):
        self.events, self.total, self.main = events, total, main
        self.start_step, self.t0 = start, time.perf_counter()
        self.bar = None
        self.tb = None
        if main and show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(cfg.output.logging_dir)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs")

    def step(self, step: int, epoch: int, loss: float, lr: float, peak_mb: float) -> None:
        if not self.main:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        it_s = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / it_s if it_s > 0 else None
        self.events.emit("step", step=step, total_steps=self.total, epoch=epoch, loss=loss, lr=lr,
                         it_s=round(it_s, 4), eta_s=round(eta, 1) if eta is not None else None,
                         peak_mem_mb=round(peak_mb, 1))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.tb is not None:
            self.tb.add_scalar("loss/train", loss, step)
            self.tb.add_scalar("lr", lr, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def train(cfg: TrainConfig, events: Optional[EventWriter] = None, stop: Optional[StopFlag] = None,
          show_progress: bool = True) -> TrainResult:
    """Run one training attempt with ``cfg``; never raises for OOM (returns status "oom")."""
    events = events or EventWriter(enabled=False)
    stop = stop or StopFlag()
    t, o = cfg.training, cfg.output
    out_dir = Path(o.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if main:
        save_resolved_config(cfg, out_dir / "config.yaml")
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(t.seed + rank)
    random.seed(t.seed + rank)
    np.random.seed((t.seed + rank) % 2**32)
    generator = torch.Generator().manual_seed(t.seed + rank)

    cache_bars: dict = {}

    def caching(what: str, done: int, total: int) -> None:
        """Progress of the one-off latent/text caching; a stop request cancels it (nothing is trained yet)."""
        if stop.is_set():
            raise KeyboardInterrupt("stopped while caching")
        if main and show_progress:
            from tqdm.auto import tqdm

            bar = cache_bars.setdefault(what, tqdm(total=total, desc=f"caching {what}", unit="item", leave=False))
            bar.update(done - bar.n)
            if done == total:
                bar.close()
        if main and (done == total or done % 10 == 0):
            events.emit("cache", what=what, done=done, total=total)

    task = make_task(cfg, progress=caching)
    try:
        task.setup(accelerator)
    except KeyboardInterrupt:  # cancelled while caching: nothing trained, nothing to save
        if main:
            events.emit("end", status="stopped", step=0, output=None, error="stopped while caching", advice=None)
        return TrainResult("stopped", None, 0, 0, 0)
    optimizer = accelerator.prepare_optimizer(make_optimizer(cfg, task.param_groups(t.learning_rate)))
    ga, bs = t.gradient_accumulation_steps, t.batch_size

    def my_batches(epoch: int) -> list[list[int]]:
        batches = task.epoch_batches(epoch, bs)
        if world > 1:  # every rank must run the same number of steps, or DDP waits forever
            batches = batches[: max(world, len(batches) // world * world)]
            batches = batches[rank::world]
        return batches

    steps_per_epoch = max(1, math.ceil(len(my_batches(0)) / ga))
    total = t.max_train_steps or t.epochs * steps_per_epoch
    num_epochs = math.ceil(total / steps_per_epoch)
    lr_scheduler = make_lr_scheduler(cfg, optimizer, total)
    scaler = getattr(accelerator, "scaler", None)

    pos = Position()
    resumed_from = None
    source = t.resume_from_checkpoint
    ckpt_path = latest_checkpoint(out_dir) if source == "latest" else (Path(source) if source else None)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        task.load_lora_state_dict(ckpt.lora)
        restore_training_state(ckpt, optimizer, lr_scheduler, scaler, generator)
        saved_bs = ckpt.state.get("config", {}).get("training", {}).get("batch_size", bs)
        pos = ckpt.position
        if saved_bs != bs:  # OOM step-down changed the batch size: continue from the same example, approximately
            pos.batch_in_epoch = pos.examples_in_epoch // bs
        resumed_from = str(ckpt_path)
        log.info("resumed from %s at step %d", ckpt_path, pos.step)
    if main and hasattr(task, "dataset_summary"):
        events.emit("dataset", **task.dataset_summary())
    task.started_at = time.time()
    task.total_steps = total
    if main:
        events.emit("start", step=pos.step, total_steps=total, epoch=pos.epoch, output_dir=str(out_dir),
                    resumed_from=resumed_from, device=str(accelerator.device), task_type=cfg.model.task_type,
                    num_examples=task.num_examples(), num_processes=world)
    progress = _Progress(cfg, events, total, pos.step, main, show_progress)
    losses: list[float] = []
    modules = task.trainable_modules()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    name = o.output_name

    def checkpoint(rng_override=None) -> Path:
        path = save_checkpoint(out_dir, pos, task.lora_state_dict(), optimizer, lr_scheduler, scaler, generator,
                               cfg.to_dict(), o.keep_last_checkpoints, rng_override)
        return path

    def save_step(kind: str = "checkpoint") -> tuple[Optional[Path], Optional[Path]]:
        path = checkpoint() if main else None
        lora = task.export(out_dir / f"{name}-step{pos.step:08d}", pos.step, pos.epoch) if main else None
        if main:
            events.emit("checkpoint", step=pos.step, epoch=pos.epoch, path=str(path), lora=str(lora), reason=kind)
            metrics = task.evaluate(pos.step)
            if metrics:
                events.emit("eval", step=pos.step, **metrics)
        return path, lora

    def samples() -> None:
        if not main:
            return
        for path, prompt in task.sample(pos.step, out_dir / "samples"):
            events.emit("sample", step=pos.step, path=str(path), prompt=prompt)

    def result(status: str, output=None, **kw) -> TrainResult:
        progress.close()
        return TrainResult(status, output, pos.step, pos.epoch, total, losses=losses,
                           peak_mem_mb=peak_memory_mb(accelerator.device), **kw)

    for m in modules:
        m.train()
    optimizer.zero_grad(set_to_none=True)
    bad_steps = 0
    sample_steps, sample_epochs = cfg.sample.sample_every_n_steps, cfg.sample.sample_every_n_epochs
    try:
        while pos.step < total and pos.epoch < num_epochs + 1:
            batches = my_batches(pos.epoch)
            bi = pos.batch_in_epoch
            while bi < len(batches) and pos.step < total:
                group = batches[bi: bi + ga]
                rng_at_group_start = capture_rng(generator)
                group_loss = 0.0
                try:
                    for k, indices in enumerate(group):
                        if _injected_oom(pos.step + 1, bs):
                            raise torch.OutOfMemoryError("CUDA out of memory (injected by LORA_CORE_FAULT_OOM)")
                        batch = task.collate(indices, pos.epoch)
                        sync = k == len(group) - 1
                        ctx = accelerator.no_sync(modules[0]) if (world > 1 and not sync) else nullcontext()
                        with ctx, accelerator.autocast():
                            loss = task.loss(batch, generator)
                            accelerator.backward(loss / len(group))
                        group_loss += loss.detach().float().item() / len(group)
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.device.type == "cuda":
                        torch.cuda.empty_cache()
                    path = checkpoint(rng_at_group_start) if main else None
                    if main:
                        events.emit("oom", step=pos.step, batch_size=bs, action=t.oom_policy, advice=OOM_ADVICE,
                                    checkpoint=str(path))
                    return result("oom", checkpoint=path, error="CUDA out of memory", advice=OOM_ADVICE)
                if world > 1:
                    group_loss = accelerator.reduce(torch.tensor(group_loss, device=accelerator.device),
                                                    "mean").item()
                # a non-finite loss would poison the LoRA: skip that update (fp16's grad scaler does the same for
                # overflows), and give up with advice when it keeps happening
                finite = math.isfinite(group_loss) or scaler is not None
                bad_steps = 0 if finite else bad_steps + 1
                if finite:
                    if t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                elif bad_steps >= MAX_BAD_STEPS:
                    if main:
                        events.emit("end", status="failed", step=pos.step, output=None, error=DIVERGED,
                                    advice=DIVERGED_ADVICE)
                    return result("failed", error=DIVERGED, advice=DIVERGED_ADVICE)
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bi += len(group)
                pos.step += 1
                pos.batch_in_epoch = bi
                pos.examples_in_epoch += sum(len(b) for b in group)
                losses.append(group_loss)
                progress.step(pos.step, pos.epoch, group_loss, lr_scheduler.get_last_lr()[0],
                              peak_memory_mb(accelerator.device))
                if o.save_steps and pos.step % o.save_steps == 0 and pos.step < total:
                    save_step()
                if sample_steps and pos.step % sample_steps == 0:
                    samples()
                if stop.is_set():
                    path, lora = save_step("stop")
                    if main:
                        events.emit("end", status="stopped", step=pos.step, output=str(lora) if lora else None,
                                    error=None, advice=None)
                    return result("stopped", lora, checkpoint=path)
            if bi >= len(batches):
                pos.epoch += 1
                pos.batch_in_epoch = 0
                pos.examples_in_epoch = 0
                if o.save_every_n_epochs and pos.epoch % o.save_every_n_epochs == 0 and pos.step < total:
                    save_step("epoch")
                if sample_epochs and pos.epoch % sample_epochs == 0:
                    samples()
        accelerator.wait_for_everyone()
        final_ckpt = checkpoint() if main else None  # lets a finished run be continued with more steps
        output = task.export(out_dir / name, pos.step, pos.epoch) if main else None
        metrics = task.evaluate(pos.step) if main else None
        if metrics:
            events.emit("eval", step=pos.step, **metrics)
        if main:
            events.emit("end", status="finished", step=pos.step, output=str(output), error=None, advice=None)
        return result("finished", output, checkpoint=final_ckpt)
    finally:
        progress.close()

