"""Training health: warnings with advice while a run is still worth saving (loss spike, plateau, gradient-norm
explosion, overfitting on held-out images, collapsed samples).

Why a separate module: the loop only feeds numbers in (`HealthMonitor.observe_step`, `observe_eval`,
`observe_samples`) and emits what comes back as ``health`` events; every rule lives here as a pure function of a
series, so each one is unit-tested on synthetic losses without a model. Nothing here forces a host sync per step:
gradient norms arrive as tensors and are read in one batch every `CHECK_EVERY` steps (the loss is already a Python
float in the loop).

Diffusion losses are noisy by nature (each step draws its own timestep, so one step's loss can be ten times the
next), which is why every detector compares window means or medians, never single steps, and why the plateau and
overfit advice says to look at samples: for LoRAs a flat training loss is normal long before the result is done
(kohya-ss/sd-scripts docs, "train_network" — the loss is "not a good indicator"). Each warning kind is reported once
and again only after it cleared, so a run's log is not flooded.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

CHECK_EVERY = 10  # optimizer steps between health checks (one host read of the kept gradient norms)
STOPPABLE = ("overfit", "plateau")  # what training.stop_on may name

# loss spike: the mean of the last SPIKE_RECENT losses against the median of the SPIKE_WINDOW before them
SPIKE_RECENT, SPIKE_WINDOW, SPIKE_FACTOR = 5, 50, 3.0
# plateau: over the last PLATEAU_WINDOW losses, the fitted line falls by less than PLATEAU_MIN_DROP of its level
PLATEAU_WINDOW, PLATEAU_MIN_DROP = 200, 0.01
# gradient norm: a norm over GRAD_FACTOR × the median of the previous GRAD_WINDOW norms, or not finite
GRAD_WINDOW, GRAD_FACTOR = 50, 10.0
# overfit: validation loss above its best by OVERFIT_TOLERANCE for OVERFIT_PATIENCE evaluations in a row, while the
# training loss since that best is lower than before it
OVERFIT_TOLERANCE, OVERFIT_PATIENCE = 0.02, 2
# samples: a picture whose pixels vary by less than this (0-255 scale) is one colour; dHash bits for "a copy"
FLAT_STD = 2.0
COPY_BITS = 12  # the dataset check's near-duplicate threshold (lora_core.dataset.check.DEFAULT_NEAR_THRESHOLD)

ADVICE = {
    "loss_spike": "a sudden jump of the loss usually means the learning rate is too high for this batch size: lower "
                  "training.learning_rate (halve it), add training.lr_warmup_steps, or keep training.max_grad_norm "
                  "at 1.0",
    "plateau": "the training loss stopped falling; for a LoRA this is often fine — judge by the samples. If they "
               "stopped improving too, the run can end here (training.stop_on: [plateau] does that); if they are "
               "still weak, raise model.lora_rank or training.learning_rate",
    "grad_explosion": "the gradient norm jumped far above its usual size: lower training.learning_rate, set "
                      "training.max_grad_norm 1.0 (clipping), or use mixed_precision bf16 instead of fp16",
    "overfit": "the loss on held-out images rises while the training loss falls: the LoRA is memorising its "
               "images. Use the checkpoint with the lowest validation loss, train fewer steps or repeats, lower "
               "model.lora_rank, or add images (training.stop_on: [overfit] stops and keeps the best)",
    "sample_nan": "the sample is black/empty, which is how NaN latents decode: use mixed_precision bf16 (or "
                  "no_half_vae for SDXL) and lower training.learning_rate",
    "sample_flat": "the sample is a single colour: the LoRA has collapsed. Lower training.learning_rate and resume "
                   "from an earlier checkpoint",
    "sample_copy": "the sample is nearly a copy of a training image: the LoRA memorises. Train fewer steps, lower "
                   "model.lora_rank or the repeats, caption the images more fully, or add varied images",
}


@dataclass
class HealthWarning:
    """One finding: ``kind`` (a key of `ADVICE`), the step it was seen at, what was seen, and what to do."""

    kind: str
    step: int
    message: str
    advice: str
    value: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def to_event(self) -> dict:
        """The fields of a ``health`` event (see `lora_core.events`)."""
        data = asdict(self)
        extra = data.pop("extra")
        return {**data, **extra}


# ---- detectors on plain series (each returns a message or None) ----------------------------------------------------
def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def loss_spike(losses: Sequence[float], recent: int = SPIKE_RECENT, window: int = SPIKE_WINDOW,
               factor: float = SPIKE_FACTOR) -> Optional[str]:
    """The latest ``recent`` losses average over ``factor`` × the median of the ``window`` before them."""
    if len(losses) < recent + max(10, window // 2):
        return None
    before = _finite(losses[-recent - window:-recent])
    now = _finite(losses[-recent:])
    if not before or not now:
        return None
    base = statistics.median(before)
    mean = sum(now) / len(now)
    if base > 0 and mean > factor * base:
        return f"the loss jumped to {mean:.4g} (mean of the last {len(now)} steps), {mean / base:.1f}x its recent " \
               f"median {base:.4g}"
    return None


def _slope(values: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope per step and its standard error."""
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    den = sum((i - mx) ** 2 for i in range(n))
    if n < 3 or not den:
        return 0.0, 0.0
    slope = sum((i - mx) * (v - my) for i, v in enumerate(values)) / den
    residual = sum((v - my - slope * (i - mx)) ** 2 for i, v in enumerate(values))
    return slope, math.sqrt(residual / (n - 2) / den)


def plateau(losses: Sequence[float], window: int = PLATEAU_WINDOW, min_drop: float = PLATEAU_MIN_DROP,
            sigmas: float = 2.0) -> Optional[str]:
    """Over the last ``window`` losses the fitted line falls by less than ``min_drop`` of the window's mean, or by
    less than ``sigmas`` standard errors (diffusion losses are so noisy that a small fitted fall means nothing).
    The monitor reports at 2 and clears only at 4 standard errors, so a flat loss is reported once."""
    if len(losses) < window:
        return None
    values = _finite(losses[-window:])
    if len(values) < window // 2:
        return None
    mean = sum(values) / len(values)
    slope, error = _slope(values)
    drop = -slope * (len(values) - 1)  # how far the fitted line falls across the window
    if mean > 0 and drop < max(min_drop * mean, sigmas * error * (len(values) - 1)):
        return f"the training loss has not fallen over the last {window} steps (fitted change " \
               f"{-drop / mean:+.1%} of its mean {mean:.4g})"
    return None


def grad_explosion(norms: Sequence[float], window: int = GRAD_WINDOW, factor: float = GRAD_FACTOR
                   ) -> Optional[tuple[str, float]]:
    """The latest gradient norm is not finite, or over ``factor`` × the median of the ``window`` before it."""
    if not norms:
        return None
    last = norms[-1]
    if last is None or not math.isfinite(last):
        return "the gradient norm is not a finite number", float("nan")
    before = _finite(norms[-1 - window:-1])
    if len(before) < 10:
        return None
    base = statistics.median(before)
    if base > 0 and last > factor * base:
        return f"the gradient norm reached {last:.4g}, {last / base:.0f}x its recent median {base:.4g}", last
    return None


def overfitting(evals: Sequence[tuple[int, float]], losses: Sequence[tuple[int, float]],
                tolerance: float = OVERFIT_TOLERANCE, patience: int = OVERFIT_PATIENCE) -> Optional[str]:
    """The validation loss (``(step, loss)`` pairs) has been above its best by ``tolerance`` for the last
    ``patience`` evaluations while the training loss (``(step, loss)``) after that best averages below before."""
    evals = [(s, v) for s, v in evals if v is not None and math.isfinite(v)]
    if len(evals) < patience + 1:
        return None
    best_step, best = min(evals, key=lambda e: (e[1], e[0]))
    tail = evals[-patience:]
    if any(s <= best_step for s, _ in tail) or not all(v > best * (1 + tolerance) for _, v in tail):
        return None
    before = _finite([v for s, v in losses if s <= best_step])
    after = _finite([v for s, v in losses if s > best_step])
    if not before or not after or sum(after) / len(after) >= sum(before) / len(before):
        return None
    return f"validation loss {tail[-1][1]:.4g} at step {tail[-1][0]} is above its best {best:.4g} (step " \
           f"{best_step}) for {patience} evaluations while the training loss kept falling"


def sample_problem(pixels: "Any", training_hashes: Sequence[tuple[str, int]] = (), copy_bits: int = COPY_BITS
                   ) -> Optional[tuple[str, str]]:
    """(kind, message) for a collapsed sample: NaN or all black (NaN latents decode to black), one colour, or a
    near copy of a training image (the dataset check's colour dHash, `lora_core.dataset.check.colour_dhash`)."""
    import numpy as np
    from PIL import Image

    from .dataset.check import colour_dhash, hash_distance

    array = np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(array).all() or float(array.max(initial=0.0)) <= 1.0:
        return "sample_nan", "the sample is NaN or all black"
    if float(array.reshape(-1, array.shape[-1] if array.ndim == 3 else 1).std(axis=0).max()) < FLAT_STD:
        return "sample_flat", "the sample is a single flat colour"
    if training_hashes:
        image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(array.clip(0, 255).astype("uint8"))
        h = colour_dhash(image)
        name, distance = min(((n, hash_distance(h, t)) for n, t in training_hashes), key=lambda x: x[1])
        if distance <= copy_bits:
            return "sample_copy", f"the sample is nearly identical to the training image {name} " \
                                  f"({distance} hash bits differ)"
    return None


def image_hashes(paths: Sequence[Path]) -> list[tuple[str, int]]:
    """(name, colour dHash) of each training image, upright, for `sample_problem`'s copy check."""
    from PIL import Image

    from .dataset.check import colour_dhash
    from .dataset.scan import upright_rgb

    found = []
    for path in paths:
        try:
            with Image.open(path) as im:
                found.append((Path(path).name, colour_dhash(upright_rgb(im))))
        except Exception:  # a file the trainer skipped is not something a sample can copy
            continue
    return found


# ---- the monitor the loop feeds -----------------------------------------------------------------------------------
class HealthMonitor:
    """Collects the loop's numbers and returns new `HealthWarning`s; decides an early stop for ``stop_on``.

    ``observe_step`` keeps the gradient norm as given (a tensor is fine) and runs the loss/gradient detectors every
    `CHECK_EVERY` steps, reading the kept norms in one go. A kind already reported stays quiet until it clears.
    """

    def __init__(self, stop_on: Sequence[str] = (), check_every: int = CHECK_EVERY):
        self.stop_on = tuple(stop_on)
        self.check_every = max(1, check_every)
        self.losses: list[tuple[int, float]] = []
        self.norms: list[float] = []
        self._pending_norms: list[Any] = []
        self.evals: list[tuple[int, float]] = []
        self.active: set[str] = set()  # kinds reported and not yet cleared
        self.warnings: list[HealthWarning] = []
        self.stop_reason: Optional[HealthWarning] = None
        self.training_hashes: list[tuple[str, int]] = []

    @property
    def best_eval(self) -> Optional[tuple[int, float]]:
        """(step, validation loss) of the lowest validation loss so far."""
        good = [(s, v) for s, v in self.evals if v is not None and math.isfinite(v)]
        return min(good, key=lambda e: (e[1], e[0])) if good else None

    def _report(self, kind: str, step: int, message: Optional[str], value: Optional[float] = None,
                **extra: Any) -> list[HealthWarning]:
        if message is None:
            self.active.discard(kind)
            return []
        if kind in self.active:
            return []
        self.active.add(kind)
        warning = HealthWarning(kind, step, message, ADVICE[kind], value, extra)
        self.warnings.append(warning)
        if kind in self.stop_on and self.stop_reason is None:
            self.stop_reason = warning
        return [warning]

    def observe_step(self, step: int, loss: float, grad_norm: Any = None) -> list[HealthWarning]:
        self.losses.append((step, loss))
        if grad_norm is not None:
            self._pending_norms.append(grad_norm)
        if step % self.check_every:
            return []
        return self.check(step)

    def _read_norms(self) -> None:
        """One host read for every norm kept since the last check (tensors stacked, then ``tolist``)."""
        if not self._pending_norms:
            return
        pending, self._pending_norms = self._pending_norms, []
        if hasattr(pending[0], "detach"):
            import torch

            values = torch.stack([p.detach().float().reshape(()) for p in pending]).cpu().tolist()
        else:
            values = [float(p) for p in pending]
        self.norms.extend(values)

    def check(self, step: int) -> list[HealthWarning]:
        """Run the loss and gradient detectors now (the loop calls it every `check_every` steps and at the end)."""
        self._read_norms()
        losses = [v for _, v in self.losses]
        found = self._report("loss_spike", step, loss_spike(losses))
        flat = plateau(losses)
        if flat is None and "plateau" in self.active and plateau(losses, sigmas=4.0) is not None:
            flat = "still flat"  # not clearly falling yet: stays reported, not reported again
        found += self._report("plateau", step, flat)
        explosion = None
        # the norms since the last check: the worst one is what a check reports
        for i in range(max(1, len(self.norms) - self.check_every + 1), len(self.norms) + 1):
            explosion = grad_explosion(self.norms[:i]) or explosion
        found += self._report("grad_explosion", step, explosion[0] if explosion else None,
                              explosion[1] if explosion else None)
        return found

    def observe_eval(self, step: int, eval_loss: Optional[float]) -> list[HealthWarning]:
        if eval_loss is None:
            return []
        self.evals.append((step, float(eval_loss)))
        return self._report("overfit", step, overfitting(self.evals, self.losses), eval_loss,
                            best_step=self.best_eval[0] if self.best_eval else None)

    def observe_samples(self, step: int, paths: Sequence[Path]) -> list[HealthWarning]:
        """Check each saved sample picture (other files, e.g. text completions, are skipped)."""
        from PIL import Image

        found: list[HealthWarning] = []
        seen: set[str] = set()
        for path in paths:
            if Path(path).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
                continue
            with Image.open(path) as im:
                problem = sample_problem(im.convert("RGB"), self.training_hashes)
            if problem and problem[0] not in seen:
                seen.add(problem[0])
                self.active.discard(problem[0])  # samples are judged afresh each time they are rendered
                found += self._report(problem[0], step, f"{problem[1]} ({Path(path).name})", path=str(path))
        return found
