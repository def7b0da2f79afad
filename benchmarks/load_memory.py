"""Peak RSS and time from ``lora-train`` start to the first step on full-size SD 1.5 / SDXL single files: ours
(weights read straight into the training dtype, tensor by tensor) against a naive load (fp32 first, cast after).

Why: a bf16 SDXL run that first materialises the model in fp32 needs ~14 GB of RAM before training starts, more than
a 16 GB desktop has free beside the WebUI. The goal is SDXL bf16 ready to train in ≤ 8 GB peak RSS, SD 1.5 in ≤ 3 GB.

The models are WebUI-style single files with random weights (fp16, as the released files are) in the full-size
shapes of `benchmarks/full_models.py`, written tensor by tensor (a few GB of disk, a few hundred MB of RAM) once and
cached under ``benchmarks/.cache/`` (gitignored). Each measurement is one ``lora-train`` child process (64 px, batch 1,
one step, bf16, latents and text embeddings cached), stopped once it reports that step: its peak RSS to that step is
the max RSS the step event carries (``ru_maxrss``; the kernel's ``wait4`` figure for the whole child is reported too),
its time runs from start to the first step event. The naive variant is the same CLI with the
model loaded in fp32 and cast by the task afterwards — what the trainer did before. A watchdog kills a child whose RSS
passes ``--max-rss-gb`` (so a shared machine is not starved) and the result says so. Run one family at a time on a
machine with other work:

    python benchmarks/load_memory.py --family sd1 --variants ours,naive
    python benchmarks/load_memory.py --family sdxl --variants ours --max-rss-gb 12

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "benchmarks" / ".cache"
GOALS_MB = {"sd1": 3 * 1024, "sdxl": 8 * 1024}


def ldm_shapes(family: str) -> dict:
    """{key: (shape, torch.float16)} of the full-size family's WebUI checkpoint, computed on the meta device (no
    memory): the parts of `full_models.build_full_parts`, renamed as `lora_core.tiny.write_single_file` does."""
    import torch

    from full_models import build_full_parts
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


def random_tensor(name: str, shape: tuple, dtype):
    """Seeded by the name: norms' scales 1, other vectors 0, matrices N(0, 1/fan_in) — a model whose forward pass
    stays finite, so the one training step is a real one."""
    import hashlib

    import torch

    if not dtype.is_floating_point:
        return torch.arange(math.prod(shape)).reshape(shape).to(dtype) if shape else torch.zeros((), dtype=dtype)
    if len(shape) <= 1:
        ones = any(t in name for t in ("norm", "ln_", "gamma")) and name.endswith("weight")
        return (torch.ones if ones else torch.zeros)(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(fan_in)).to(dtype)


def full_single_file(family: str, cache: Path = CACHE) -> Path:
    """The cached full-size random checkpoint, written on first use."""
    from lora_core.image.weights_io import write_tensors

    path = cache / f"load-{family}-fp16.safetensors"
    if not path.is_file():
        t0 = time.perf_counter()
        write_tensors(path, ldm_shapes(family), random_tensor, {"format": "pt"})
        print(f"built {path} ({path.stat().st_size / 2**30:.1f} GiB, {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    return path


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(variant: str, model: Path, work: Path, max_rss_mb: float, timeout_s: float) -> dict:
    """One ``lora-train`` child: peak RSS (MB), seconds to the first step event, and whether it finished."""
    import yaml

    from lora_core.tiny import make_tiny_dataset

    data = make_tiny_dataset(work / "data", n=1, size=64)
    out = work / f"out-{variant}"
    cfg = {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 64,
           "batch_size": 1, "max_train_steps": 1, "mixed_precision": "bf16", "lora_rank": 8,
           "cache_latents": True, "cache_text_encoder_outputs": True, "save_precision": "fp16"}
    config = work / f"{variant}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    events = work / f"{variant}-events.jsonl"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--", "--config", str(config),
           "--events", str(events), "--no-progress"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed: dict = {}

    def watch() -> None:  # keep a shared machine alive: stop a child that grows past the cap
        while proc.poll() is None:
            if events.is_file() and '"type": "step"' in events.read_text():
                proc.terminate()  # the first step is what is measured; the export and preview are not
                return
            rss = _rss_mb(proc.pid)
            if rss > max_rss_mb or time.time() - t0 > timeout_s:
                killed["why"] = (f"RSS passed the {max_rss_mb:.0f} MB cap" if rss > max_rss_mb
                                 else f"ran past {timeout_s:.0f} s")
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    stderr = proc.stderr.read() if proc.stderr else ""
    steps = []
    if events.is_file():
        steps = [json.loads(line) for line in events.read_text().splitlines() if '"type": "step"' in line
                 or '"type":"step"' in line]
    result = {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit_code": proc.returncode,
              "first_step_s": round(steps[0]["time"] - t0, 1) if steps else None,
              # the child's own max RSS when it reported the step (its export and preview are not counted)
              "peak_rss_to_first_step_mb": steps[0].get("peak_mem_mb") if steps else None}
    if killed:
        result["killed"] = killed["why"]
    elif proc.returncode != 0 and not steps:
        result["error"] = stderr.strip().splitlines()[-1:] or ["(no output)"]
    return result


def child(variant: str, argv: list[str]) -> int:
    """Run ``lora-train`` in this process; ``naive`` loads the base model in fp32 (the task casts it afterwards)."""
    if variant == "naive":
        import torch

        import lora_core.image.task as image_task

        load = image_task.load_sd_model

        def fp32_then_cast(*args, **kwargs):
            return load(*args, **{**kwargs, "dtype": torch.float32, "vae_dtype": torch.float32})

        image_task.load_sd_model = fp32_then_cast
    from lora_core.train import main as train_main

    return train_main(argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1", choices=sorted(GOALS_MB))
    parser.add_argument("--variants", default="ours,naive", help="comma-separated: ours, naive")
    parser.add_argument("--max-rss-gb", type=float, default=16.0, help="kill a child whose RSS passes this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--cache", default=str(CACHE), help="where the full-size checkpoints are kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, [a for a in rest if a != "--"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    model = full_single_file(args.family, Path(args.cache))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            work = Path(tmp) / variant
            work.mkdir()
            results[variant] = measure(variant, model, work, args.max_rss_gb * 1024, args.timeout)
            print(f"{args.family} {variant}: {results[variant]}", file=sys.stderr)
    goal = GOALS_MB[args.family]
    ours = results.get("ours", {})
    print(json.dumps({"benchmark": "load_memory", "family": args.family, "model_gib": round(
        model.stat().st_size / 2**30, 2), "mixed_precision": "bf16", "resolution": 64, "results": results,
        "goal_peak_rss_mb": goal, "meets_goal": bool(ours.get("first_step_s")) and ours["peak_rss_mb"] <= goal,
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
