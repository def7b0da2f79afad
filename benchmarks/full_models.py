"""Full-size SD 1.5 and SDXL models with seeded random weights, built from their published shapes, offline.

Why random: the speed and memory of a LoRA step depend on the shapes, not the values, and nothing may be downloaded
(Hugging Face is not reachable where the benchmarks run). The shapes are those of ``runwayml/stable-diffusion-v1-5``
and ``stabilityai/stable-diffusion-xl-base-1.0`` (UNet, VAE, CLIP-L, OpenCLIP-bigG); kohya sd-scripts' SD1 loader
builds exactly these shapes, which is why ``train_speed.py --peer kohya`` needs this model and not the narrow ones of
`lora_core.tiny`. Saved as a WebUI-style single file with the original key names, fp16 like the released files.

The one builder of full-size files (`write_full_single_file`), used by ``train_speed.py --size full``,
``load_memory.py`` and ``gpu_suite.py``: the key names and shapes come from the diffusers modules built on the
``meta`` device (no memory), renamed as `lora_core.tiny.write_single_file` renames them, and each tensor is made
(`random_tensor`) and written one at a time — an SDXL file is written with a few hundred MB of RAM, not the 14 GB
of an fp32 model. The random numbers are drawn on ``--device`` (the GPU suite: seconds instead of minutes on a CPU);
seeded by the tensor's name, so a file is the same on every run on the same kind of device.

    python benchmarks/full_models.py --family sd1|sdxl --out DIR [--device cuda]
"""
from __future__ import annotations

import argparse
import hashlib
import math
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


def ldm_shapes(family: str) -> dict:
    """{key: (shape, dtype)} of the full-size family's WebUI checkpoint (fp16 floats), computed on the meta device:
    the parts of `build_full_parts`, renamed as `lora_core.tiny.write_single_file` does."""
    import torch

    from lora_core.image.ldm_keys import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    parts = build_full_parts(family, device="meta")
    unet, vae = parts["unet"], parts["vae"]
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    state = dict(unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, up_attn))
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    if family == "sdxl":
        state.update(clip_to_ldm(parts["text_encoder"].state_dict(), "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(parts["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_ldm(parts["text_encoder"].state_dict()))
    return {k: (tuple(v.shape), torch.float16 if v.is_floating_point() else v.dtype) for k, v in state.items()}


def random_tensor(name: str, shape: tuple, dtype, device: str = "cpu"):
    """Seeded by the name: norms' scales 1, other vectors 0, matrices N(0, 1/fan_in) — a model whose forward pass
    stays finite, so a training step on it is a real one. Drawn on ``device``, returned on the CPU."""
    import torch

    if not dtype.is_floating_point:
        return torch.arange(math.prod(shape)).reshape(shape).to(dtype) if shape else torch.zeros((), dtype=dtype)
    if len(shape) <= 1:
        ones = any(t in name for t in ("norm", "ln_", "gamma")) and name.endswith("weight")
        return (torch.ones if ones else torch.zeros)(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    fan_in = math.prod(shape[1:])
    generator = torch.Generator(device).manual_seed(seed)
    return (torch.randn(shape, generator=generator, device=device) / math.sqrt(fan_in)).to("cpu", dtype)


def write_full_single_file(family: str, path: Path, device: str = "cpu") -> Path:
    """The full-size random checkpoint at ``path``, written tensor by tensor; reused when it is already there
    (building SDXL on a CPU takes minutes)."""
    from lora_core.image.weights_io import write_tensors

    path = Path(path)
    if not path.is_file():
        t0 = time.perf_counter()
        write_tensors(path, ldm_shapes(family), lambda name, shape, dtype: random_tensor(name, shape, dtype, device),
                      {"format": "pt"})
        print(f"built {path} ({path.stat().st_size / 2**30:.1f} GiB, {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    return path


def build_full_single_file(family: str, out_dir: Path, device: str = "cpu") -> Path:
    """``<out_dir>/full-<family>.safetensors`` (`write_full_single_file`)."""
    return write_full_single_file(family, Path(out_dir) / f"full-{family}.safetensors", device)


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
