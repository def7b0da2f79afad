"""Add peft LoRA layers to a model with its base weights frozen, and move LoRA weights in and out of it.

Targets are module-name suffixes (``to_q``, ``to_out.0``, ``q_proj``); a target that matches nothing in the model is
an error naming it, because a silently ignored target means a LoRA that learns nothing where the user expects it to.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from ..errors import InputError

ADAPTER = "default"


class LoraTargetError(InputError):
    pass


def match_targets(model: torch.nn.Module, targets: list[str], field: str = "model.unet_target_modules") -> list[str]:
    """Names of the Linear/Conv layers whose names end with a target; a target matching nothing is an error."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    matched: list[str] = []
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise LoraTargetError(f"{field}: {target!r} matches no Linear/Conv layer of the model "
                                  f"(examples of layer names: {', '.join(sorted({n.split('.')[-1] for n in names})[:12])})")
        matched.extend(h for h in hits if h not in matched)
    return matched


def add_lora(model: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float,
             field: str = "model.unet_target_modules", conv_names: Sequence[str] = (), conv_rank: int = 0,
             conv_alpha: float = 0.0) -> list[str]:
    """Freeze ``model`` and inject LoRA into the Linear/Conv layers whose names end with a target; returns their names.

    ``conv_names`` (LoCon) are full layer names that get their own rank and alpha, as sd-scripts' ``conv_dim``."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    matched = match_targets(model, targets, field)
    conv_names = [n for n in conv_names if n not in matched]
    patterns = {re.escape(n): conv_rank for n in conv_names}
    alphas = {re.escape(n): conv_alpha for n in conv_names}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets) + [n for n in conv_names], rank_pattern=patterns,
                        alpha_pattern=alphas, init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    _full_precision_init(model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return sorted(set(matched) | set(conv_names))


def _full_precision_init(model: torch.nn.Module) -> None:
    """LoRA weights are what the optimizer updates, so they live in fp32 whatever the base weights' dtype. peft
    creates them in the base layer's dtype (bf16/fp16 when the model is loaded in its training dtype), which would
    round the initial A matrix: each layer's LoRA is cast to fp32 and initialised again there, so a bf16 run starts
    from the LoRA an fp32 run of the same seed starts from."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            module.lora_A[ADAPTER].float()
            module.lora_B[ADAPTER].float()
            module.reset_lora_parameters(ADAPTER, True)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft-named LoRA weights (``<module>.lora_A.weight``) of a model, detached fp32 copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(_unwrap(model), adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(_unwrap(model), state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint has LoRA weights this model does not: {unexpected[:3]}")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
