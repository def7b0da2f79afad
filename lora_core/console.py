"""What ``lora-train`` shows on its console: progress from the loop's callback, and a log without known noise.

The loop only reports progress (`lora_core.loop.ProgressCallback`); this module, used by the CLI alone, renders it:
tqdm bars when stderr is a terminal, plain lines when it is not (the daemon's ``train.log``, CI, a pipe), because
tqdm's cursor escapes (``\\x1b[A``, ``\\r``) turn a log file into noise. It also silences the warnings every run
prints that say nothing about the run (transformers telling that torchvision is missing for image processors we
never use, FutureWarnings from libraries' internals).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import IO, Any, Optional

PLAIN_LINES_PER_RUN = 20  # not a terminal: about this many step lines per run, plus the first and the last


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class ConsoleProgress:
    """A `ProgressCallback` for a console: tqdm on a TTY, one plain line now and then otherwise."""

    def __init__(self, stream: Optional[IO[str]] = None, tty: Optional[bool] = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.bar: Any = None
        self.cache_bars: dict[str, Any] = {}
        self.every = 1
        self.start_step = 0

    def __call__(self, kind: str, fields: dict) -> None:
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(**fields)

    def _on_cache(self, what: str, done: int, total: int) -> None:
        if self.tty:
            from tqdm.auto import tqdm

            bar = self.cache_bars.get(what)
            if bar is None:
                bar = self.cache_bars[what] = tqdm(total=total, desc=f"caching {what}", unit="item", leave=False,
                                                   file=self.stream)
            bar.update(done - bar.n)
            if done == total:
                bar.close()
        elif done == total or done == 1:
            self._line(f"caching {what}: {done}/{total}")

    def _on_start(self, step: int, total_steps: int) -> None:
        self.start_step = step
        self.every = max(1, total_steps // PLAIN_LINES_PER_RUN)
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
                            file=self.stream)
        else:
            self._line(f"training: step {step}/{total_steps}")

    def _on_step(self, step: int, total_steps: int, loss: float, lr: float, it_s: float,
                 eta_s: Optional[float], **_: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif not self.tty and (step % self.every == 0 or step == total_steps or step == self.start_step + 1):
            self._line(f"step {step}/{total_steps}  loss {loss:.4f}  lr {lr:.2e}  {it_s:.2f} it/s  "
                       f"eta {_fmt_eta(eta_s)}")

    def _on_close(self) -> None:
        for bar in self.cache_bars.values():
            bar.close()
        self.cache_bars.clear()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class _DropKnownNoise(logging.Filter):
    """transformers 5 logs that torchvision is missing each time an image processor class is touched — the
    diffusers pipelines import them; training never uses them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_known_noise(stream: Optional[IO[str]] = None) -> None:
    """Filter warnings that every run prints and that say nothing about it; off a terminal, also turn off the
    libraries' own download/loading bars (their escapes would litter the log)."""
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|diffusers|accelerate|peft|torch)\b")
    # a logger's filters see only the records of that logger, so the filter sits on the one that logs it
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropKnownNoise())
    if not (stream or sys.stderr).isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
