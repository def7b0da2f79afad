"""``python -m lora_core.quickstart``: train a LoRA end to end on the built-in tiny model, offline, in about a minute.

Builds the tiny SD1-shaped model (random weights) and a few generated images with captions, writes the config it
trains with (``<dir>/quickstart.yaml`` — the same file ``lora-train --config`` takes), trains, and prints the path of
the finished ``.safetensors``. The LoRA is real in format and plumbing; the model is random, so the pictures are not.
``--family flux`` does the same with the tiny FLUX.1 [dev] model (a Forge-style single file) and writes a kohya FLUX
LoRA, as Forge and ComfyUI load it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import yaml

from .config import load_config
from .image.flux_tiny import build_tiny_flux
from .tiny import build_tiny_sd, make_tiny_dataset
from .train import run_training


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_core.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=".quickstart", help="where the model, images and output go")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--family", default="sd1", choices=("sd1", "flux"),
                        help="the tiny model to train on: SD1-shaped (default) or FLUX.1 [dev]-shaped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    root = Path(args.dir).resolve()
    flux = args.family == "flux"
    # a WebUI-style single-file checkpoint, as in models/Stable-diffusion
    model = root / ("tiny-flux-dev.safetensors" if flux else "tiny-sd1.safetensors")
    if not model.is_file():
        model = build_tiny_flux(model, single_file=True) if flux else build_tiny_sd(root, single_file=True)
    data = root / "images"
    if not data.is_dir():
        make_tiny_dataset(data, n=6, size=64)
    config = root / "quickstart.yaml"
    config.write_text(yaml.safe_dump({
        "train_data_dir": "images", "base_model": model.name, "output_dir": "output",
        "output_name": "my_first_flux_lora" if flux else "my_first_lora",
        "trigger_word": "qs_shapes", "resolution": 64, "lora_rank": 4, "batch_size": 2,
        "max_train_steps": args.steps, "learning_rate": 1e-3, "save_steps": max(args.steps // 2, 1),
        **({"t5_max_length": 32} if flux else {}),  # the tiny T5's captions are short; 512 would only pad
    }, sort_keys=False))
    print(f"config: {config}", file=sys.stderr)
    result = run_training(load_config(config))
    if result.status != "finished":
        print(f"training {result.status}: {result.error or ''}", file=sys.stderr)
        return 1
    print(f"trained {result.step} steps; use it as <lora:{result.output.stem}:0.8>", file=sys.stderr)
    print(result.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
