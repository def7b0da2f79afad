"""``bake BASE A:w … --out MODEL.safetensors``: LoRAs merged into a base checkpoint, written as a WebUI single file.

The output keeps the base's original LDM/SGM key names (``model.diffusion_model.*``, ``cond_stage_model.*`` /
``conditioner.embedders.*``, ``first_stage_model.*``) and metadata, so A1111, Forge and ComfyUI load it like any
checkpoint. Work is streamed tensor by tensor — read one base tensor, add the updates of the LoRA modules that name
it (``W' = W + Σ wᵢ·alphaᵢ/rankᵢ·upᵢ@downᵢ``, LoHa/LoKr/DoRA by their own maths), cast, append — so an SDXL bake
needs the LoRAs plus about one tensor of memory, not the model. Families are checked from the headers first; a
LoRA module with no layer in the base is refused by name (a silent skip would bake a different model than the
WebUI shows with the LoRA applied).
"""
from __future__ import annotations

import json
from pathlib import Path


from .ckpt_keys import checkpoint_family, module_map, single_file_checkpoint
from .lora_file import (MixedFamiliesError, ToolError, atomic_output, check_output, open_lora, same_family)
from .progress import NO_PROGRESS, Progress
from .stream import DTYPES, PRECISIONS, TensorReader, TensorWriter


def bake(base: str | Path, loras: list[tuple[str | Path, float]], out: str | Path, precision: str = "fp16",
         force: bool = False, progress: Progress = NO_PROGRESS) -> dict:
    if precision not in PRECISIONS:
        raise ToolError(f"--precision {precision}: one of {', '.join(PRECISIONS)}")
    if not loras:
        raise ToolError("bake: give at least one LoRA (FILE or FILE:WEIGHT)")
    out = check_output(out, force)
    headers = [open_lora(path, load=False) for path, _ in loras]
    lora_family = same_family(headers)
    with single_file_checkpoint(base, out.parent) as base_file:
        family, header, metadata = checkpoint_family(base_file)
        if family != lora_family:
            raise MixedFamiliesError(f"base model {Path(base).name} is {family} but the LoRAs are {lora_family} "
                                     f"({headers[0].path.name}: {headers[0].family_reason}); bake LoRAs into the "
                                     f"model family they were trained for")
        shapes = {k: v["shape"] for k, v in header.items()}
        mapping = module_map(shapes, family)
        for lora in headers:
            missing = sorted(m for m in lora.modules if m not in mapping.targets)
            if missing:
                raise ToolError(f"{lora.path.name}: {len(missing)} modules have no layer in {Path(base).name} "
                                f"(e.g. {', '.join(missing[:3])}); is it a LoRA for this model?")
        loaded = [open_lora(path) for path, _ in loras]
        updates: dict[str, list] = {}
        for lora, (_, weight) in zip(loaded, loras):
            for name, module in lora.modules.items():
                target = mapping.targets[name]
                updates.setdefault(target.key, []).append((module, float(weight), target))
        report = _stream(base_file, header, metadata, updates, out, precision, progress,
                         [{"file": Path(p).name, "weight": w, "hash": lora.metadata.get("sshs_model_hash")}
                          for (p, w), lora in zip(loras, loaded)], Path(base).name)
    report.update(family=family, output=str(out), precision=precision)
    return report


def _stream(base_file: Path, header: dict, metadata: dict, updates: dict, out: Path, precision: str,
            progress: Progress, sources: list, base_name: str) -> dict:
    dtype = PRECISIONS[precision]
    layout = {}
    for key, info in header.items():
        src_dtype = DTYPES[info["dtype"]]
        layout[key] = (dtype if src_dtype.is_floating_point else src_dtype, info["shape"])
    meta = dict(metadata)
    meta.update({"format": "pt", "lora_tools.baked_from": json.dumps({"base": base_name, "loras": sources})})
    meta.pop("sshs_model_hash", None)
    changed = 0
    with atomic_output(out) as tmp, TensorReader(base_file) as reader:
        writer = TensorWriter(tmp, layout, meta)
        try:
            total = len(layout)
            for i, key in enumerate(layout):
                tensor = reader.get(key)
                if key in updates:
                    weight = tensor.float()
                    for module, strength, target in updates[key]:
                        rows = target.slice()
                        if module.is_dora:
                            weight[rows] = module.apply_to_weight(weight[rows], strength)
                        else:  # in place: one full-size temporary (the update), not three
                            weight[rows] += module.delta(weight[rows].shape, strength)
                    tensor = weight
                    changed += 1
                writer.put(key, tensor.to(layout[key][0]))
                progress.update(i + 1, total, "baking tensors")
        finally:
            writer.close()
    progress.close()
    return {"tensors": len(layout), "changed_tensors": changed}
