"""Peak RSS and time of ``lora-tools bake`` (streamed, tensor by tensor) against a naive bake (load the whole
checkpoint, merge, save the whole state dict), on an SDXL-shaped "mid" model.

Why: a naive bake of a real SDXL checkpoint (6.9 GB fp16) holds the model plus a serialisation buffer — well over
8 GB, more than a 16 GB desktop has free beside the WebUI. The streamed bake should hold the LoRAs plus about one
tensor, whatever the model's size.

The model has SDXL's layout — two text encoders (CLIP-L-style and OpenCLIP-bigG-style with fused q/k/v), a 3-level
UNet with transformer depths 1/2/10 and a 2048-wide context — at 2/5 of SDXL's UNet channels (128/256/512) and narrower
encoders, random weights in fp16 like released files, written once as a WebUI single file. The LoRA names every
transformer linear of the UNet and both text encoders at rank 16. Each variant runs in its own child process; its
peak RSS is the kernel's account of that process (``wait4``'s ``ru_maxrss``), so runs never share a figure. An
"imports only" child gives the floor (torch + the toolbox imported). The two outputs are compared tensor by tensor.

    python benchmarks/bake_memory.py [--keep DIR]

The last line printed is one JSON object (with the load average and core count).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_fields_start() -> dict:
    return {"load_start": [round(x, 2) for x in os.getloadavg()], "cores": len(os.sched_getaffinity(0))}


def build_model(folder: Path) -> Path:
    """The SDXL-shaped mid single file (fp16), via the tiny builder's single-file writer."""
    import torch
    from diffusers import UNet2DConditionModel

    from lora_core.image.sd_models import clip_text_model
    from lora_core.tiny import _tiny_vae, write_single_file

    torch.manual_seed(0)
    te1 = clip_text_model(384, 6, 1536, "quick_gelu")
    te2 = clip_text_model(640, 16, 2560, "gelu", projection_dim=640)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(128, 256, 512), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, attention_head_dim=(2, 4, 8),
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=640 + 6 * 256, norm_num_groups=32)
    parts = {"unet": unet.half(), "vae": _tiny_vae((64, 128, 256, 256), 0.13025, 2).half(),
             "text_encoder": te1.half(), "text_encoder_2": te2.half()}
    return write_single_file(parts, folder / "sdxl-mid.safetensors", "sdxl")


def build_lora(model: Path, out: Path, rank: int = 16) -> Path:
    """A rank-16 kohya LoRA on every transformer linear and text-encoder layer the model has."""
    import torch
    from safetensors.torch import save_file

    from lora_core.tools.ckpt_keys import module_map
    from lora_core.tools.lora_file import read_header

    header, _ = read_header(model)
    mapping = module_map({k: v["shape"] for k, v in header.items()}, "sdxl")
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for target, name in mapping.canonical.items():
        if target.kind != "linear" or not (target.part == "te" or "_transformer_blocks_" in name):
            continue
        shape = header[target.key]["shape"]
        rows = (target.rows[1] - target.rows[0]) if target.rows else shape[0]
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=gen) * 0.02).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(rows, rank, generator=gen) * 0.02).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank / 2)).half()
    save_file(tensors, str(out), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return out


def child(variant: str, base: str, lora: str, out: str) -> None:
    """One measured bake in this process; prints its seconds as JSON."""
    t0 = time.perf_counter()
    if variant == "build":  # not measured: the model and LoRA, made where the parent's memory cannot grow
        if not Path(base).is_file():
            build_model(Path(base).parent)
        build_lora(Path(base), Path(lora))
    elif variant == "imports":
        import torch  # noqa: F401

        import lora_core.tools.bake  # noqa: F401
    elif variant == "streamed":
        from lora_core.tools.bake import bake

        bake(base, [(lora, 0.8)], out, precision="fp16")
    else:  # naive: everything in memory, the same per-module maths, one save at the end
        from safetensors.torch import load_file, save_file

        from lora_core.tools.ckpt_keys import module_map
        from lora_core.tools.lora_file import open_lora

        state = load_file(base)
        mapping = module_map({k: list(v.shape) for k, v in state.items()}, "sdxl")
        for name, module in open_lora(lora).modules.items():
            target = mapping.targets[name]
            weight = state[target.key].float()
            weight[target.slice()] = module.apply_to_weight(weight[target.slice()], 0.8)
            state[target.key] = weight.half()
        save_file(state, out, metadata={"format": "pt"})
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def measure(variant: str, base: Path, lora: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(base), str(lora), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant} failed:\n{stderr[-2000:]}")
    inner = json.loads(stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "bake_s": round(inner["seconds"], 2),
            "wall_s": round(wall, 2)}


def compare(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if ta.is_floating_point():
                worst = max(worst, float((ta.float() - tb.float()).abs().max()))
    return worst


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", help="build the model here and keep it (default: a temp folder)")
    args = parser.parse_args()
    start = _load_fields_start()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bake-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    base, lora = folder / "sdxl-mid.safetensors", folder / "style.safetensors"
    # Linux keeps a process's peak RSS across fork and exec: this parent must never hold a model, or every child
    # would report the parent's peak. So the model is built in a child too, and the parent imports no torch.
    measure("build", base, lora, folder / "unused")
    results = {}
    for variant in ("imports", "streamed", "naive"):
        out = folder / f"baked-{variant}.safetensors"
        out.unlink(missing_ok=True)
        results[variant] = measure(variant, base, lora, out)
        print(f"{variant}: {results[variant]}", file=sys.stderr, flush=True)
    diff = compare(folder / "baked-streamed.safetensors", folder / "baked-naive.safetensors")
    floor = results["imports"]["peak_rss_mb"]
    line = {
        "benchmark": "bake_memory", "model": "sdxl-mid (SDXL layout, UNet channels 128/256/512, fp16)",
        "model_mb": round(base.stat().st_size / 2**20, 1), "lora_mb": round(lora.stat().st_size / 2**20, 1),
        "streamed_peak_rss_mb": results["streamed"]["peak_rss_mb"],
        "naive_peak_rss_mb": results["naive"]["peak_rss_mb"],
        "imports_peak_rss_mb": floor,
        "streamed_above_imports_mb": round(results["streamed"]["peak_rss_mb"] - floor, 1),
        "naive_above_imports_mb": round(results["naive"]["peak_rss_mb"] - floor, 1),
        "streamed_s": results["streamed"]["bake_s"], "naive_s": results["naive"]["bake_s"],
        "max_abs_diff_streamed_vs_naive": diff, **start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
    }
    if not args.keep:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
