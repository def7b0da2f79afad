"""Full-size SD 1.5 and SDXL models with seeded random weights, built from their published shapes, offline.

Why random: the speed and memory of a LoRA step depend on the shapes, not the values, and nothing may be downloaded
(Hugging Face is not reachable where the benchmarks run). The shapes are those of ``runwayml/stable-diffusion-v1-5``
and ``stabilityai/stable-diffusion-xl-base-1.0`` (UNet, VAE, CLIP-L, OpenCLIP-bigG); kohya sd-scripts' SD1 loader
builds exactly these shapes, which is why ``train_speed.py --peer kohya`` needs this model and not the narrow ones of
`lora_core.tiny`. Built on any device (the GPU suite builds on the GPU: seconds instead of minutes) and saved as a
WebUI-style single file with the original key names, fp16 like the released files.

    python benchmarks/full_models.py --family sd1|sdxl --out DIR [--device cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                 layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
           norm_num_groups=32)
# (hidden, layers, intermediate, activation, projection): CLIP ViT-L/14's text tower; OpenCLIP ViT-bigG/14's
CLIP_L = (768, 12, 3072, "quick_gelu", None)
OPEN_CLIP_BIGG = (1280, 32, 5120, "gelu", 1280)
FAMILIES = {"sd1": {"unet": SD15_UNET, "vae": {**VAE, "sample_size": 512, "scaling_factor": 0.18215},
                    "text": [CLIP_L]},
            "sdxl": {"unet": SDXL_UNET, "vae": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025},
                     "text": [CLIP_L, OPEN_CLIP_BIGG]}}


def unet_config(family: str) -> dict:
    """The diffusers ``UNet2DConditionModel`` arguments of the full-size family (for FLOP counting on ``meta``)."""
    return dict(FAMILIES[family]["unet"])


def build_full_parts(family: str, device: str = "cpu", seed: int = 0) -> dict:
    """UNet, VAE and text encoder(s) of the full-size family, fp32 with seeded random weights, on ``device``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_core.image.sd_models import clip_text_model

    spec = FAMILIES[family]
    torch.manual_seed(seed)
    with torch.device(device):
        parts = {"unet": UNet2DConditionModel(**spec["unet"]), "vae": AutoencoderKL(**spec["vae"])}
        for key, (hidden, layers, intermediate, act, projection) in zip(("text_encoder", "text_encoder_2"),
                                                                         spec["text"]):
            parts[key] = clip_text_model(hidden, layers, intermediate, act, projection_dim=projection)
    return parts


def build_full_single_file(family: str, out_dir: Path, device: str = "cpu", seed: int = 0) -> Path:
    """``<out_dir>/full-<family>.safetensors`` (fp16, original key names); reused when it is already there, since
    building SDXL on a CPU takes minutes."""
    import torch

    from lora_core.tiny import write_single_file

    path = Path(out_dir) / f"full-{family}.safetensors"
    if path.is_file():
        return path
    parts = build_full_parts(family, device, seed)
    parts = {k: m.to(dtype=torch.float16).to("cpu") for k, m in parts.items()}
    write_single_file(parts, path, family)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1", choices=sorted(FAMILIES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    t0 = time.perf_counter()
    print(build_full_single_file(args.family, Path(args.out), args.device), f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
