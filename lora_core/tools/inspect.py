"""``inspect FILE``: what a LoRA file is — family, adapter type, rank/alpha per block, modules, training metadata
(steps, dataset tags, base model hash), size — read from the header alone, so it is instant on any file.

Reads ours and other tools' files (kohya sd-scripts, LyCORIS LoCon/LoHa/LoKr/DoRA, diffusers/peft); the tab's
Combine section and Lora-folder picker show this summary.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .lora_file import LoraFile, open_lora

BLOCK_PATTERNS = (
    (r"lora_unet_(down_blocks_\d+|input_blocks_\d+)", "unet {0}"),
    (r"lora_unet_(mid_block|middle_block)", "unet {0}"),
    (r"lora_unet_(up_blocks_\d+|output_blocks_\d+)", "unet {0}"),
    (r"(lora_te\d?)_", "{0}"),
    (r"lora_unet_([a-z_]+?)(?:_\d|$)", "unet {0}"),
)


def block_of(module: str) -> str:
    """A coarse block name (``unet down_blocks_1``, ``lora_te1``) for per-block rank/alpha."""
    for pattern, label in BLOCK_PATTERNS:
        if m := re.match(pattern, module):
            return label.format(m[1])
    return "other"


def top_tags(raw: str, n: int = 10) -> list[tuple[str, int]]:
    """sd-scripts' ``ss_tag_frequency`` ({dataset: {tag: count}}) → the n most used tags overall."""
    try:
        data = json.loads(raw)
    except ValueError:
        return []
    counts: Counter = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, (int, float)):
                        counts[tag.strip()] += int(count)
    return counts.most_common(n)


def summary(lora: LoraFile) -> dict[str, Any]:
    """The JSON-able description printed by ``inspect --json`` and shown by the tab."""
    blocks: dict[str, dict] = defaultdict(lambda: {"modules": 0, "ranks": set(), "alphas": set(), "types": set()})
    for module in lora.modules.values():
        b = blocks[block_of(module.name)]
        b["modules"] += 1
        if module.rank is not None:
            b["ranks"].add(module.rank)
        if "alpha" in module.tensors and module.tensors["alpha"].device.type != "meta":
            b["alphas"].add(round(module.alpha, 4))
        b["types"].add(module.kind + ("+dora" if module.is_dora else ""))
    meta = lora.metadata
    ranks = sorted({m.rank for m in lora.modules.values() if m.rank is not None})
    alphas = sorted({a for b in blocks.values() for a in b["alphas"]})
    network_alpha = meta.get("ss_network_alpha")
    return {
        "file": str(lora.path), "size_bytes": lora.size_bytes, "family": lora.family,
        "family_reason": lora.family_reason, "format": lora.source_format,
        "adapter_types": lora.adapter_types, "network_module": meta.get("ss_network_module"),
        "modules": len(lora.modules),
        "unet_modules": sum(1 for m in lora.modules if m.startswith("lora_unet_")),
        "text_encoder_modules": sum(1 for m in lora.modules if m.startswith("lora_te")),
        "rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": alphas[0] if len(alphas) == 1 else
        (alphas or (float(network_alpha) if network_alpha else None)),
        "blocks": {name: {"modules": b["modules"], "rank": sorted(b["ranks"]), "alpha": sorted(b["alphas"]),
                          "types": sorted(b["types"])} for name, b in sorted(blocks.items())},
        "training": {
            "output_name": meta.get("ss_output_name") or meta.get("modelspec.title"),
            "steps": _int(meta.get("ss_steps")), "epochs": _int(meta.get("ss_epoch")),
            "images": _int(meta.get("ss_num_train_images")), "resolution": meta.get("modelspec.resolution"),
            "base_model": meta.get("ss_sd_model_name"),
            "base_model_hash": meta.get("ss_new_sd_model_hash") or meta.get("ss_sd_model_hash"),
            "base_model_version": meta.get("ss_base_model_version"),
            "trigger": meta.get("modelspec.trigger_phrase"),
            "top_tags": top_tags(meta.get("ss_tag_frequency", "")),
            "merged_from": _json(meta.get("lora_tools.merged_from")),
        },
        "file_hash": meta.get("sshs_model_hash"),
        "metadata_keys": sorted(meta),
    }


def _int(value: Any) -> Any:
    try:
        return int(float(value)) if value not in (None, "", "None") else None
    except ValueError:
        return None


def _json(value: Any) -> Any:
    try:
        return json.loads(value) if value else None
    except ValueError:
        return value


def inspect_file(path: str | Path) -> dict[str, Any]:
    """Summary of one file. Alphas are small 0-dim tensors, so they are read; the big factors are not."""
    lora = open_lora(path, load=False)
    from safetensors import safe_open

    from .lora_file import kohya_keys, lora_weight_file

    names = kohya_keys(list(lora.header), lora.header, lora.metadata, lora.family)
    with safe_open(str(lora_weight_file(lora.path)), "pt") as fh:
        for key, (module, part) in names.items():
            if part == "alpha":
                lora.modules[module].tensors["alpha"] = fh.get_tensor(key)
    return summary(lora)


def render_text(info: dict[str, Any]) -> str:
    """The human-readable form of `summary` for the terminal."""
    t = info["training"]
    size_mb = info["size_bytes"] / 2**20
    lines = [f"{info['file']}  ({size_mb:.1f} MB, {info['format']} format)",
             f"  family: {info['family']}  ({info['family_reason']})",
             f"  adapter: {', '.join(info['adapter_types'])}  rank {info['rank']}  alpha {info['alpha']}",
             f"  modules: {info['modules']} ({info['unet_modules']} UNet, {info['text_encoder_modules']} text "
             f"encoder)"]
    for name, b in info["blocks"].items():
        lines.append(f"    {name:<24} {b['modules']:>4} modules  rank {','.join(map(str, b['rank'])) or '-'}  "
                     f"alpha {','.join(map(str, b['alpha'])) or '-'}  {','.join(b['types'])}")
    facts = [f"{k} {v}" for k, v in (("steps", t["steps"]), ("epochs", t["epochs"]), ("images", t["images"]),
                                     ("base", t["base_model"]), ("base hash", t["base_model_hash"]),
                                     ("trigger", t["trigger"])) if v]
    if facts:
        lines.append("  training: " + ", ".join(facts))
    if t["top_tags"]:
        lines.append("  top tags: " + ", ".join(f"{tag} ({n})" for tag, n in t["top_tags"]))
    if t["merged_from"]:
        lines.append("  merged from: " + json.dumps(t["merged_from"]))
    return "\n".join(lines)
