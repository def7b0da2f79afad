"""Read any LoRA-family file (ours, kohya sd-scripts, LyCORIS, diffusers/peft) into one per-module structure.

Every tool (inspect, merge, bake, resize, extract) works on `LoraFile`: modules keyed by their kohya name
(``lora_unet_…`` / ``lora_te…``, SDXL UNet modules in SGM naming as sd-scripts and our exporter write them), each with
its adapter type and the tensors it came with. Reading the header first (keys, shapes, metadata — no tensor data)
is what lets a tool refuse a mixed-family or not-a-LoRA input before it loads gigabytes. The errors here are the
named errors every command raises for bad input; they are `InputError`s, so entry points print them without a
traceback.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import InputError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
FAMILIES = ("sd1", "sd2", "sdxl")
# the suffixes of each adapter type's tensors (LyCORIS/kohya spelling)
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
EXTRA_PARTS = ("alpha", "dora_scale", "scale")
ALL_PARTS = LORA_PARTS + LOHA_PARTS + LOKR_PARTS + EXTRA_PARTS


class ToolError(InputError):
    """A LoRA tool refused its input; the message names the file (and module) and what to do."""


class MissingFileError(ToolError):
    pass


class PickleRefusedError(ToolError):
    pass


class NotALoraError(ToolError):
    pass


class NotABaseModelError(ToolError):
    pass


class MixedFamiliesError(ToolError):
    pass


class OutputExistsError(ToolError):
    pass


class UnsupportedAdapterError(ToolError):
    pass


def check_input(path: str | Path, what: str = "input") -> Path:
    """A file that exists and is not a pickle; folders pass (diffusers LoRA folders, diffusers base models)."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(f"{what} {path.name}: a pickle file ({path.suffix}) can run code when loaded; "
                                 f"convert it to .safetensors first")
    if not path.exists():
        raise MissingFileError(f"{what} {path}: no such file")
    return path


def check_output(path: str | Path, force: bool) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ToolError(f"--out {path.name}: the output must be a .safetensors file")
    if path.exists() and not force:
        raise OutputExistsError(f"--out {path}: already exists; pass --force to replace it")
    return path


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a hidden temp name beside ``path``; on success it is fsynced and renamed over ``path`` (a watcher
    never sees half a file), on failure removed — so a refused, crashed or cancelled command leaves nothing behind.
    The engine's one atomic-write helper (`lora_core.files.atomic_path`) does the work."""
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        yield Path(tmp)


# --------------------------------------------------------------------------------------------- headers
def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor name → {dtype, shape}, metadata) from a safetensors header without reading any tensor data."""
    import struct

    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > 100_000_000 or length > path.stat().st_size:
                raise ValueError("header length is not plausible")
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as e:
        raise ToolError(f"{path.name}: cannot read as safetensors ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in meta.items()}


def lora_weight_file(path: Path) -> Path:
    """A diffusers LoRA folder holds ``pytorch_lora_weights.safetensors``; a file is itself."""
    if path.is_dir():
        for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise NotALoraError(f"{path}: a folder without pytorch_lora_weights.safetensors or adapter_model.safetensors")
    if path.suffix.lower() != ".safetensors":
        raise ToolError(f"{path.name}: expected a .safetensors LoRA file")
    return path


def is_base_model_keys(keys: list[str]) -> bool:
    return any(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.",
                             "cond_stage_model.")) for k in keys)


# --------------------------------------------------------------------------------------------- modules
@dataclass
class Module:
    """One adapted layer: its kohya name, adapter type and tensors keyed by part (``lora_down.weight``, …)."""
    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        parts = self.tensors
        if any(p in parts for p in LOHA_PARTS):
            return "loha"
        if any(p in parts for p in LOKR_PARTS):
            return "lokr"
        if "lora_down.weight" in parts:
            down = parts["lora_down.weight"]
            return "locon" if down.ndim == 4 and down.shape[-1] > 1 else "lora"
        if "diff" in parts:
            return "full"
        return "unknown"

    @property
    def rank(self) -> Optional[int]:
        p = self.tensors
        if "lora_down.weight" in p:
            return int(p["lora_down.weight"].shape[0])
        if "hada_w1_b" in p:
            return int(p["hada_w1_b"].shape[0])
        for part in ("lokr_w1_b", "lokr_w2_b"):
            if part in p:
                return int(p[part].shape[0])
        return None

    @property
    def alpha(self) -> Optional[float]:
        a = self.tensors.get("alpha")
        return float(a.float().item()) if a is not None else None

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors

    def scale(self) -> float:
        """alpha/rank, the factor every loader applies (alpha missing means alpha = rank, as kohya's loaders do);
        LoKr with full (undecomposed) factors has scale 1 like ComfyUI/LyCORIS."""
        rank = self.rank
        if rank is None:
            return 1.0
        alpha = self.alpha
        return 1.0 if alpha is None else alpha / rank

    def delta(self, shape: Optional[torch.Size] = None, strength: float = 1.0) -> torch.Tensor:
        """The weight update at ``strength`` in fp32 (``W' = W + delta``), shaped like the layer's weight when
        ``shape`` is given (conv weights), else as the factors imply. DoRA's renormalisation is not linear in the
        update and is applied by `apply_to_weight`."""
        p = {k: v.float() for k, v in self.tensors.items()}
        kind = self.kind
        if kind in ("lora", "locon"):
            down, up = p["lora_down.weight"], p["lora_up.weight"] * (self.scale() * strength)  # scale the thin side
            if "lora_mid.weight" in p:  # LoCon Tucker: up · mid · down over the kernel
                mid = p["lora_mid.weight"]
                d = torch.einsum("i j k l, j r, i p -> p r k l", mid, down.flatten(1), up.flatten(1))
            elif down.ndim == 4:
                d = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
            else:
                d = up @ down
        elif kind == "loha":
            w1 = p["hada_w1_a"] @ p["hada_w1_b"]
            w2 = p["hada_w2_a"] @ p["hada_w2_b"]
            if "hada_t1" in p:
                w1 = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
            d = w1 * w2 * (self.scale() * strength)
        elif kind == "lokr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            if "lokr_w2" in p:
                w2 = p["lokr_w2"]
            elif "lokr_t2" in p:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
            if shape is not None and len(shape) == 4 and w2.ndim == 2:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.shape[1] % math.prod(shape[2:]) == 0 else w2
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            d = torch.kron(w1, w2) * (self.scale() * strength)
        elif kind == "full":
            d = p["diff"] * strength
        else:
            raise UnsupportedAdapterError(f"module {self.name}: no weights of a known adapter type "
                                          f"(parts {', '.join(sorted(p))})")
        if shape is not None:
            d = d.reshape(shape)
        return d

    def apply_to_weight(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """``weight`` with this module merged in at ``strength`` (fp32 maths); DoRA rescales each output row of the
        updated weight to the trained magnitude, blended with the strength like ComfyUI does."""
        w = weight.float()
        if not self.is_dora:
            return w + self.delta(w.shape, strength)
        d = self.delta(w.shape)
        merged = w + d
        scale = self.tensors["dora_scale"].float()
        norm = _dora_norm(merged, scale)
        dora = merged * (scale.reshape(norm.shape) / norm)
        return w + strength * (dora - w)


def _dora_norm(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The column or row norm of ``weight`` in the layout ``scale`` was saved in (LyCORIS: one value per output
    row, shape (out, 1, …); kohya/peft: per input column, shape (1, in))."""
    if scale.shape[0] == weight.shape[0] and scale.numel() == weight.shape[0]:
        return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.ndim - 2))


@dataclass
class LoraFile:
    path: Path
    family: str             # sd1 | sd2 | sdxl
    family_reason: str      # how the family was told (metadata key, key layout, shape)
    source_format: str      # kohya | diffusers
    metadata: dict[str, str]
    header: dict[str, dict]
    modules: dict[str, Module] = field(default_factory=dict)

    @property
    def adapter_types(self) -> list[str]:
        kinds = {m.kind for m in self.modules.values()}
        if any(m.is_dora for m in self.modules.values()):
            kinds.add("dora")
        return sorted(kinds)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


# --------------------------------------------------------------------------------------------- key names
def _split_kohya(key: str) -> Optional[tuple[str, str]]:
    for part in sorted(ALL_PARTS, key=len, reverse=True):
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return None


PEFT_PARTS = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
              ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
              ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale"}
PEFT_PREFIXES = {"unet.": "lora_unet", "transformer.": "lora_unet", "text_encoder.": "lora_te",
                 "text_encoder_2.": "lora_te2"}


def _peft_module(key: str, sdxl: bool) -> Optional[tuple[str, str, str]]:
    """``unet.down_blocks.0…to_q.lora_A.weight`` → (component, dotted module path, kohya part)."""
    for suffix, part in PEFT_PARTS.items():
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            for prefix in PEFT_PREFIXES:
                if path.startswith(prefix):
                    return prefix[:-1], path[len(prefix):], part
    return None


def _unet_layout(paths: list[str]) -> tuple[int, list[bool]]:
    """layers_per_block and which up blocks have attention, from the module paths a diffusers SDXL LoRA names
    (what `ldm_unet_name` needs); SDXL's own values when the file does not say."""
    per_block = [int(m[1]) for p in paths if (m := re.match(r"down_blocks\.\d+\.(?:attentions|resnets)\.(\d+)", p))]
    layers = max(per_block) + 1 if per_block else 2
    ups = {int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.attentions", p))}
    n_up = max([int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)", p))] + [2]) + 1
    return layers, [i in ups for i in range(n_up)] if ups else [True, True, False]


def detect_lora_family(keys: list[str], header: dict[str, dict], metadata: dict[str, str],
                       name: str) -> tuple[str, str]:
    """(family, why): the training metadata first (sd-scripts' ``ss_base_model_version``/``ss_v2``, then
    ``modelspec.architecture``), then the key layout (``lora_te1_``/``lora_te2_``/SGM ``input_blocks`` names mean
    SDXL), then the cross-attention width (768 SD1, 1024 SD2, 2048 SDXL); SD1 when nothing tells."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl", f"ss_base_model_version is {version}"
    if version.startswith("sd_v2"):
        return "sd2", f"ss_base_model_version is {version}"
    if version.startswith("sd_v1"):
        return "sd1", f"ss_base_model_version is {version}"
    arch = metadata.get("modelspec.architecture", "")
    for needle, family in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"),
                           ("stable-diffusion-v1", "sd1")):
        if arch.startswith(needle):
            return family, f"modelspec.architecture is {arch}"
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2", "ss_v2 is True"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", "it has two text encoders (lora_te1_/lora_te2_)"
    if any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"))
           for k in keys):
        return "sdxl", "its UNet modules have SGM names (input_blocks_…), as kohya writes SDXL"
    for key, info in header.items():
        if re.search(r"attn2[._]to_k\.(lora_down\.weight|lora_A\.weight|lora\.down\.weight)$", key):
            width = info["shape"][-1]
            family = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
            if family:
                return family, f"cross-attention width {width}"
    if metadata.get("ss_v2", "").lower() == "false":
        return "sd1", "ss_v2 is False"
    return "sd1", "nothing in the file says otherwise (no ss_base_model_version, SD 1.x key layout)"


def kohya_keys(keys: list[str], header: dict, metadata: dict[str, str],
               family: str) -> dict[str, tuple[str, str]]:
    """tensor name in the file → (kohya module name, part); diffusers/peft names are converted."""
    out: dict[str, tuple[str, str]] = {}
    peft = [k for k in keys if _peft_module(k, False)]
    if not peft:
        for key in keys:
            split = _split_kohya(key)
            if split and split[0].startswith(("lora_unet_", "lora_te")):
                out[key] = split
        return out
    from ..image.export import kohya_name
    from ..image.ldm_keys import ldm_unet_name

    unet_paths = [p[1] for k in peft if (p := _peft_module(k, False)) and p[0] in ("unet", "transformer")]
    layers, up_attn = _unet_layout(unet_paths)
    te2 = any(k.startswith("text_encoder_2.") for k in keys)
    for key in peft:
        component, path, part = _peft_module(key, False)
        if component in ("unet", "transformer"):
            if family == "sdxl":
                path = ldm_unet_name(path + ".weight", layers, up_attn)[: -len(".weight")]
            out[key] = (kohya_name("lora_unet", path), part)
        else:
            prefix = ("lora_te2" if component == "text_encoder_2" else "lora_te1") if te2 or family == "sdxl" \
                else "lora_te"
            out[key] = (kohya_name(prefix, path), part)
    return out


def _peft_alphas(metadata: dict[str, str], header: dict) -> dict[str, float]:
    """diffusers' ``lora_adapter_metadata`` (component → lora_alpha), so a peft file keeps its scale."""
    raw = metadata.get("lora_adapter_metadata")
    alphas: dict[str, float] = {}
    if raw:
        try:
            data = json.loads(raw)
        except ValueError:
            data = {}
        for key, value in data.items():
            if key.endswith(".lora_alpha"):
                alphas[key[: -len(".lora_alpha")]] = float(value)
    return alphas


def open_lora(path: str | Path, load: bool = True, what: str = "LoRA") -> LoraFile:
    """Read a LoRA file's header (and, with ``load``, its tensors) into a `LoraFile`; refuse pickles, missing
    files, base checkpoints and files without any adapter weights by name."""
    path = check_input(path, what)
    weights = lora_weight_file(path)
    header, metadata = read_header(weights)
    keys = list(header)
    if is_base_model_keys(keys):
        raise NotALoraError(f"{what} {path.name}: this is a base checkpoint (model.diffusion_model.* keys), not a "
                            f"LoRA")
    family, why = detect_lora_family(keys, header, metadata, path.name)
    names = kohya_keys(keys, header, metadata, family)
    if not names:
        raise NotALoraError(f"{what} {path.name}: no LoRA/LyCORIS weights found ({len(keys)} tensors, e.g. "
                            f"{', '.join(keys[:3]) or 'none'})")
    source = "diffusers" if any(_peft_module(k, False) for k in names) else "kohya"
    lora = LoraFile(path, family, why, source, metadata, header)
    for key, (module, part) in names.items():
        lora.modules.setdefault(module, Module(module))
    if load:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as fh:
            for key, (module, part) in names.items():
                lora.modules[module].tensors[part] = fh.get_tensor(key)
    else:
        for key, (module, part) in names.items():
            lora.modules[module].tensors[part] = torch.empty(header[key]["shape"], device="meta")
    if source == "diffusers":
        _add_peft_alphas(lora)
    return lora


def _add_peft_alphas(lora: LoraFile) -> None:
    """peft files keep alpha in the header's adapter metadata, per component; give each module its alpha."""
    alphas = _peft_alphas(lora.metadata, lora.header)
    components = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                  "lora_te2": "text_encoder_2"}
    for module in lora.modules.values():
        prefix = module.name.split("_text_model")[0] if module.name.startswith("lora_te") else "lora_unet"
        component = components.get(prefix)
        if component in alphas and "alpha" not in module.tensors:
            module.tensors["alpha"] = torch.tensor(alphas[component])


def parse_weighted(spec: str) -> tuple[str, float]:
    """``path:0.7`` → (path, 0.7); a bare path means weight 1 (a Windows drive letter is not a weight)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def same_family(loras: list[LoraFile]) -> str:
    """The one family of all inputs; otherwise a `MixedFamiliesError` that names each file's family."""
    families = {lora.family for lora in loras}
    if len(families) > 1:
        listed = ", ".join(f"{lora.path.name} is {lora.family} ({lora.family_reason})" for lora in loras)
        raise MixedFamiliesError(f"the LoRAs are of different model families: {listed}; combine LoRAs of one "
                                 f"family only")
    return families.pop()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], precision: str) -> Path:
    """A kohya LoRA file through the engine's writer (sorted keys, string metadata, ``sshs_model_hash``),
    renamed into place atomically."""
    from ..image.export import save_lora_file

    precision = {"fp32": "float"}.get(precision, precision)
    with atomic_output(path) as tmp:
        save_lora_file(tmp, tensors, metadata, precision=precision)
    return path
