"""The JSON-lines event stream of a training run: one object per line, the contract the daemon consumes.

Every event has ``type`` and ``time`` (unix seconds). Types and their fields:

============  ==============================================================================================
``start``     step, total_steps, epoch, output_dir, resumed_from (checkpoint path or null), device, task_type
``dataset``   images, examples, skipped [{file, reason}], duplicates [{file, same_as}], reg_images, buckets
``plan``      estimate_mb, capacity_mb, fits, applied (overrides auto_fit applied, or null)
``cache``     what ("latents" | "text"), done, total
``step``      step, total_steps, epoch, loss, lr, it_s, eta_s, peak_mem_mb
``checkpoint``  step, epoch, path (resume state folder), lora (the step's LoRA file)
``sample``    step, path (PNG or .txt for text runs), prompt
``eval``      step, eval_loss, perplexity (text runs with a validation split), validation_images (image runs)
``health``    kind (loss_spike | plateau | grad_explosion | overfit | sample_nan | sample_flat | sample_copy |
              early_stop), step, message, advice, value; early_stop adds best_step and reason (`lora_core.health`)
``oom``       step, batch_size, action ("step_down" | "stop"), advice
``end``       status ("finished" | "stopped" | "failed" | "oom"), step, output (final file or null), error, advice
``caption``   done, total, it_s, eta_s — from ``lora_core.dataset.auto_label --events`` (whose ``end`` adds done, total,
              failed)
``progress``  done, total, what — from ``lora_core.tools --events`` (which starts with ``start`` {command} and ends
              with ``end`` {status, output, error, report})
============  ==============================================================================================

Exit codes of ``python -m lora_core.train`` (see `EXIT_CODES`) tell the same story for callers that only see the
process: the daemon uses them to tell a stop (checkpoint written) from a crash.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import IO, Any, Optional

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_OOM = 4
EXIT_ABORTED = 130
EXIT_CODES = {"finished": EXIT_OK, "failed": EXIT_ERROR, "config": EXIT_CONFIG, "stopped": EXIT_STOPPED,
              "oom": EXIT_OOM, "aborted": EXIT_ABORTED}

# What to change after running out of memory: the trainer's ``oom`` events carry it, and the daemon shows it when a
# child dies without saying why (killed by the system's OOM killer). One text, so the two never disagree.
OOM_ADVICE = ("lower training.batch_size or data.resolution, turn on training.gradient_checkpointing and "
              "data.cache_latents, use training.mixed_precision fp16/bf16 or optimizer adamw8bit, or lower "
              "model.lora_rank (or set training.oom_policy: step_down to let the trainer do it)")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf; a diverged loss must still produce a valid line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class EventWriter:
    """Append events to a JSON-lines file (and/or a stream), flushed per line so a reader tails them live."""

    def __init__(self, path: Optional[str | Path] = None, stream: Optional[IO[str]] = None, enabled: bool = True):
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8", buffering=1) if (path and enabled) else None
        self._stream = stream if enabled else None

    def emit(self, type: str, **fields: Any) -> dict:
        event = {"type": type, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        line = json.dumps(event, ensure_ascii=False)
        with self._lock:
            for out in (self._file, self._stream):
                if out is not None:
                    out.write(line + "\n")
                    out.flush()
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: str | Path) -> list[dict]:
    """Read every complete event line; a half-written last line (the writer was killed) is ignored."""
    events = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return events

