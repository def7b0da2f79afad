"""Tiny Stable-Diffusion-shaped models with seeded random weights, and a tiny dataset, built in seconds offline.

Tests, the quickstart and the benchmarks train on these; nothing is downloaded. The models have the real
architectures (UNet2DConditionModel with cross-attention blocks, AutoencoderKL with 8× downsampling, CLIP text
encoder with the real 49408-token CLIP tokenizer), only narrow. ``size="mid"`` keeps SD1.5's block layout and
cross-attention width (4 blocks, 2 layers each, 768-wide context) with a fifth of the UNet's channels and a
quarter of the VAE's, so the share of each step spent in the VAE stays close to SD1.5's — for benchmarks.

``family="sd2"`` (OpenCLIP-style text encoder, linear UNet projections, ``prediction_type`` epsilon or v_prediction)
and ``family="sdxl"`` (two text encoders, pooled embeddings, size/crop conditioning) come in size ``tiny``.

    python -m lora_core.tiny --out DIR [--single-file] [--family sd1|sd2|sdxl] [--prediction-type v_prediction]
                             [--dataset DIR] [--tagger DIR]
    python -m lora_core.tiny --out my/model.safetensors --single-file   (a file path for a single file)
    python -m lora_core.tiny --family flux --out DIR [--single-file [--flux-layout parts] [--fp8]]
                             [--flux-variant dev|schnell]   (tiny FLUX.1: lora_core.image.flux_tiny)
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from .files import atomic_path
from .image.clip_tokenizer import write_clip_tokenizer
from .image.sd_models import clip_text_model

SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers_per_block=1, down=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up=("UpBlock2D", "CrossAttnUpBlock2D"), text_hidden=32, text_layers=2, text_heads=1,
                 text_intermediate=64, vae_channels=(32, 32, 32, 32), vae_layers=1, unet_heads=8),
    "mid": dict(unet_channels=(64, 128, 256, 256), layers_per_block=2,
                down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                text_hidden=768, text_layers=2, text_heads=12, text_intermediate=1024,
                vae_channels=(32, 64, 128, 128), vae_layers=2, unet_heads=8),
}


# SD 2.x and SDXL shapes: attention heads of 64 channels as in the real models (the number of heads is not in the
# weights, so the single-file loader assumes 64 — these widths keep folder and file identical)
FAMILIES = {
    "sd2": dict(unet_channels=(64, 128), layers_per_block=1, down=("CrossAttnDownBlock2D", "DownBlock2D"),
                up=("UpBlock2D", "CrossAttnUpBlock2D"), text_hidden=64, text_layers=2, text_intermediate=128),
    "sdxl": dict(unet_channels=(64, 128), layers_per_block=2, down=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers=(1, 2), text_hidden=32, text_layers=2,
                 text_intermediate=64, text2_hidden=64, text2_layers=2, text2_intermediate=128, text2_projection=32,
                 time_embed_dim=8),
}
FAMILY_NAMES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _tiny_vae(channels: tuple, scaling_factor: float, layers: int = 1):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=layers, norm_num_groups=32, sample_size=64, scaling_factor=scaling_factor)


def _ddpm(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=prediction_type, steps_offset=1)


def build_components(family: str = "sd1", size: str = "tiny", seed: int = 0,
                     prediction_type: str = "epsilon") -> dict:
    """UNet, VAE, text encoder(s), tokenizer(s) and noise scheduler with seeded random weights — the keyword
    arguments of the family's diffusers pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline for sdxl)."""
    import torch
    from diffusers import UNet2DConditionModel

    from .image.clip_tokenizer import load_clip_tokenizer

    if family not in FAMILY_NAMES:
        raise ValueError(f"tiny models: family {family!r} is not available ({', '.join(FAMILY_NAMES)})")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"tiny models: prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    if family != "sd1":
        if size != "tiny":
            raise ValueError(f"tiny models: family {family} comes in size 'tiny' only")
        return _build_sd2(seed, prediction_type) if family == "sd2" else _build_sdxl(seed, prediction_type)
    s = SIZES[size]
    torch.manual_seed(seed)
    text_encoder = clip_text_model(s["text_hidden"], s["text_layers"], s["text_intermediate"], "quick_gelu")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=s["unet_channels"],
        layers_per_block=s["layers_per_block"], down_block_types=s["down"], up_block_types=s["up"],
        cross_attention_dim=s["text_hidden"], attention_head_dim=s["unet_heads"], norm_num_groups=32)
    vae = _tiny_vae(s["vae_channels"], 0.18215, s["vae_layers"])
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": load_clip_tokenizer(),
            "scheduler": _ddpm(prediction_type)}


def _build_sd2(seed: int, prediction_type: str) -> dict:
    """SD 2.x: OpenCLIP-style text encoder (gelu; the diffusers model ends at SD2's penultimate layer), linear
    projections in the UNet, a tokenizer that pads with '!', 512 (epsilon) or 768 (v-prediction) sample size."""
    import torch
    from diffusers import UNet2DConditionModel

    from .image.clip_tokenizer import load_clip_tokenizer

    s = FAMILIES["sd2"]
    torch.manual_seed(seed)
    text_encoder = clip_text_model(s["text_hidden"], s["text_layers"], s["text_intermediate"], "gelu")
    unet = UNet2DConditionModel(
        sample_size=96 if prediction_type == "v_prediction" else 64, in_channels=4, out_channels=4,
        block_out_channels=s["unet_channels"], layers_per_block=s["layers_per_block"], down_block_types=s["down"],
        up_block_types=s["up"], cross_attention_dim=s["text_hidden"], use_linear_projection=True,
        attention_head_dim=tuple(c // 64 for c in s["unet_channels"]), norm_num_groups=32)
    return {"unet": unet, "vae": _tiny_vae((32, 32, 32, 32), 0.18215), "text_encoder": text_encoder,
            "tokenizer": load_clip_tokenizer(pad_token="!"), "scheduler": _ddpm(prediction_type)}


def _build_sdxl(seed: int, prediction_type: str) -> dict:
    """SDXL: CLIP-L-style encoder + OpenCLIP-bigG-style encoder with projection (pooled embeddings), a UNet with
    ``text_time`` added conditioning (pooled embeddings + size/crop time ids), SDXL's VAE scaling factor."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from .image.clip_tokenizer import load_clip_tokenizer

    s = FAMILIES["sdxl"]
    torch.manual_seed(seed)
    text_encoder = clip_text_model(s["text_hidden"], s["text_layers"], s["text_intermediate"], "quick_gelu")
    text_encoder_2 = clip_text_model(s["text2_hidden"], s["text2_layers"], s["text2_intermediate"], "gelu",
                                      projection_dim=s["text2_projection"])
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=s["unet_channels"],
        layers_per_block=s["layers_per_block"], down_block_types=s["down"], up_block_types=s["up"],
        transformer_layers_per_block=s["transformer_layers"], use_linear_projection=True,
        attention_head_dim=tuple(c // 64 for c in s["unet_channels"]),
        cross_attention_dim=s["text_hidden"] + s["text2_hidden"], addition_embed_type="text_time",
        addition_time_embed_dim=s["time_embed_dim"],
        projection_class_embeddings_input_dim=s["text2_projection"] + 6 * s["time_embed_dim"], norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type=prediction_type,
                                       steps_offset=1, timestep_spacing="leading")
    return {"unet": unet, "vae": _tiny_vae((32, 32, 32, 32), 0.13025), "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2, "tokenizer": load_clip_tokenizer(),
            "tokenizer_2": load_clip_tokenizer(pad_token="!"), "scheduler": scheduler}


def build_tiny_sd(out_dir: str | Path, single_file: bool = False, family: str = "sd1", size: str = "tiny",
                  seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a diffusers folder (``<out_dir>``) or a WebUI-style single-file checkpoint; returns its path.

    A v-prediction single file is named like Stability's SD 2.x 768-v files (``…-768-v.safetensors``): real ones
    cannot be told from epsilon files by their keys, and the loader's heuristic reads the name."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(out_dir)
    parts = build_components(family, size, seed, prediction_type)
    if single_file:
        if out.suffix.lower() == ".safetensors":  # the file's own path, as the user asked for it
            out.parent.mkdir(parents=True, exist_ok=True)
            return write_single_file(parts, out, family)
        suffix = "-768-v" if prediction_type == "v_prediction" else ""
        return write_single_file(parts, out / f"{size}-{family}{suffix}.safetensors", family)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    write_clip_tokenizer(out / "tokenizer", pad_token="!" if family == "sd2" else "<|endoftext|>")
    if family == "sdxl":
        write_clip_tokenizer(out / "tokenizer_2", pad_token="!")
    return out


def write_single_file(parts: dict, path: Path, family: str = "sd1") -> Path:
    """Save components with the original LDM/SGM key names, the way WebUI checkpoints are stored: SD1's CLIP under
    ``cond_stage_model.transformer``, SD2's OpenCLIP under ``cond_stage_model.model``, SDXL's two encoders under
    ``conditioner.embedders.0.transformer`` and ``conditioner.embedders.1.model``."""
    from safetensors.torch import save_file

    from .image.ldm_keys import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    unet, vae = parts["unet"], parts["vae"]
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, up_attn))
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    te_state = parts["text_encoder"].state_dict()
    if family == "sd2":
        state.update(open_clip_to_ldm(te_state, "cond_stage_model.model.", unused_final_block=True))
    elif family == "sdxl":
        state.update(clip_to_ldm(te_state, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(parts["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_ldm(te_state))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
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


# The demo tagger's tags: (name, category, bias, weight on the image's mean R, G, B in 0-1). Category 9 is WD14's
# rating; the colour tags fire on the tiny dataset's shapes by their colour, "simple_background" on every image.
DEMO_TAGGER_TAGS = [("general", 9, 2.0, (0, 0, 0)), ("sensitive", 9, -2.0, (0, 0, 0)),
                    ("simple_background", 0, 3.0, (0, 0, 0)), ("red_shape", 0, -0.5, (4.0, -2.0, -2.0)),
                    ("blue_shape", 0, -0.5, (-2.0, -2.0, 4.0)), ("yellow_shape", 0, -0.5, (2.0, 2.0, -4.0))]


def build_tiny_tagger(out: str | Path, tags: Optional[list[tuple]] = None, dynamic_batch: bool = True) -> Path:
    """A WD14-layout tagger folder (``model.onnx`` + ``selected_tags.csv``) with hand-set weights, so auto-label can
    be tried without downloading anything: ``python -m lora_core.tiny --tagger DIR``, then auto-label with
    ``--captioner wd14 --model DIR``. Needs the ``onnx`` package (``pip install onnx``) to write the graph.

    Its interface is WD14's: NHWC BGR 0-255 in, one sigmoid per tag out; inside, the image's mean colour goes
    through one linear layer. ``dynamic_batch=False`` exports a fixed batch of one, as some published taggers are.
    """
    import csv

    import numpy as np
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise SystemExit("the demo tagger is written with the onnx package: pip install onnx") from None

    tags = DEMO_TAGGER_TAGS if tags is None else tags
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rgb = np.array([t[3] for t in tags], dtype=np.float32).T / 255.0  # (3, tags); the input is 0-255
    bgr = rgb[::-1].copy()  # the tagger is fed BGR
    bias = np.array([t[2] for t in tags], dtype=np.float32)
    batch = "batch" if dynamic_batch else 1
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["output"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 32, 32, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, len(tags)])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
         numpy_helper.from_array(bgr, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(out / "model.onnx"))
    with open(out / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, *_) in enumerate(tags):
            writer.writerow([i, name, category, 100 - i])
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_core.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder to write the model into; with --single-file a folder or the "
                                      "checkpoint's own path (x.safetensors)")
    parser.add_argument("--single-file", action="store_true", help="write one WebUI-style .safetensors checkpoint")
    parser.add_argument("--tagger", metavar="DIR", help="write a demo WD14-style tagger into DIR, to try "
                                                        "auto-label without downloaded weights")
    parser.add_argument("--family", default="sd1", choices=FAMILY_NAMES + ("flux",))
    parser.add_argument("--flux-variant", default="dev", choices=("dev", "schnell"),
                        help="flux: dev has the guidance embedder, schnell has not")
    parser.add_argument("--flux-layout", default="full", choices=("full", "parts"),
                        help="flux --single-file: one file with encoders and AE (as Forge keeps it), or a "
                             "transformer-only file plus ae/clip_l/t5xxl files beside it")
    parser.add_argument("--fp8", action="store_true", help="flux --single-file: transformer weights in float8_e4m3fn")
    parser.add_argument("--prediction-type", default="epsilon", choices=PREDICTION_TYPES,
                        help="v_prediction builds an SD 2.x 768-v-style model")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", help="also write a tiny dataset of coloured shapes into this folder")
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args(argv)
    if not (args.out or args.tagger or args.dataset):
        parser.error("give --out (a model), --tagger DIR and/or --dataset DIR")
    if args.out and Path(args.out).suffix.lower() == ".safetensors" and not args.single_file:
        parser.error(f"--out {args.out}: a .safetensors path is a single-file checkpoint; add --single-file, or "
                     f"give a folder for a diffusers model")
    if args.out and args.family == "flux":
        from .image.flux_tiny import build_tiny_flux

        print(build_tiny_flux(args.out, args.single_file, args.flux_variant, args.seed, args.flux_layout, args.fp8))
    elif args.out:
        print(build_tiny_sd(args.out, args.single_file, args.family, args.size, args.seed, args.prediction_type))
    if args.tagger:
        print(build_tiny_tagger(args.tagger))
    if args.dataset:
        print(make_tiny_dataset(args.dataset, n=args.images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
