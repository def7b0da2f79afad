"""Tiny Stable-Diffusion-shaped models with seeded random weights, and a tiny dataset, built in seconds offline.

Tests, the quickstart and the benchmarks train on these; nothing is downloaded. The models have the real
architectures (UNet2DConditionModel with cross-attention blocks, AutoencoderKL with 8× downsampling, CLIP text
encoder with the real 49408-token CLIP tokenizer), only narrow. ``size="mid"`` keeps SD1.5's block layout and
cross-attention width (4 blocks, 2 layers each, 768-wide context) with fewer channels, for benchmarks.

    python -m lora_core.tiny --out DIR [--single-file] [--family sd1] [--dataset DIR]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from .clip_tokenizer import write_clip_tokenizer

SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers_per_block=1, down=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up=("UpBlock2D", "CrossAttnUpBlock2D"), text_hidden=32, text_layers=2, text_heads=1,
                 text_intermediate=64, vae_channels=(32, 32, 32, 32), unet_heads=8),
    "mid": dict(unet_channels=(64, 128, 256, 256), layers_per_block=2,
                down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                text_hidden=768, text_layers=2, text_heads=12, text_intermediate=1024,
                vae_channels=(32, 64, 64, 64), unet_heads=8),
}


def build_components(family: str = "sd1", size: str = "tiny", seed: int = 0) -> dict:
    """UNet, VAE, text encoder, tokenizer and noise scheduler with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .clip_tokenizer import load_clip_tokenizer

    if family != "sd1":
        raise ValueError(f"tiny models: family {family!r} is not available (sd1)")
    s = SIZES[size]
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=s["text_hidden"], intermediate_size=s["text_intermediate"], num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"], vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=s["text_hidden"]))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=s["unet_channels"],
        layers_per_block=s["layers_per_block"], down_block_types=s["down"], up_block_types=s["up"],
        cross_attention_dim=s["text_hidden"], attention_head_dim=s["unet_heads"], norm_num_groups=32)
    n = len(s["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae_channels"],
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon",
                              steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": load_clip_tokenizer(),
            "scheduler": scheduler}


def build_tiny_sd(out_dir: str | Path, single_file: bool = False, family: str = "sd1", size: str = "tiny",
                  seed: int = 0) -> Path:
    """Write a diffusers folder (``<out_dir>``) or a WebUI-style single-file checkpoint; returns its path."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    parts = build_components(family, size, seed)
    if single_file:
        return write_single_file(parts, out / f"{size}-{family}.safetensors")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out / "tokenizer")
    return out


def write_single_file(parts: dict, path: Path) -> Path:
    """Save components with the original LDM key names, the way WebUI checkpoints are stored."""
    from safetensors.torch import save_file

    from .ldm_keys import clip_to_ldm, unet_to_ldm, vae_to_ldm

    unet, vae = parts["unet"], parts["vae"]
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, up_attn))
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    state.update(clip_to_ldm(parts["text_encoder"].state_dict()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}


def make_tiny_dataset(out_dir: str | Path, n: int = 4, size: int = 64, seed: int = 0,
                      sidecars: bool = True, sizes: Optional[list[tuple[int, int]]] = None) -> Path:
    """Coloured shapes on a light background with captions like ``a red circle, simple background``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = {}
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), SHAPES[i % len(SHAPES)]
        w, h = sizes[i % len(sizes)] if sizes else (size, size)
        im = Image.new("RGB", (w, h), (245, 245, 240))
        draw = ImageDraw.Draw(im)
        m = min(w, h)
        x0, y0 = rng.randint(0, w - m // 2), rng.randint(0, h - m // 2)
        box = (x0, y0, x0 + m // 2, y0 + m // 2)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
        name = f"{i:03d}_{colour}_{shape}.png"
        im.save(out / name)
        captions[name] = f"a {colour} {shape}, simple background"
        if sidecars:
            (out / name).with_suffix(".txt").write_text(captions[name], encoding="utf-8")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_core.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the model into")
    parser.add_argument("--single-file", action="store_true", help="write one WebUI-style .safetensors checkpoint")
    parser.add_argument("--family", default="sd1")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", help="also write a tiny dataset of coloured shapes into this folder")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args(argv)
    path = build_tiny_sd(args.out, args.single_file, args.family, args.size, args.seed)
    print(path)
    if args.dataset:
        print(make_tiny_dataset(args.dataset, n=args.images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
