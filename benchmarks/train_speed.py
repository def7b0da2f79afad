"""Steps/s and peak memory of our trainer against a peer, same model, data, steps, batch and resolution.

Peers:

* ``baseline`` (default): a loop that does what diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
  does each step — load and transform the images, VAE-encode them, run the text encoder, predict the noise, plain
  AdamW — in this file;
* ``kohya``: kohya sd-scripts' ``train_network.py`` from a checkout the user gives (``--kohya-dir``, run with
  ``--kohya-python``, its own environment), never vendored. Its SD1 loader builds SD 1.5's exact shapes, so this mode
  trains the full-size random SD 1.5 single file of `full_models` (``--size full``), and both trainers train kohya's
  default module set (attention, proj_in/out and feed-forward of every transformer block: 192 modules), checked by
  counting the modules in both output files.

Ours is ``python -m lora_core.train`` (our CLI) with its defaults (latents and text embeddings cached once). Every
repeat of every variant runs in its own process and writes into its own folder; its rate comes from that run's own
step times only (our events file, the baseline's events file, kohya's TensorBoard log), after ``--warmup`` steps.
Peak memory is that process's max RSS (``wait4``) on a CPU, max allocated CUDA memory on a GPU. Variants alternate,
and each variant's best repeat is its figure (noise on a shared machine only ever slows a run down); every repeat is
listed too. The JSON line (last) carries the load average at start and end and the core count; a load above the
core count prints a warning, and such figures are not results.

    python benchmarks/train_speed.py --size mid --resolution 256 --batch-size 4 --steps 12 --repeats 2
    python benchmarks/train_speed.py --peer kohya --kohya-dir ~/sd-scripts --kohya-python ~/sd-scripts/venv/bin/python \\
        --size full --resolution 256 --batch-size 1 --steps 12 --repeats 2

``--family flux``: the tiny/mid FLUX.1 model (`lora_core.image.flux_tiny`) against a baseline that runs the AE, CLIP-L
and T5 every step (`flux_bench.run_flux_baseline`); ``--family flux --real-shape`` (CUDA only): FLUX.1 [dev]'s real
transformer with random weights built on the GPU, fp8 base, steps/s and peak VRAM at 512 and 1024 px
(`flux_bench.real_shape`).

    python benchmarks/train_speed.py --family flux --size mid --resolution 128 --batch-size 2 --steps 12
    python benchmarks/train_speed.py --family flux --real-shape --steps 6 --warmup 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench_common import LoadWatch, child_json, emit, fresh_dir, rate_from_events, run_child, step_times  # noqa: E402

# kohya's networks.lora wraps every Linear / 1x1 Conv inside each Transformer2DModel of the UNet
KOHYA_UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
OUR_DEFAULT_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def _peak_cuda_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def run_baseline(model: Path, data: Path, out: Path, args) -> dict:
    """The reference loop, kept deliberately plain: it is what most LoRA scripts do. Writes one step event per
    step into its own ``events.jsonl``, so its rate is read the same way as ours."""
    import torch
    import torch.nn.functional as F

    from lora_core.dataset.scan import load_image, scan_dataset
    from lora_core.events import EventWriter
    from lora_core.image.lora import add_lora, lora_parameters
    from lora_core.image.sd_models import load_sd_model

    events = EventWriter(fresh_dir(out) / "events.jsonl")
    torch.manual_seed(0)
    sd = load_sd_model(model)
    sd.vae.requires_grad_(False)
    sd.text_encoder.requires_grad_(False)
    add_lora(sd.unet, args.modules.split(","), 8, 8.0, 0.0)
    sd.unet.train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    for m in (sd.unet, sd.vae, sd.text_encoder):
        m.to(device)
    optimizer = torch.optim.AdamW(lora_parameters(sd.unet), lr=1e-4)
    items = scan_dataset(data).items
    events.emit("start", step=0, total_steps=args.steps)
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
        events.emit("step", step=step + 1, loss=loss.item())
    events.close()
    return {"peak_cuda_mb": _peak_cuda_mb()}


def our_config(model: Path, data: Path, out: Path, args, modules: list[str], network_type: str = "lora") -> Path:
    """Our run's YAML, written into its run folder: what a user would pass to ``lora-train --config``."""
    import yaml

    cfg = {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out / "output"),
           "output_name": "ours", "resolution": args.resolution, "batch_size": args.batch_size, "lora_rank": 8,
           "alpha": 8.0, "max_train_steps": args.steps, "learning_rate": 1e-4, "mixed_precision": args.mixed_precision,
           "save_precision": "fp16", "cache_latents": not args.no_cache,
           "cache_text_encoder_outputs": not args.no_cache, "unet_target_modules": modules,
           "network_type": network_type}
    if args.family == "flux":  # FLUX: its own default targets (attention + MLP of every block), T5 length as the peer's
        del cfg["unet_target_modules"]
        cfg.update(model_family="flux", t5_max_length=args.t5_max_length)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def kohya_command(kohya_dir: Path, python: str, model: Path, data: Path, out: Path, args) -> list[str]:
    """``train_network.py`` with the same model, data, steps, resolution, batch, rank/alpha, learning rate and
    optimizer as our run, UNet only (as ours), latents cached, SDPA attention, step times logged to TensorBoard.
    Writes the dataset TOML and the CLIP tokenizer cache it needs (sd-scripts would otherwise fetch the tokenizer
    from Hugging Face) into the run folder."""
    from lora_core.image.clip_tokenizer import write_clip_tokenizer

    script = Path(kohya_dir) / "train_network.py"
    if not script.is_file():
        raise SystemExit(f"--kohya-dir: no train_network.py in {kohya_dir} (give the sd-scripts checkout's folder)")
    tokenizers = out / "tokenizers"
    write_clip_tokenizer(tokenizers / "openai_clip-vit-large-patch14")
    toml = out / "dataset.toml"
    toml.write_text("[general]\ncaption_extension = \".txt\"\nshuffle_caption = false\n\n[[datasets]]\n"
                    f"resolution = {args.resolution}\nbatch_size = {args.batch_size}\nenable_bucket = false\n\n"
                    f"[[datasets.subsets]]\nimage_dir = {json.dumps(str(data))}\nnum_repeats = 1\n", encoding="utf-8")
    return [python, str(script), "--pretrained_model_name_or_path", str(model), "--dataset_config", str(toml),
            "--output_dir", str(out / "output"), "--output_name", "kohya", "--save_model_as", "safetensors",
            "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8",
            "--network_train_unet_only", "--learning_rate", "1e-4", "--unet_lr", "1e-4", "--optimizer_type", "AdamW",
            "--lr_scheduler", "constant", "--max_train_steps", str(args.steps), "--mixed_precision",
            args.mixed_precision, "--save_precision", "fp16", "--cache_latents", "--sdpa", "--seed", "42",
            "--max_data_loader_n_workers", "0", "--max_grad_norm", "1.0", "--logging_dir", str(out / "logs"),
            "--log_with", "tensorboard", "--tokenizer_cache_dir", str(tokenizers)]


def tensorboard_steps(log_dir: Path, tag: str = "loss/current") -> list[tuple[int, float]]:
    """(step, wall time) of each optimizer step kohya logged, from the one TensorBoard file of this run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    if len(files) != 1:
        raise RuntimeError(f"{log_dir}: expected one TensorBoard events file for this run, found {len(files)}")
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        raise RuntimeError(f"{files[0]}: no {tag!r} scalars (tags: {acc.Tags().get('scalars')})")
    return [(e.step, e.wall_time) for e in acc.Scalars(tag)]


def steps_to_events(steps: list[tuple[int, float]], path: Path) -> Path:
    """Kohya's step times as step events in its run folder, so every rate is read by the one `rate_from_events`."""
    with open(path, "w", encoding="utf-8") as fh:
        for step, when in steps:
            fh.write(json.dumps({"type": "step", "step": step, "time": when}) + "\n")
    return path


def lora_module_count(path: Path) -> int:
    """UNet modules in a kohya-format LoRA file (one ``lora_down`` per module), read from the header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(1 for k in f.keys() if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))


def run_one(variant: str, repeat: int, model: Path, data: Path, work: Path, args) -> dict:
    """One repeat of one variant in its own process and folder; returns its row for the JSON line."""
    out = fresh_dir(work / "runs" / f"{variant}-{repeat}")
    started = time.time()
    modules = KOHYA_UNET_MODULES if args.peer == "kohya" else OUR_DEFAULT_MODULES
    if variant in ("ours", "ours-lora"):  # ours-lora: plain LoRA beside --network-type's run
        kind = args.network_type if variant == "ours" else "lora"
        cmd = [sys.executable, "-m", "lora_core.train", "--config",
               str(our_config(model, data, out, args, modules, kind)), "--events", str(out / "events.jsonl"),
               "--no-progress"]
    elif variant == "baseline":
        cmd = [sys.executable, __file__, "--variant", "baseline", "--model", str(model), "--data", str(data),
               "--out", str(out / "baseline"), "--resolution", str(args.resolution), "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--mixed-precision", args.mixed_precision,
               "--modules", ",".join(modules), "--family", args.family, "--t5-max-length", str(args.t5_max_length)]
    else:
        cmd = kohya_command(Path(args.kohya_dir), args.kohya_python, model, data, out, args)
    ours_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    run = run_child(cmd, out, timeout=args.timeout, env={"PYTHONPATH": ours_path} if variant != "kohya" else None)
    what = f"{variant} repeat {repeat} ({out})"
    if variant == "baseline":
        child = child_json(run, what)
        events = out / "baseline" / "events.jsonl"
    else:
        if run["timed_out"] or run["returncode"] != 0:
            child_json(run, what)  # raises with the stderr tail
        child = {}
        if variant in ("ours", "ours-lora"):
            events = out / "events.jsonl"
            steps = [e for e in map(json.loads, events.read_text(encoding="utf-8").splitlines())
                     if e.get("type") == "step"]
            child["peak_cuda_mb"] = max((e.get("peak_mem_mb") or 0) for e in steps) if _cuda() else 0.0
        else:
            events = steps_to_events(tensorboard_steps(out / "logs"), out / "steps.jsonl")
    rate = rate_from_events(events, args.warmup)
    row = {"variant": variant, "repeat": repeat, "dir": str(out), "steps_s": rate["steps_s"],
           "timed_steps": rate["timed_steps"], "events": rate["events"],
           "first_timed_time": rate["first_timed_time"], "setup_s": step_times(events)[0][1] - started,
           "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
           "peak_mb": child.get("peak_cuda_mb") or run["peak_rss_mb"]}
    if args.peer == "kohya" and variant != "baseline":
        output = out / "output" / ("ours.safetensors" if variant == "ours" else "kohya.safetensors")
        row["trained_modules"] = lora_module_count(output)
    return row


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_inputs(work: Path, args) -> tuple[Path, Path]:
    """The model (tiny/mid diffusers folder, or the full-size SD 1.5 single file) and the captioned images."""
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    if args.family == "flux":
        from lora_core.image.flux_tiny import build_tiny_flux

        model = build_tiny_flux(work / "model", size=args.size)
    elif args.size == "full":
        from full_models import build_full_single_file

        model = build_full_single_file("sd1", Path(args.model_cache) if args.model_cache else work / "model")
    else:
        model = build_tiny_sd(work / "model", size=args.size)
    data = make_tiny_dataset(work / "data", n=args.images, size=args.resolution)
    return model, data


def summarise(rows: list[dict], args) -> dict:
    best = {}
    for row in rows:
        if row["variant"] not in best or row["steps_s"] > best[row["variant"]]["steps_s"]:
            best[row["variant"]] = row
    ours, peer = best["ours"], best[args.peer]
    result = {"bench": f"train_speed_{'flux_' if args.family == 'flux' else ''}{args.size}_{args.resolution}px_bs{args.batch_size}"
                       f"{'_nocache' if args.no_cache else ''}{'_vs_kohya' if args.peer == 'kohya' else ''}",
              "peer": args.peer, "ours_steps_s": round(ours["steps_s"], 4),
              f"{args.peer}_steps_s": round(peer["steps_s"], 4), "ratio": round(ours["steps_s"] / peer["steps_s"], 3),
              "ours_peak_mb": round(ours["peak_mb"], 1), f"{args.peer}_peak_mb": round(peer["peak_mb"], 1),
              "ours_setup_s": round(ours["setup_s"], 2), f"{args.peer}_setup_s": round(peer["setup_s"], 2),
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "mixed_precision": args.mixed_precision, "device": "cuda" if _cuda() else "cpu",
              "peak_memory": "max CUDA allocated" if _cuda() else "max RSS of the process",
              "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    if "ours-lora" in best:  # --network-type: the type's rate and peak beside plain LoRA's, same run
        lora = best["ours-lora"]
        result.update(network_type=args.network_type, lora_steps_s=round(lora["steps_s"], 4),
                      lora_peak_mb=round(lora["peak_mb"], 1), vs_lora=round(ours["steps_s"] / lora["steps_s"], 3))
        result["bench"] += f"_{args.network_type}"
    if args.peer == "kohya":
        result["ours_trained_modules"] = ours["trained_modules"]
        result["kohya_trained_modules"] = peer["trained_modules"]
        result["notes"] = ("ours caches text embeddings; train_network.py runs the SD1 text encoder every step")
        if ours["trained_modules"] != peer["trained_modules"]:
            print(f"warning: ours trained {ours['trained_modules']} modules, kohya {peer['trained_modules']}: "
                  f"the speeds are not for the same work", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid", "full"],
                        help="tiny/mid: narrow SD1-layout models (lora_core.tiny); full: SD 1.5's real shapes")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of each rate (first-step costs)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating; the best counts")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--no-cache", action="store_true", help="run our loop without caching (ablation)")
    parser.add_argument("--peer", default="baseline", choices=["baseline", "kohya"])
    parser.add_argument("--network-type", default="lora", choices=["lora", "locon", "loha", "lokr", "dora"],
                        help="train this adapter type as 'ours', and plain LoRA beside it (steps/s, peak memory)")
    parser.add_argument("--kohya-dir", help="with --peer kohya: the sd-scripts checkout holding train_network.py")
    parser.add_argument("--kohya-python", default=sys.executable,
                        help="with --peer kohya: the python of sd-scripts' own environment (default: this one)")
    parser.add_argument("--work-dir", help="keep every run's folder here (must be empty or new); default: a "
                                           "temporary folder, removed at the end")
    parser.add_argument("--model-cache", help="--size full: folder to keep the built model in between invocations")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take before it is killed")
    parser.add_argument("--family", default="sd", choices=["sd", "flux"],
                        help="sd: SD1-layout models; flux: the tiny/mid FLUX.1 model against a baseline running the "
                             "AE, CLIP-L and T5 every step")
    parser.add_argument("--t5-max-length", type=int, default=128, help="--family flux: T5 tokens per caption")
    parser.add_argument("--real-shape", action="store_true",
                        help="--family flux, CUDA only: FLUX.1 [dev]'s real transformer, random weights on the GPU, "
                             "fp8 base: steps/s and peak VRAM at --real-resolutions")
    parser.add_argument("--real-resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--rank", type=int, default=16, help="--real-shape: LoRA rank")
    parser.add_argument("--no-fp8", action="store_true", help="--real-shape: bf16 base weights instead of fp8")
    parser.add_argument("--variant", choices=["baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--modules", default=",".join(OUR_DEFAULT_MODULES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        if args.family == "flux":
            from flux_bench import run_flux_baseline

            print(json.dumps(run_flux_baseline(Path(args.model), Path(args.data), Path(args.out), args)))
            return 0
        print(json.dumps(run_baseline(Path(args.model), Path(args.data), Path(args.out), args)))
        return 0
    if args.family == "flux" and args.peer == "kohya":
        parser.error("--family flux compares against the baseline loop only")
    if args.family == "flux" and args.size == "full" and not args.real_shape:
        parser.error("--family flux: --size tiny or mid (the full shape is --real-shape, on a CUDA GPU)")
    if args.real_shape:
        if args.family != "flux":
            parser.error("--real-shape needs --family flux")
        from flux_bench import real_shape

        watch = LoadWatch()
        emit(real_shape(args), watch)
        return 0
    if args.peer == "kohya":
        if not args.kohya_dir:
            parser.error("--peer kohya needs --kohya-dir (a checkout of github.com/kohya-ss/sd-scripts)")
        if args.size != "full":
            parser.error("--peer kohya needs --size full: sd-scripts' SD1 loader builds SD 1.5's exact shapes")
        if not (Path(args.kohya_dir) / "train_network.py").is_file():
            parser.error(f"--kohya-dir: no train_network.py in {args.kohya_dir}")
    if args.steps < args.warmup + 2:
        parser.error(f"--steps must be at least --warmup + 2 ({args.warmup + 2}) to time anything")
    watch = LoadWatch()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, data = build_inputs(work, args)
        rows = []
        # alternate the variants so slow phases of a shared machine hit both alike
        for repeat in range(args.repeats):
            for variant in (args.peer, "ours") + (("ours-lora",) if args.network_type != "lora" else ()):
                try:
                    rows.append(run_one(variant, repeat, model, data, work, args))
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
        emit(summarise(rows, args), watch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
