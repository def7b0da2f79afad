"""Adapter types for Stable Diffusion LoRAs: lora, locon, loha, lokr and dora, on the UNet and text encoders.

Which implementation trains which type, and why:

* ``lora`` and ``locon`` (no DoRA) are peft LoRA layers (`lora_core.image.lora`): kohya LoRA is exactly peft's
  maths, and locon only adds the 3×3 convolutions of the ResNet/Down/Upsample blocks with their own rank and alpha
  (sd-scripts' ``conv_dim``/``conv_alpha``).
* ``loha``, ``lokr`` and anything with DoRA are LyCORIS modules (the ``lycoris-lora`` package, the reference
  implementation kohya_ss trains with). The files are read by A1111's ``network_hada``/``network_lokr``/``network``
  and ComfyUI's ``weight_adapter`` code, which were written against LyCORIS's maths. peft has LoHa/LoKr too, but its
  DoRA normalises each output row, while A1111 only knows the per-input-column magnitude (``dora_scale`` of shape
  ``(1, in)``) — a peft DoRA file would load there as noise. LyCORIS trains with ``wd_on_out=False``, the
  convention both A1111 and ComfyUI apply.

A LyCORIS module is registered as the child ``lycoris`` of the layer it adapts, so its parameters live inside the
UNet (``<layer>.lycoris.hada_w1_a``): accelerate, DDP and gradient checkpointing see them like peft's. This module
names no file keys: `export_modules` hands the exporter each layer's tensors under the implementation's own part
names, and `lora_core.image.export` maps those to the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

from .lora import ADAPTER, add_lora, match_targets

LYCORIS_CHILD = "lycoris"
ALGOS = {"lora": "lora", "dora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")


@dataclass(frozen=True)
class AdapterSpec:
    """What to add to each targeted layer. ``conv_rank`` 0 means the convolutions get nothing."""
    network_type: str = "lora"
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    conv_rank: int = 0
    conv_alpha: float = 0.0
    use_dora: bool = False
    lokr_factor: int = -1

    @classmethod
    def from_model_config(cls, m) -> "AdapterSpec":
        alpha = m.alpha if m.alpha is not None else float(m.lora_rank)
        conv = m.network_type in ("locon", "loha", "lokr")
        conv_rank = (m.conv_rank if m.conv_rank is not None else m.lora_rank) if conv else 0
        conv_alpha = m.conv_alpha if m.conv_alpha is not None else float(conv_rank)
        return cls(m.network_type, m.lora_rank, float(alpha), m.dropout, conv_rank, float(conv_alpha),
                   m.use_dora, m.lokr_factor)

    @property
    def algo(self) -> str:
        return ALGOS[self.network_type]

    @property
    def dora(self) -> bool:
        return self.use_dora or self.network_type == "dora"

    @property
    def backend(self) -> str:
        return "peft" if self.algo == "lora" and not self.dora else "lycoris"

    @property
    def network_module(self) -> str:
        """``ss_network_module`` as the trainers that make such files write it."""
        return "networks.lora" if self.backend == "peft" else "lycoris.kohya"

    def network_args(self) -> Optional[dict]:
        """``ss_network_args`` (strings, as sd-scripts stores its ``--network_args``), or None for plain LoRA."""
        args: dict = {}
        if self.backend == "lycoris":
            args["algo"] = {"lora": "locon"}.get(self.algo, self.algo)
        if self.conv_rank:
            args.update(conv_dim=str(self.conv_rank), conv_alpha=str(self.conv_alpha))
        if self.dora:
            args.update(dora_wd="True", wd_on_output="False")
        if self.algo == "lokr":
            args["factor"] = str(self.lokr_factor)
        if self.dropout and self.backend == "lycoris":
            args["dropout"] = str(self.dropout)
        return args or None

    def metadata_json(self) -> Optional[str]:
        args = self.network_args()
        return json.dumps(args) if args else None


def conv_layer_names(model: torch.nn.Module) -> list[str]:
    """The k×k (k > 1) convolutions of ResNet, Downsample and Upsample blocks — what LoCon/LyCORIS adapt besides
    the attention layers (not conv_in/conv_out, as sd-scripts leaves them too)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) and any(b in f".{n}" for b in CONV_BLOCKS)]


def add_network(model: torch.nn.Module, spec: AdapterSpec, targets: list[str],
                field: str = "model.unet_target_modules", conv: bool = True,
                conv_names: Optional[list[str]] = None) -> list[str]:
    """Freeze ``model`` and add the adapter to the targeted layers (and, when ``conv`` and ``spec.conv_rank``, the
    block convolutions, or exactly ``conv_names``); returns the adapted layer names. Draws its initial weights from
    torch's global RNG."""
    model.requires_grad_(False)
    names = match_targets(model, targets, field) if targets else []
    if conv_names is None:
        conv_names = conv_layer_names(model) if conv and spec.conv_rank else []
    convs = [n for n in conv_names if n not in names]
    if spec.backend == "peft":
        add_lora(model, names, spec.rank, spec.alpha, spec.dropout, field=field, conv_names=convs,
                 conv_rank=spec.conv_rank, conv_alpha=spec.conv_alpha)
        return sorted(names + convs)
    _add_lycoris(model, spec, names, rank=spec.rank, alpha=spec.alpha)
    if convs:
        _add_lycoris(model, spec, convs, rank=spec.conv_rank, alpha=spec.conv_alpha)
    return sorted(names + convs)


def _add_lycoris(model: torch.nn.Module, spec: AdapterSpec, names: list[str], rank: int, alpha: float) -> None:
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    cls = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[spec.algo]
    extra = {"factor": spec.lokr_factor} if spec.algo == "lokr" else {}
    for name in names:
        layer = model.get_submodule(name)
        if hasattr(layer, LYCORIS_CHILD):
            continue
        module = cls(name.replace(".", "_"), layer, multiplier=1.0, lora_dim=rank, alpha=alpha,
                     dropout=spec.dropout, weight_decompose=spec.dora, wd_on_out=False, **extra)
        module.apply_to()
        layer.add_module(LYCORIS_CHILD, module)
        for p in module.parameters():
            p.requires_grad_(True)


def is_adapter_param(name: str) -> bool:
    """True for the trainable adapter tensors (peft ``.lora_*`` or LyCORIS ``.lycoris.*``), by parameter name."""
    return ".lora_" in name or f".{LYCORIS_CHILD}." in name


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_adapter_param(n) and p.requires_grad]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _lycoris_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: getattr(m, LYCORIS_CHILD) for n, m in _unwrap(model).named_modules()
            if isinstance(getattr(m, LYCORIS_CHILD, None), torch.nn.Module) and not n.endswith(LYCORIS_CHILD)}


def _has_peft(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in _unwrap(model).modules())


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable adapter tensor by parameter name (peft ``<layer>.lora_A.weight``, LyCORIS
    ``<layer>.lycoris.<part>``), detached fp32 copies: what checkpoints store."""
    from .lora import lora_state

    state = lora_state(model) if _has_peft(model) else {}
    for name, param in _unwrap(model).named_parameters():
        if f".{LYCORIS_CHILD}." in name:
            state[name] = param.detach().float().cpu().contiguous()
    return state


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `adapter_state` tensors back; a tensor the model has no place for is an error naming it."""
    from .lora import load_lora_state

    lyc = {k: v for k, v in state.items() if f".{LYCORIS_CHILD}." in k}
    rest = {k: v for k, v in state.items() if k not in lyc}
    if rest:
        load_lora_state(model, rest)
    params = dict(_unwrap(model).named_parameters())
    unknown = [k for k in lyc if k not in params]
    if unknown:
        raise ValueError(f"the weights have adapter tensors this model does not: {unknown[:3]}")
    with torch.no_grad():
        for key, value in lyc.items():
            if params[key].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit this model's "
                                 f"{tuple(params[key].shape)} (another rank or network type?)")
            params[key].copy_(value.to(params[key].dtype))


def export_modules(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapted layer → its tensors under the implementation's part names, alpha included (peft:
    ``lora_A.weight``/``lora_B.weight``; LyCORIS: its own ``custom_state_dict`` names such as ``hada_w1_a``,
    ``lokr_w1``, ``dora_scale``). Detached fp32 CPU copies, for `lora_core.image.export` to name."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    if _has_peft(model):
        from peft.tuners.lora import LoraLayer

        for name, layer in _unwrap(model).named_modules():
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
                out[name] = {"lora_A.weight": layer.lora_A[ADAPTER].weight, "lora_B.weight": layer.lora_B[ADAPTER].weight,
                             "alpha": torch.tensor(float(layer.lora_alpha[ADAPTER]))}
    for name, module in _lycoris_layers(model).items():
        out[name] = dict(module.custom_state_dict())
    return {n: {k: v.detach().float().cpu().contiguous() for k, v in parts.items()} for n, parts in out.items()}


def set_multiplier(model: torch.nn.Module, multiplier: float) -> None:
    """Scale every LyCORIS module's effect (their ``multiplier``); used by tests and previews."""
    for module in _lycoris_layers(model).values():
        module.multiplier = multiplier


def place_adapters(model: torch.nn.Module, device: torch.device) -> None:
    """Move LyCORIS modules whole (their parameters and their buffers, e.g. ``scalar``) to ``device`` in fp32;
    moving only a model's parameters would leave those buffers behind on the CPU."""
    for module in _lycoris_layers(model).values():
        module.to(device=device, dtype=torch.float32)
