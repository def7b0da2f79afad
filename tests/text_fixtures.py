"""Shared pieces of the text-LoRA tests: a tiny LLaMA built once per session and configs pointing at it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_core.config import TrainConfig, config_from_dict
from lora_core.text.tiny import build_tiny_llama, write_tiny_instruction_set


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def text_config(tmp_path: Path, base: Path, data: Path | None = None, **settings) -> TrainConfig:
    """A text-generation config on the tiny model; ``settings`` are flat config keys."""
    data = data or write_tiny_instruction_set(tmp_path / "train.jsonl")
    raw = {"task_type": "text-generation", "base_model": str(base), "train_data_file": str(data),
           "output_dir": str(tmp_path / "out"), "output_name": "tiny-adapter", "max_seq_length": 64,
           "target_modules": "all-linear", "learning_rate": 1e-2, **settings}
    return config_from_dict(raw)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def perturb_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every LoRA B matrix random values, standing in for training, so the adapter really changes outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
