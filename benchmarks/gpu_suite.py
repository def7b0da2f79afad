"""The GPU suite: speed and memory of real-size LoRA runs on one GPU, in one command, with nothing downloaded.

    python benchmarks/gpu_suite.py                      # CUDA: full-size SD 1.5 and SDXL, about 6-8 minutes
    python benchmarks/gpu_suite.py --device cpu         # the same code on the mid SD1 / tiny SDXL models
    python benchmarks/gpu_suite.py --device cpu --size tiny --steps 4   # the CI smoke path (seconds per variant)

It builds full-size SD 1.5 and SDXL models with random weights drawn on the GPU (`full_models`, the one full-size
builder: the published shapes, written tensor by tensor, in a child process so the suite itself holds no GPU
memory) as single files, and trains each variant through the normal config and CLI (`lora_core.train`), each in
its own process and folder:

* SD 1.5, 512 px, batch 4 and SDXL, 1024 px, batch 1, bf16: without and with ``training.gradient_checkpointing``,
  and with ``model.fp8_base``;
* SD 1.5 with fp16 (the grad scaler) and with ``training.optimizer: adamw8bit``;
* a real out-of-memory: the SD 1.5 bf16 run again under ``torch.cuda.set_per_process_memory_fraction`` at 70% of
  the peak it measured, with ``training.oom_policy: step_down`` — the JSON shows the OOM caught and where it stepped
  down to (on a CPU, where memory cannot be capped, the OOM is injected with ``LORA_CORE_FAULT_OOM`` and says so).

Per variant: steps/s from that run's own events (after ``--warmup`` steps), peak memory (max CUDA allocated and
reserved; max RSS on a CPU), model FLOP utilisation (FLOPs of one step counted with
``torch.utils.flop_counter.FlopCounterMode`` on a ``meta`` copy of the UNet — forward plus the activation-gradient
backward a LoRA step needs; LoRA's own FLOPs, under 1%, left out — divided by the device's dense bf16/fp16 peak from
`PEAK_TFLOPS`, looked up by device name), and the memory plan's estimate (`lora_core.plan`) beside the measured peak.
A setting this version does not have, or one refused on this device (fp16 and 8-bit AdamW on a CPU), makes that
variant ``{"skipped": reason}``; a failure is ``{"error": ...}``; the suite always ends with its one JSON line. A time
budget (``--budget-s``) skips what would not finish in time, so the command stays under 8 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_common import LoadWatch, emit, fresh_dir, rate_from_events, run_child  # noqa: E402

# Dense (no sparsity) tensor-core peak in TFLOP/s for bf16 (fp16 where the GPU has no bf16), from the vendors'
# datasheets and architecture whitepapers. Matched in order against torch.cuda.get_device_name(): specific first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A6000", 155.0), ("A40", 150.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0),
    ("RTX 4080", 97.0), ("RTX 3090", 71.0), ("RTX 3080", 59.5), ("V100", 125.0), ("T4", 65.0),
]
EXIT_CONFIG, EXIT_OOM = 2, 4  # lora_core.events exit codes: config/input refused, out of memory


def peak_tflops(device_name: str) -> Optional[tuple[float, str]]:
    """(peak TFLOP/s, table entry) for a CUDA device name, or None when the table does not know it."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value, key
    return None


@dataclass
class Variant:
    name: str
    family: str  # sd1 | sdxl
    resolution: int
    batch_size: int
    settings: dict = field(default_factory=dict)  # config settings on top of the base config
    kind: str = "train"  # train | oom


def variants(cuda: bool, size: str) -> list[Variant]:
    """The suite. On CUDA at full size: SD 1.5 at 512 px batch 4, SDXL at 1024 px batch 1. On a CPU the same list at
    sizes a CPU finishes in minutes (mid SD1 / tiny SDXL at 128 px) or seconds (tiny, 64 px)."""
    if cuda and size == "full":
        sd_res, sd_bs, xl_res = 512, 4, 1024
    else:
        sd_res, sd_bs, xl_res = (64, 2, 64) if size == "tiny" else (128, 2, 128)
    sd_tag, xl_tag = f"sd15_{sd_res}px_bs{sd_bs}", f"sdxl_{xl_res}px_bs1"
    bf16 = {"mixed_precision": "bf16"}
    # headline figures first: when the time budget runs out, what is skipped is the least important
    return [
        Variant(f"{sd_tag}_bf16", "sd1", sd_res, sd_bs, bf16),
        Variant(f"{sd_tag}_bf16_gc", "sd1", sd_res, sd_bs, {**bf16, "gradient_checkpointing": True}),
        Variant(f"{xl_tag}_bf16", "sdxl", xl_res, 1, bf16),
        Variant(f"{xl_tag}_bf16_gc", "sdxl", xl_res, 1, {**bf16, "gradient_checkpointing": True}),
        Variant(f"{xl_tag}_bf16_fp8base", "sdxl", xl_res, 1, {**bf16, "fp8_base": True}),
        Variant(f"{sd_tag}_bf16_fp8base", "sd1", sd_res, sd_bs, {**bf16, "fp8_base": True}),
        Variant(f"{sd_tag}_fp16_scaler", "sd1", sd_res, sd_bs, {"mixed_precision": "fp16"}),
        Variant(f"{sd_tag}_bf16_adamw8bit", "sd1", sd_res, sd_bs, {**bf16, "optimizer": "adamw8bit"}),
        Variant(f"{sd_tag}_bf16_oom_step_down", "sd1", sd_res, sd_bs, {**bf16, "oom_policy": "step_down"}, "oom"),
    ]


def base_config(v: Variant, model: Path, data: Path, out: Path, args) -> dict:
    """The config a user would write for this run, flat form; the variant's settings on top."""
    return {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out / "output"),
            "output_name": v.name, "resolution": v.resolution, "batch_size": v.batch_size, "lora_rank": 16,
            "max_train_steps": args.steps, "learning_rate": 1e-4, "save_precision": "fp16",
            "cache_latents": True, "cache_text_encoder_outputs": True, "device": args.device,
            "sample_steps": 1,  # the card preview every run renders at its end is not what is measured here
            **v.settings}


def check_config(cfg: dict) -> Optional[str]:
    """None if this version accepts the config, else the reason (e.g. a setting it does not have yet)."""
    from lora_core.config import ConfigError, config_from_dict

    try:
        config_from_dict(cfg)
    except ConfigError as e:
        return "; ".join(e.problems)
    return None


# ---- FLOPs ------------------------------------------------------------------------------------------------------
def unet_config(family: str, size: str) -> dict:
    if size == "full":
        from full_models import unet_config as full

        return full(family)
    from lora_core.tiny import build_components

    return dict(build_components(family, size)["unet"].config)


def flops_per_step(family: str, size: str, batch: int, resolution: int) -> float:
    """FLOPs of one LoRA training step's UNet work, counted on a meta-device UNet (no memory, no time): forward and
    the backward through the frozen weights to the activations (every layer, since LoRA sits in every block)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = {k: v for k, v in unet_config(family, size).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False)
    side = resolution // 8
    latents = torch.zeros(batch, unet.config.in_channels, side, side, device="meta", requires_grad=True)
    text = torch.zeros(batch, 77, unet.config.cross_attention_dim, device="meta")
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, device="meta"),
                                      "time_ids": torch.zeros(batch, 6, device="meta")}
    with FlopCounterMode(display=False) as counter:
        out = unet(latents, torch.full((batch,), 500, device="meta"), text, **extra).sample
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


# ---- the children -----------------------------------------------------------------------------------------------
def child_train(args) -> int:
    """One variant: cap the GPU memory if asked, run the real CLI in this process, then report the peaks."""
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.cap_mb and cuda:
        total = torch.cuda.get_device_properties(0).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_mb / total))
    from lora_core.train import main as lora_train

    code = lora_train(["--config", args.config, "--events", args.events, "--no-progress"])
    peaks = {"exit": code}
    if cuda:
        peaks.update(peak_allocated_mb=torch.cuda.max_memory_allocated() / 2**20,
                     peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20)
    print(json.dumps(peaks))
    return 0


def child_plan(args) -> int:
    """The memory plan for several configs of one model: measured once (the measurement loads the model), then
    estimated for each config's settings, as ``lora-train --plan`` would."""
    import torch

    from lora_core.config import config_from_dict
    from lora_core.plan import current_settings, estimate_mb, measure

    configs = json.loads(Path(args.configs).read_text(encoding="utf-8"))
    cfgs = {name: config_from_dict(raw) for name, raw in configs.items()}
    meas = measure(next(iter(cfgs.values())))
    device = torch.device("cuda" if (args.device != "cpu" and torch.cuda.is_available()) else "cpu")
    out = {}
    for name, cfg in cfgs.items():
        estimate, parts = estimate_mb(meas, current_settings(cfg), device)
        out[name] = {"estimate_mb": round(estimate, 1), "breakdown_mb": {k: round(v, 1) for k, v in parts.items()}}
    print(json.dumps(out))
    return 0


def probe(args) -> dict:
    """What the device is, from a child (so this process never holds a CUDA context)."""
    code = ("import json, platform, torch\n"
            "cuda = torch.cuda.is_available() and %r != 'cpu'\n"
            "info = {'torch': torch.__version__, 'cuda': cuda, 'cpu': platform.processor() or platform.machine()}\n"
            "if cuda:\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    info.update(name=p.name, total_mb=round(p.total_memory / 2**20), capability='%%d.%%d' %% (p.major,"
            " p.minor), bf16=torch.cuda.is_bf16_supported(), cuda_version=torch.version.cuda)\n"
            "print(json.dumps(info))\n") % args.device
    with tempfile.TemporaryDirectory() as tmp:
        run = run_child([sys.executable, "-c", code], Path(tmp), timeout=120)
    return json.loads(run["last_line"]) if run["returncode"] == 0 else {"error": run["stderr_tail"][-500:]}


# ---- the parent -------------------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def build_model(family: str, cuda: bool, args, work: Path, budget: Budget) -> Path:
    """Full size on CUDA, built on the GPU in a child; mid/tiny from `lora_core.tiny` otherwise. Single files,
    as WebUI users have them."""
    if args.size == "full":
        model_dir = Path(args.model_cache) if args.model_cache else work / "models"
        cached = model_dir / f"full-{family}.safetensors"
        if cached.is_file():
            return cached
        run = run_child([sys.executable, str(HERE / "full_models.py"), "--family", family, "--out", str(model_dir),
                         "--device", "cuda" if cuda else "cpu"], work / f"build-{family}",
                        timeout=max(60.0, budget.left()))
        if run["returncode"] != 0 or not cached.is_file():
            raise RuntimeError(f"building full-size {family} failed:\n{run['stderr_tail']}")
        return cached
    from lora_core.tiny import build_tiny_sd

    size = args.size if family == "sd1" else "tiny"  # SDXL comes in size tiny only
    return build_tiny_sd(work / "models" / family, single_file=True, family=family, size=size)


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def run_variant(v: Variant, model: Path, data: Path, work: Path, args, budget: Budget,
                cap_mb: Optional[float] = None, env: Optional[dict] = None) -> dict:
    out = fresh_dir(work / "runs" / v.name)
    cfg = base_config(v, model, data, out, args)
    refused = check_config(cfg)
    if refused:
        return {"skipped": f"config refused by this version: {refused}"}
    (out / "config.yaml").write_text(json.dumps(cfg, indent=1), encoding="utf-8")  # JSON is YAML
    events = out / "events.jsonl"
    cmd = [sys.executable, __file__, "--child", "train", "--config", str(out / "config.yaml"), "--events",
           str(events), "--device", args.device] + (["--cap-mb", str(cap_mb)] if cap_mb else [])
    started = time.time()
    run = run_child(cmd, out, timeout=max(30.0, min(args.variant_timeout, budget.left())), env=env)
    evs = read_events(events)
    end = next((e for e in reversed(evs) if e["type"] == "end"), {})
    try:
        peaks = json.loads(run["last_line"])
    except json.JSONDecodeError:
        peaks = {}
    code = peaks.get("exit", run["returncode"])
    result = {"family": v.family, "resolution": v.resolution, "batch_size": v.batch_size, "settings": v.settings,
              "dir": str(out), "wall_s": round(run["wall_s"], 1)}
    if run["timed_out"]:
        return {**result, "error": f"killed after {run['wall_s']:.0f} s (time limit)"}
    if code == EXIT_CONFIG:  # refused before training: a CUDA-only setting on a CPU, a missing package
        return {**result, "skipped": end.get("error") or run["stderr_tail"].strip().splitlines()[-1]}
    steps = [e for e in evs if e["type"] == "step"]
    ooms = [e for e in evs if e["type"] == "oom"]
    if v.kind == "oom":
        return {**result, **_oom_report(ooms, steps, end, code, peaks, cap_mb, env)}
    if code != 0:
        return {**result, "error": end.get("error") or run["stderr_tail"][-800:], "exit": code,
                "oom": code == EXIT_OOM}
    rate = rate_from_events(events, args.warmup)
    losses = [e.get("loss") for e in steps]
    result.update(steps_s=round(rate["steps_s"], 4), samples_s=round(rate["steps_s"] * v.batch_size, 3),
                  timed_steps=rate["timed_steps"], setup_s=round(steps[0]["time"] - started, 1),
                  finite_losses=f"{sum(1 for x in losses if x is not None)}/{len(losses)}",
                  peak_rss_mb=round(run["peak_rss_mb"], 1))
    if "peak_allocated_mb" in peaks:
        result.update(peak_vram_mb=round(peaks["peak_allocated_mb"], 1),
                      peak_reserved_mb=round(peaks["peak_reserved_mb"], 1))
    return result


def _oom_report(ooms: list[dict], steps: list[dict], end: dict, code: int, peaks: dict, cap_mb: Optional[float],
                env: Optional[dict]) -> dict:
    report = {"oom_source": ("injected with LORA_CORE_FAULT_OOM (no CUDA memory to cap)" if env else
                             f"real: torch.cuda.set_per_process_memory_fraction at {cap_mb:.0f} MB"),
              # the loop reports each OOM it caught; the step-down driver then reports the change it retries with
              "cap_mb": round(cap_mb, 1) if cap_mb else None, "ooms_caught": len([e for e in ooms if "change" not in e]),
              "changes": [e["change"] for e in ooms if e.get("change")], "final_status": end.get("status"),
              "steps_done": steps[-1]["step"] if steps else 0, "exit": code}
    if "peak_allocated_mb" in peaks:
        report["peak_vram_mb"] = round(peaks["peak_allocated_mb"], 1)
        report["peak_reserved_mb"] = round(peaks["peak_reserved_mb"], 1)
    if not ooms:
        report["error"] = "no out-of-memory happened under the cap: the cap was too generous"
    elif end.get("status") != "finished":
        report["error"] = f"after the OOM the run ended {end.get('status')!r}: {end.get('error')}"
    return report


def run_plans(chosen: dict[str, Variant], results: dict, models: dict, data: dict, work: Path, args,
              budget: Budget) -> None:
    """The plan's estimate beside each trained variant's measured peak, one measurement per model."""
    for family in ("sd1", "sdxl"):
        names = [n for n, v in chosen.items() if v.family == family and v.kind == "train"
                 and "steps_s" in results.get(n, {})]
        if not names:
            continue
        if budget.left() < 30:
            for n in names:
                results[n]["plan"] = {"skipped": "time budget (--budget-s) spent"}
            continue
        out = fresh_dir(work / "plans" / family)
        configs = {n: base_config(chosen[n], models[family], data[chosen[n].resolution], out / n, args)
                   for n in names}
        (out / "configs.json").write_text(json.dumps(configs), encoding="utf-8")
        run = run_child([sys.executable, __file__, "--child", "plan", "--configs", str(out / "configs.json"),
                         "--device", args.device], out, timeout=max(30.0, budget.left()))
        try:
            plans = json.loads(run["last_line"]) if run["returncode"] == 0 else None
        except json.JSONDecodeError:
            plans = None
        for n in names:
            if plans is None:
                results[n]["plan"] = {"error": run["stderr_tail"][-600:]}
                continue
            measured = results[n].get("peak_vram_mb") or results[n].get("peak_rss_mb")
            plans[n]["measured_mb"] = measured
            plans[n]["measured_is"] = "max CUDA allocated" if "peak_vram_mb" in results[n] else "max RSS"
            plans[n]["estimate_over_measured"] = round(plans[n]["estimate_mb"] / measured, 3) if measured else None
            results[n]["plan"] = plans[n]


def suite(args) -> dict:
    from lora_core.tiny import make_tiny_dataset

    budget = Budget(args.budget_s)
    device = probe(args)
    cuda = bool(device.get("cuda"))
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu for the CPU path)")
    peak = peak_tflops(device.get("name", "")) if cuda else None
    if args.peak_tflops:
        peak = (args.peak_tflops, "--peak-tflops")
    chosen = {v.name: v for v in variants(cuda, args.size)
              if not args.only or any(key in v.name for key in args.only.split(","))}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models: dict[str, Path] = {}
        data: dict[int, Path] = {}
        for name, v in chosen.items():
            if budget.left() < 20:
                results[name] = {"skipped": "time budget (--budget-s) spent"}
                continue
            try:
                if v.family not in models:
                    models[v.family] = build_model(v.family, cuda, args, work, budget)
                if v.resolution not in data:
                    data[v.resolution] = make_tiny_dataset(work / f"data-{v.resolution}", n=args.images,
                                                           size=v.resolution)
                cap, env = None, None
                if v.kind == "oom":
                    if cuda:
                        ref = results.get(name.replace("_oom_step_down", ""), {}).get("peak_vram_mb")
                        if not ref:
                            results[name] = {"skipped": "needs the plain bf16 run's peak to set the memory cap"}
                            continue
                        cap = 0.7 * ref
                    else:
                        env = {"LORA_CORE_FAULT_OOM": f"2:{v.batch_size}"}
                results[name] = run_variant(v, models[v.family], data[v.resolution], work, args, budget, cap, env)
            except Exception as e:  # one broken variant must not cost the others their figures
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
        for name, v in chosen.items():
            r = results[name]
            if "steps_s" in r:
                try:
                    flops = flops_per_step(v.family, args.size if v.family == "sd1" or args.size == "full"
                                           else "tiny", v.batch_size, v.resolution)
                    r["tflop_per_step"] = float(f"{flops / 1e12:.4g}")
                    r["achieved_tflops"] = float(f"{flops * r['steps_s'] / 1e12:.4g}")
                    r["mfu"] = round(flops * r["steps_s"] / (peak[0] * 1e12), 4) if peak else None
                except Exception as e:
                    r["mfu_error"] = f"{type(e).__name__}: {e}"
        if not args.no_plan:
            try:
                run_plans(chosen, results, models, data, work, args, budget)
            except Exception as e:
                for r in results.values():
                    r.setdefault("plan", {"error": f"{type(e).__name__}: {e}"})
    return {"bench": "gpu_suite", "device": device, "size": args.size, "steps": args.steps, "warmup": args.warmup,
            "peak_tflops": peak[0] if peak else None, "peak_tflops_from": peak[1] if peak else None,
            "mfu_note": None if peak else ("no peak for this device: pass --peak-tflops" if cuda
                                           else "no MFU on a CPU (no peak table); achieved_tflops is given"),
            "budget_s": args.budget_s, "wall_s": round(time.perf_counter() - budget.t0, 1), "variants": results}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--size", choices=["full", "mid", "tiny"],
                        help="default: full on CUDA, mid on a CPU (SDXL is always tiny unless full)")
    parser.add_argument("--steps", type=int, help="steps per variant (default 30 on CUDA, 6 on a CPU)")
    parser.add_argument("--warmup", type=int, help="steps left out of each rate (default 10 on CUDA, 2 on a CPU)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--only", help="comma-separated parts of variant names to run (e.g. sd15,fp8)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip variants once this much time is spent")
    parser.add_argument("--variant-timeout", type=float, default=300.0)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if the table lacks it")
    parser.add_argument("--no-plan", action="store_true", help="leave out the memory plan comparison")
    parser.add_argument("--work-dir", help="keep every run's folder here; default: a temporary folder")
    parser.add_argument("--model-cache", help="full size: keep the built models here and reuse them")
    parser.add_argument("--child", choices=["train", "plan"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    parser.add_argument("--cap-mb", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "train":
        return child_train(args)
    if args.child == "plan":
        return child_plan(args)
    watch = LoadWatch()
    if args.device == "auto":
        import importlib.util

        args.device = "cuda" if importlib.util.find_spec("torch") and _has_cuda() else "cpu"
    cuda = args.device == "cuda"
    args.size = args.size or ("full" if cuda else "mid")
    args.steps = args.steps or (30 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if args.steps < args.warmup + 2:
        parser.error(f"--steps must be at least --warmup + 2 ({args.warmup + 2})")
    emit(suite(args), watch)
    return 0


def _has_cuda() -> bool:
    """Asked in a child, so this process never creates a CUDA context of its own."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)
    return proc.stdout.strip() == "True"


if __name__ == "__main__":
    raise SystemExit(main())
