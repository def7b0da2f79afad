"""Steps/s and peak memory of our training loop against a baseline loop, same model, data, batch and resolution.

The baseline does what diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` does each step: load and
transform the images, VAE-encode them, run the text encoder, predict the noise, plain AdamW. Ours is
``lora_core.loop.train`` with its defaults (latents and text embeddings cached once). Each variant runs in its own
child process so peak memory (max RSS on CPU, max allocated on CUDA) is its own. The last line printed is one JSON
object:

    python benchmarks/train_speed.py --size mid --resolution 256 --batch-size 4 --steps 12
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
sys.path.insert(0, str(ROOT))


def _peak_mb() -> float:
    import torch

    from lora_core.loop import peak_memory_mb

    return peak_memory_mb(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def run_ours(model: Path, data: Path, out: Path, args) -> dict:
    from lora_core.config import config_from_dict
    from lora_core.events import EventWriter, read_events
    from lora_core.loop import train

    cfg = config_from_dict({"train_data_dir": str(data), "base_model": str(model), "output_dir": str(out),
                            "resolution": args.resolution, "batch_size": args.batch_size, "lora_rank": 8,
                            "max_train_steps": args.steps, "learning_rate": 1e-4,
                            "mixed_precision": args.mixed_precision, "save_precision": "fp16",
                            "cache_latents": not args.no_cache, "cache_text_encoder_outputs": not args.no_cache})
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    t0 = time.time()
    train(cfg, EventWriter(events), show_progress=False)
    steps = [e for e in read_events(events) if e["type"] == "step"]
    timed = steps[args.warmup:]
    rate = (len(timed) - 1) / (timed[-1]["time"] - timed[0]["time"])
    # setup = loading + caching, paid once per run; reported so the cache's cost is visible beside its gain
    return {"steps_s": rate, "peak_mb": _peak_mb(), "setup_s": steps[0]["time"] - t0}


def run_baseline(model: Path, data: Path, out: Path, args) -> dict:
    """The reference loop, kept deliberately plain: it is what most LoRA scripts do."""
    import torch
    import torch.nn.functional as F

    from lora_core.dataset.scan import load_image, scan_dataset
    from lora_core.image.lora import add_lora, lora_parameters
    from lora_core.image.sd_models import load_sd_model

    torch.manual_seed(0)
    sd = load_sd_model(model)
    sd.vae.requires_grad_(False)
    sd.text_encoder.requires_grad_(False)
    add_lora(sd.unet, ["to_q", "to_k", "to_v", "to_out.0"], 8, 8.0, 0.0)
    sd.unet.train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to(device)
    optimizer = torch.optim.AdamW(lora_parameters(sd.unet), lr=1e-4)
    items = scan_dataset(data).items
    times = []
    for step in range(args.steps):
        batch = [items[(step * args.batch_size + i) % len(items)] for i in range(args.batch_size)]
        pixels = torch.stack([load_image(it.path, args.resolution, args.resolution) for it in batch]).to(device)
        ids = sd.tokenizer([it.caption for it in batch], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                latents = sd.vae.encode(pixels).latent_dist.sample() * sd.vae.config.scaling_factor
                text = sd.text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=device)
            noisy = sd.noise_scheduler.add_noise(latents, noise, t)
            pred = sd.unet(noisy, t, text).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    timed = times[args.warmup:]
    return {"steps_s": (len(timed) - 1) / (timed[-1] - timed[0]), "peak_mb": _peak_mb()}


def child(args) -> None:
    model, data, out = Path(args.model), Path(args.data), Path(args.out)
    result = (run_ours if args.variant == "ours" else run_baseline)(model, data, out, args)
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating; the best counts")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--no-cache", action="store_true", help="run our loop without caching (ablation)")
    parser.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return 0
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_sd(tmp / "model", size=args.size)
        data = make_tiny_dataset(tmp / "data", n=args.images, size=args.resolution)
        results: dict[str, dict] = {}
        # alternate the variants and keep each one's best run: on a shared machine, noise only ever slows a run down
        for variant in ["baseline", "ours"] * args.repeats:
            cmd = [sys.executable, __file__, "--variant", variant, "--model", str(model), "--data", str(data),
                   "--out", str(tmp / variant), "--resolution", str(args.resolution), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--mixed-precision", args.mixed_precision] + (["--no-cache"] if args.no_cache else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            if variant not in results or run["steps_s"] > results[variant]["steps_s"]:
                results[variant] = run
    ours, base = results["ours"], results["baseline"]
    print(json.dumps({"bench": f"train_speed_{args.size}_{args.resolution}px_bs{args.batch_size}"
                               f"{'_nocache' if args.no_cache else ''}",
                      "ours_steps_s": round(ours["steps_s"], 4), "baseline_steps_s": round(base["steps_s"], 4),
                      "ratio": round(ours["steps_s"] / base["steps_s"], 3),
                      "ours_peak_mb": round(ours["peak_mb"], 1), "baseline_peak_mb": round(base["peak_mb"], 1),
                      "ours_setup_s": round(ours["setup_s"], 2), "mixed_precision": args.mixed_precision,
                      "device": "cuda" if "cuda" in os.environ.get("CUDA_VISIBLE_DEVICES", "") else "auto"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
