"""What a text run hands the user: a peft adapter folder, and optionally the base model with the LoRA merged in.

The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) loads with
``PeftModel.from_pretrained(base, folder)``; it also holds the tokenizer with the chat template used in training,
so ``python -m lora_core.text.generate`` formats prompts the way the model learnt them. Adapter weights are kept in
float32 (they are small, and rounding them would change the model's answers); the merged model keeps the base
model's own dtype. Folders are written beside the target and swapped in, so a reader never sees half a folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from ..files import atomic_path

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def write_folder_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into a fresh hidden sibling folder, then swap it in place of ``target``
    (`lora_core.files.atomic_path`)."""
    with atomic_path(target) as tmp:
        tmp.mkdir()
        write(tmp)
    return Path(target)


def save_adapter(peft_model: Any, tokenizer: Any, target: Path) -> Path:
    """Write the adapter folder for ``peft_model`` (its LoRA weights only) plus the tokenizer."""

    def write(folder: Path) -> None:
        peft_model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))

    path = write_folder_atomically(target, write)
    log.info("adapter written to %s", path)
    return path


def save_merged(base_model: str | Path, adapter: Path, target: Path) -> Path:
    """Load a fresh copy of the base (on the CPU, in its own dtype), merge the adapter in and save the whole model.

    A fresh copy, because merging rewrites the base weights and the training model must stay a LoRA model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_model), local_files_only=True, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter), local_files_only=True)

    def write(folder: Path) -> None:
        merged.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))

    path = write_folder_atomically(target, write)
    log.info("merged model (%s) written to %s", next(merged.parameters()).dtype, path)
    return path
