"""The contract between the one training loop (`lora_core.loop`) and a kind of run (images or text).

The loop owns everything that is the same for every run: accelerate, optimizer, LR schedule, gradient accumulation,
exact checkpoints and resume, stop = save, OOM handling, progress, events and TensorBoard. A task owns what
differs: which model, which LoRA targets, which data, which loss, and what file the user gets at the end.

`ImageTask` and `TextTask` satisfy it structurally (no base class); the loop is typed with it, and
tests/test_loop_parts.py checks both with ``isinstance`` (the protocol is runtime-checkable).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainingTask(Protocol):
    kind: str  # "image" or "text"
    # written by the loop before the first step (a task declares both in __init__): the run's start time and length,
    # which exported files record in their metadata
    started_at: float
    total_steps: int

    def setup(self, accelerator: Any) -> None:
        """Load the base model from a local path, add the LoRA (base weights frozen), scan and cache the data."""

    def dataset_summary(self) -> Optional[dict]:
        """The ``dataset`` event's fields (counts, skipped and duplicate files), or None when there is nothing to say."""

    def num_examples(self) -> int:
        """How many examples one epoch visits (repeats included): sizes the epoch."""

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The batches of one epoch as lists of example indices, a pure function of (seed, epoch, batch_size) so a
        resumed run replays exactly the same order. Never mixes sizes (image buckets)."""

    def collate(self, indices: list[int], epoch: int) -> Any:
        """Build the batch for these indices (deterministic in seed, epoch and index)."""

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The modules holding LoRA layers, handed to `accelerator.prepare` (DDP wraps them)."""

    def param_groups(self, learning_rate: float) -> list[dict]:
        """Optimizer parameter groups (e.g. the text encoder with its own learning rate)."""

    def loss(self, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The training loss of one micro-batch; all randomness comes from ``generator`` (saved in checkpoints)."""

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA weights (peft names) — what a checkpoint stores."""

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed LoRA weights back (resume)."""

    def export(self, path_stem: Path, step: int, epoch: int) -> Path:
        """Write the user-facing LoRA (kohya .safetensors, or a peft adapter folder) and return its path."""

    def sample(self, step: int, out_dir: Path, progress: Optional[Callable[[dict], None]] = None,
               preview: bool = False) -> list[tuple[Path, str]]:
        """Render the configured sample prompts with the current LoRA; returns (file, prompt) pairs. ``progress``
        receives ``{prompt_index, prompts, denoise_step, denoise_steps, prompt}`` as rendering goes; ``preview``
        renders the run's card picture instead (image tasks; others return nothing)."""

    def evaluate(self, step: int) -> Optional[dict]:
        """Validation metrics (text runs with a validation split), or None."""
