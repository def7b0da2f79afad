"""Continue training from an existing LoRA (``model.network_weights``): ours or anyone's, kohya-named or peft.

Why the file decides the layers: a LoRA made elsewhere (sd-scripts adapts whole transformer blocks, ff layers and
projections included) must be continued on exactly the layers it has, or the continued file would silently drop
part of what was learnt. So the adapted layers are the file's; ``dim_from_weights: true`` also takes the network type,
rank and alpha from it, and without it they must agree with the config — a mismatch is an error naming the field.
A file for another family (an SDXL LoRA on an SD1 model) or of another adapter type is refused by name.

What is restored: every adapter tensor (LoRA up/down, LoHa/LoKr factors, DoRA magnitudes), rank, alpha and type. What
is not: the optimizer state, the LR schedule position, the step counter and the data order — the run starts at step 0
with a fresh optimizer (use ``training.resume_from_checkpoint`` for an exact resume of an interrupted run).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import InputError
from .adapters import LYCORIS_CHILD, AdapterSpec, add_network, load_adapter_state
from .export import FAMILY_PREFIXES, PEFT_PARTS, file_module_names

log = logging.getLogger(__name__)

FIELD = "model.network_weights"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
TYPE_NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}


@dataclass
class NetworkFile:
    """What a LoRA file holds, per component: module path or file name → its parts (file part names)."""
    path: Path
    format: str  # kohya | peft
    modules: dict[str, dict[str, dict[str, torch.Tensor]]]  # component → module → part → tensor
    metadata: dict[str, str] = field(default_factory=dict)
    sdxl: Optional[bool] = None  # None: cannot tell from the names (peft files)
    peft_alpha: Optional[float] = None

    @property
    def parts(self) -> set[str]:
        return {p for comp in self.modules.values() for parts in comp.values() for p in parts}

    @property
    def algo(self) -> str:
        parts = self.parts
        return "loha" if any(p.startswith("hada_") for p in parts) else \
            "lokr" if any(p.startswith("lokr_") for p in parts) else "lora"

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.parts

    def has_conv(self) -> bool:
        return any(_is_conv(parts) for comp in self.modules.values() for parts in comp.values())

    @property
    def network_type(self) -> str:
        if self.algo != "lora":
            return self.algo
        return "locon" if self.has_conv() else ("dora" if self.dora else "lora")

    def describe(self) -> str:
        kind = TYPE_NAMES[self.network_type] + (" with DoRA" if self.dora and self.network_type != "dora" else "")
        return f"{self.path.name} is a {kind}"


def _is_conv(parts: dict[str, torch.Tensor]) -> bool:
    down = parts.get("lora_down.weight")
    if down is not None:
        return down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    for name in ("hada_w1_b", "lokr_w2", "lokr_w2_b"):
        value = parts.get(name)
        if value is not None and value.dim() == 4:
            return True
    return False


def _rank(parts: dict[str, torch.Tensor]) -> Optional[int]:
    for name, axis in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0)):
        if name in parts:
            return int(parts[name].shape[axis])
    return None  # a LoKr of two full matrices has no rank


def read_network_file(path: str | Path) -> NetworkFile:
    """Read a kohya ``.safetensors`` LoRA, a diffusers ``pytorch_lora_weights.safetensors`` or a peft adapter
    folder; anything else is an error naming the field and the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    config_alpha = None
    if path.is_dir():
        found = [path / n for n in DIFFUSERS_FILES if (path / n).is_file()]
        if not found:
            raise InputError(f"{FIELD}: {path} holds no {' or '.join(DIFFUSERS_FILES)}")
        if (path / "adapter_config.json").is_file():
            config_alpha = json.loads((path / "adapter_config.json").read_text()).get("lora_alpha")
        path = found[0]
    if path.suffix != ".safetensors":
        raise InputError(f"{FIELD}: {path.name} is not a .safetensors LoRA (pickle files are not read)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"{FIELD}: cannot read {path.name} as safetensors: {e}") from None
    if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors):
        return _kohya(path, tensors, metadata)
    if any(".lora_A." in k for k in tensors):
        return _peft(path, tensors, metadata, config_alpha)
    raise InputError(f"{FIELD}: {path.name} holds no LoRA weights this trainer knows (kohya lora_unet_/lora_te "
                     f"keys or peft lora_A/lora_B keys); first keys: {sorted(tensors)[:3]}")


def _kohya(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> NetworkFile:
    modules: dict[str, dict[str, dict[str, torch.Tensor]]] = {c: {} for c in COMPONENTS}
    sdxl = any(k.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in k or "_output_blocks_" in k
               or "_middle_block_" in k for k in tensors)
    component = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                 "lora_te2": "text_encoder_2"}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        prefix = next((p for p in ("lora_unet", "lora_te1", "lora_te2", "lora_te") if name.startswith(p + "_")), None)
        if prefix is None or not part:
            raise InputError(f"{FIELD}: {path.name}: key {key!r} is not kohya-named (lora_unet_…/lora_te…_)")
        modules[component[prefix]].setdefault(name, {})[part] = value.float()
    return NetworkFile(path, "kohya", modules, metadata, sdxl)


def _peft(path: Path, tensors: dict[str, torch.Tensor], metadata: dict, config_alpha) -> NetworkFile:
    modules: dict[str, dict[str, dict[str, torch.Tensor]]] = {c: {} for c in COMPONENTS}
    alpha = config_alpha
    if alpha is None and metadata.get("lora_adapter_metadata"):  # diffusers keeps peft's config here
        meta = json.loads(metadata["lora_adapter_metadata"])
        alpha = next((v for k, v in meta.items() if k.endswith("lora_alpha")), None)
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        comp = head if head in COMPONENTS else "unet"
        body = rest if head in COMPONENTS else key
        body = body.removeprefix("base_model.model.")
        for part in ("lora_A.weight", "lora_B.weight"):
            if body.endswith("." + part):
                kohya_part = "lora_down.weight" if part == "lora_A.weight" else "lora_up.weight"
                modules[comp].setdefault(body[: -len(part) - 1], {})[kohya_part] = value.float()
                break
        else:
            raise InputError(f"{FIELD}: {path.name}: key {key!r} is not a peft lora_A/lora_B weight")
    return NetworkFile(path, "peft", modules, metadata, None, float(alpha) if alpha is not None else None)


def _alpha(nf: NetworkFile, parts: dict[str, torch.Tensor], rank: Optional[int]) -> float:
    if "alpha" in parts:
        return float(parts["alpha"])
    if nf.peft_alpha is not None:
        return nf.peft_alpha
    return float(rank or 1)  # no alpha in the file: the loaders use scale 1, which is alpha = rank


def _lokr_factor(nf: NetworkFile, shapes: dict[str, tuple[int, int]]) -> int:
    """The ``factor`` LyCORIS built the file with: from its metadata, else the one whose factorisation gives every
    module's ``lokr_w1`` shape."""
    from lycoris.modules import factorization

    args = json.loads(nf.metadata.get("ss_network_args") or "{}")
    if "factor" in args:
        return int(args["factor"])
    for factor in [-1] + list(range(1, 65)):
        if all((factorization(out, factor)[0], factorization(inp, factor)[0]) == tuple(w1)
               for (out, inp), w1 in shapes.items()):
            return factor
    raise InputError(f"{FIELD}: cannot tell the LoKr factor of {nf.path.name}; set model.lokr_factor")


def spec_from_file(nf: NetworkFile, m, w1_shapes: dict[tuple[int, int], tuple], linear: list[dict],
                   conv: list[dict]) -> AdapterSpec:
    """The adapter the file holds, checked against the config (or taken from the file with ``dim_from_weights``).
    ``w1_shapes``: base layer (out, in) → the file's LoKr ``w1`` shape there, to find the LoKr factor; ``linear``
    and ``conv``: the file's modules on Linear (and 1x1 conv) layers and on k×k convolutions."""
    first = linear[0] if linear else conv[0]
    rank = _rank(first) or int(float(nf.metadata.get("ss_network_dim") or m.lora_rank))  # full LoKr: no factor says it
    alpha = _alpha(nf, first, _rank(first))
    conv_rank = (_rank(conv[0]) or rank) if conv else 0
    conv_alpha = _alpha(nf, conv[0], _rank(conv[0])) if conv else 0.0
    factor = _lokr_factor(nf, w1_shapes) if nf.algo == "lokr" and m.dim_from_weights else m.lokr_factor
    file_type = nf.algo if nf.algo != "lora" else ("locon" if conv else ("dora" if nf.dora else "lora"))
    spec = AdapterSpec(file_type, rank, alpha, m.dropout, conv_rank, conv_alpha,
                       nf.dora and file_type != "dora", factor)
    if m.dim_from_weights:
        log.info("continuing %s: rank %d, alpha %g, conv rank %d (from the file)", nf.describe(), rank, alpha,
                 conv_rank)
        return spec
    wanted = AdapterSpec.from_model_config(m)
    if (wanted.algo, wanted.dora) != (spec.algo, spec.dora):
        raise InputError(f"model.network_type: {m.network_type}{' with use_dora' if m.use_dora else ''}, but "
                         f"{FIELD} {nf.describe()}; set model.network_type: {file_type}"
                         f"{' and use_dora: true' if spec.use_dora else ''}, or dim_from_weights: true")
    if linear and _rank(first) is not None and rank != m.lora_rank:
        raise InputError(f"model.lora_rank: {m.lora_rank}, but {nf.path.name} has rank {rank}; set lora_rank: "
                         f"{rank} or dim_from_weights: true")
    if abs(alpha - wanted.alpha) > 1e-6 * max(1.0, alpha) and _rank(first) is not None:
        raise InputError(f"model.alpha: {wanted.alpha:g}, but {nf.path.name} has alpha {alpha:g}; set alpha: "
                         f"{alpha:g} or dim_from_weights: true")
    return AdapterSpec(file_type, rank, alpha, m.dropout, conv_rank, conv_alpha, spec.use_dora, m.lokr_factor)


def _w1_shapes(chosen: dict[str, dict[str, dict[str, torch.Tensor]]], parts: dict) -> dict[tuple[int, int], tuple]:
    out = {}
    for comp, mods in chosen.items():
        for path, p in mods.items():
            if "lokr_w1" not in p and "lokr_w1_a" not in p:
                continue
            w = parts[comp].get_submodule(path).weight
            w1 = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
            out[(w.shape[0], w.shape[1])] = tuple(w1)
    return out


def _layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def continue_from(model, cfg) -> tuple[AdapterSpec, list[str]]:
    """Add the file's adapter to the UNet (and text encoders) of ``model`` (an `SDModel`) and load its tensors;
    returns the spec and the adapted text-encoder layers (empty when the text encoder is not trained)."""
    m = cfg.model
    nf = read_network_file(m.network_weights)
    family = model.family
    if nf.sdxl is not None and nf.sdxl != (family == "sdxl"):
        file_family = "an SDXL" if nf.sdxl else "an SD1/SD2"
        raise InputError(f"{FIELD}: {nf.path.name} is {file_family} LoRA (its keys say so) but the base model is "
                         f"{family}; continue it on a base model of its own family")
    version = nf.metadata.get("ss_base_model_version")
    if version and family != "sdxl" and version.startswith(("sd_v1", "sd_v2")) and \
            version.split("_")[1][:2] != model.base_model_version.split("_")[1][:2]:
        raise InputError(f"{FIELD}: {nf.path.name} was trained on {version} but the base model is "
                         f"{model.base_model_version}")
    prefixes = FAMILY_PREFIXES["sdxl" if family == "sdxl" else "sd1"]
    encoders = {"text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
    parts = {"unet": model.unet, **{k: v for k, v in encoders.items() if v is not None}}
    if any(nf.modules.get(c) for c in encoders) and not m.train_text_encoder:
        raise InputError(f"model.train_text_encoder: {nf.path.name} has text-encoder weights; set "
                         f"train_text_encoder: true to continue them (they would be dropped from the new file)")
    # file module name → (component, layer path)
    where: dict[str, tuple[str, str]] = {}
    for comp, prefix in zip(COMPONENTS, prefixes + ("",) * (3 - len(prefixes))):
        if comp not in parts or not prefix:
            continue
        layers = _layers(parts[comp])
        if nf.format == "kohya":
            names = file_module_names(family, prefix, layers, model.unet.config if comp == "unet" else None)
            where.update({file_name: (comp, path) for path, file_name in names.items()})
        else:
            where.update({path: (comp, path) for path in layers if path in nf.modules.get(comp, {})})
    chosen: dict[str, dict[str, dict[str, torch.Tensor]]] = {c: {} for c in COMPONENTS}
    for comp, mods in nf.modules.items():
        for name, p in mods.items():
            if name not in where or where[name][0] != comp:
                raise InputError(f"{FIELD}: {nf.path.name}: {name} matches no layer of this {family} model "
                                 f"(a LoRA for another model?)")
            chosen[comp][where[name][1]] = p
    def is_conv(comp: str, path: str) -> bool:  # the layer decides: a LoHa conv's factors are 2-D in the file
        layer = parts[comp].get_submodule(path)
        return isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)

    conv_parts = [p for comp, mods in chosen.items() for path, p in mods.items() if is_conv(comp, path)]
    linear_parts = [p for comp, mods in chosen.items() for path, p in mods.items() if not is_conv(comp, path)]
    spec = spec_from_file(nf, m, _w1_shapes(chosen, parts), linear_parts, conv_parts)
    te_targets: list[str] = []
    for comp, mods in chosen.items():
        if comp not in parts:
            continue
        module = parts[comp]
        if not mods:
            if comp != "unet" and m.train_text_encoder:  # a text encoder the file does not cover starts fresh
                te_targets += add_network(module, spec, m.text_encoder_target_modules,
                                          field="model.text_encoder_target_modules", conv=False)
            continue
        convs = [p for p in mods if is_conv(comp, p)]
        linear = [p for p in mods if p not in convs]
        names = add_network(module, spec, linear, field=FIELD, conv=bool(convs), conv_names=convs)
        if comp != "unet":
            te_targets += names
        load_adapter_state(module, _internal(mods, spec))
    log.info("continuing from %s (%d layers)", nf.path, sum(len(v) for v in chosen.values()))
    return spec, te_targets


def _internal(mods: dict[str, dict[str, torch.Tensor]], spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """File parts → the training implementation's parameter names (alpha is a setting, not a tensor to load)."""
    out = {}
    for path, parts in mods.items():
        for part, value in parts.items():
            if part == "alpha":
                continue
            if spec.backend == "peft":
                out[f"{path}.{PEFT_PARTS[part]}"] = value
            else:
                out[f"{path}.{LYCORIS_CHILD}.{part}"] = value
    return out
