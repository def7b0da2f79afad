"""Load a causal language model from a local Hugging Face folder and wrap it in a peft LoRA.

Only local folders are read (``local_files_only``): the engine never downloads. 4-/8-bit loading (QLoRA) needs
bitsandbytes and a CUDA GPU; asking for it without them is a config error naming the field, not a silent fallback
to a model that does not fit in memory.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local model folder, with a pad token (the EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        log.debug("tokenizer load failed", exc_info=e)
        raise ConfigError([f"model.base_model: no usable tokenizer in {path} (a Hugging Face model folder has "
                           f"tokenizer.json or tokenizer_config.json beside config.json)"]) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError([f"model.base_model: the tokenizer in {path} has neither a pad nor an EOS token"])
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def base_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Half-precision base weights on a GPU when mixed precision is on (half the memory); float32 on the CPU."""
    if device.type == "cuda" and cfg.training.mixed_precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and cfg.training.mixed_precision == "fp16":
        return torch.float16
    return torch.float32


def quantization_config(cfg: TrainConfig, device: torch.device) -> Optional[Any]:
    """The bitsandbytes settings for ``load_in_4bit``/``load_in_8bit``, or None; refuses where it cannot work."""
    m = cfg.model
    if not (m.load_in_4bit or m.load_in_8bit):
        return None
    field = "model.load_in_4bit" if m.load_in_4bit else "model.load_in_8bit"
    if device.type != "cuda":
        raise ConfigError([f"{field}: quantized loading needs a CUDA GPU, but training runs on {device.type}"])
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError([f"{field}: quantized loading needs the bitsandbytes package (pip install bitsandbytes)"])
    from transformers import BitsAndBytesConfig

    if m.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if cfg.training.mixed_precision == "bf16" else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_base_model(path: str | Path, dtype: torch.dtype = torch.float32, quantization: Optional[Any] = None,
                    device: Optional[torch.device] = None) -> torch.nn.Module:
    """A causal LM from a local folder, frozen, on ``device``."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": (device.index or 0) if device is not None else 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError([f"model.base_model: cannot load a causal language model from {path}: {e}"]) from None
    if quantization is None and device is not None:
        model.to(device)
    model.requires_grad_(False)
    return model


def lora_target_modules(names: list[str]) -> str | list[str]:
    """peft wants the string "all-linear" itself, not a one-element list."""
    return ALL_LINEAR if names == [ALL_LINEAR] else list(names)


def adapter_config(cfg: TrainConfig) -> Any:
    """The peft config for ``model.network_type``: LoRA, DoRA (peft's ``use_dora``, loaded by ``PeftModel`` with the
    same maths it trained with), LoHa or LoKr. For text the consumer of the file is peft itself, so peft's own
    implementations are the ones to train with (the image side trains LyCORIS for A1111/ComfyUI instead)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    m = cfg.model
    alpha = m.alpha if m.alpha is not None else m.lora_rank
    targets = lora_target_modules(m.target_modules)
    if m.network_type == "loha":
        return LoHaConfig(r=m.lora_rank, alpha=alpha, module_dropout=m.dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
    if m.network_type == "lokr":
        return LoKrConfig(r=m.lora_rank, alpha=alpha, module_dropout=m.dropout, target_modules=targets,
                          decompose_factor=m.lokr_factor, task_type="CAUSAL_LM")
    return LoraConfig(r=m.lora_rank, lora_alpha=alpha, lora_dropout=m.dropout, target_modules=targets,
                      use_dora=m.use_dora or m.network_type == "dora", task_type="CAUSAL_LM", bias="none")


def add_lora(model: torch.nn.Module, cfg: TrainConfig) -> Any:
    """Wrap ``model`` in a peft adapter per the config; the base stays frozen, the adapter weights are float32."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    m = cfg.model
    if m.load_in_4bit or m.load_in_8bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    lora = adapter_config(cfg)
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError([f"model.target_modules: {e}"]) from None
    if cfg.training.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("%s rank %d on %s: %d trainable parameters", m.network_type, m.lora_rank, lora.target_modules,
             trainable)
    return peft_model
