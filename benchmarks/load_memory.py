"""Peak RSS and time from ``lora-train`` start to the first step on full-size SD 1.5 / SDXL single files: ours
(weights read straight into the training dtype, tensor by tensor) against a naive load (fp32 first, cast after).

Why: a bf16 SDXL run that first materialises the model in fp32 needs ~14 GB of RAM before training starts, more than
a 16 GB desktop has free beside the WebUI. The goal is SDXL bf16 ready to train in ≤ 8 GB peak RSS, SD 1.5 in ≤ 3 GB.

The models are WebUI-style single files with random weights (fp16, as the released files are), written by
`benchmarks/full_models.py` (the one full-size builder: tensor by tensor, a few GB of disk, a few hundred MB of RAM)
once and cached under ``benchmarks/.cache/`` (gitignored). Each measurement is one ``lora-train`` child process (64 px, batch 1,
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


def full_single_file(family: str, cache: Path = CACHE) -> Path:
    """The cached full-size random checkpoint (`full_models.write_full_single_file`), written on first use."""
    from full_models import write_full_single_file

    return write_full_single_file(family, cache / f"load-{family}-fp16.safetensors")


def _rss_mb(pid: int | str, field: str = "VmRSS") -> float:
    """A process's resident set (or its high-water mark, ``VmHWM``) in MB, from /proc; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
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
    phases = work / f"{variant}-phases.jsonl"
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, PHASES_ENV: str(phases)})
    killed: dict = {}

    def watch() -> None:  # keep a shared machine alive: stop a child that grows past the cap
        while proc.poll() is None:
            if events.is_file() and '"type": "step"' in events.read_text():
                # the first step is what is measured; the export and preview are not (SIGTERM would be a stop
                # request, which the run honours only after its card preview: minutes for SDXL on a CPU)
                proc.kill()
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
    if phases.is_file():  # RSS and its high-water mark after each phase: where the peak comes from
        result["phases"] = [json.loads(line) for line in phases.read_text().splitlines() if line.strip()]
    if killed:
        result["killed"] = killed["why"]
    elif proc.returncode != 0 and not steps:
        result["error"] = stderr.strip().splitlines()[-1:] or ["(no output)"]
    return result


PHASES_ENV = "LOAD_MEMORY_PHASES"  # the child appends one JSON line per phase to this file


def trace_phases(path: Path) -> None:
    """Where the peak comes from: after each setup phase of the image task (and each model part the loader fills,
    and the first optimizer step) append ``{phase, rss_mb, hwm_mb}`` — the resident set then and its high-water mark
    so far (``VmHWM``). The phase in which ``hwm_mb`` jumps to its final value is the one to make smaller."""
    import lora_core.image.sd_models as sd_models
    import lora_core.image.task as image_task
    import lora_core.loop as loop

    t0 = time.time()

    def record(name: str) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"phase": name, "t": round(time.time() - t0, 1), "rss_mb": round(
                _rss_mb("self"), 1), "hwm_mb": round(_rss_mb("self", "VmHWM"), 1)}) + "\n")

    def wrap(owner, name: str, label=None) -> None:
        inner = getattr(owner, name)

        def traced(*args, **kwargs):
            out = inner(*args, **kwargs)
            record(label(*args) if label else name)
            return out
        setattr(owner, name, traced)

    for name in ("_load_model", "_add_lora", "_place_weights", "_cache_all_latents", "_cache_all_text",
                 "_offload_frozen", "_prepare"):
        wrap(image_task.ImageTask, name)
    wrap(sd_models, "read_safetensors")
    wrap(sd_models, "_load_strict", lambda module, state, what, source: f"built {what}")
    wrap(loop.TrainingRun, "setup_optimization")
    wrap(loop.TrainingRun, "optimizer_step")
    record("imports")


def child(variant: str, argv: list[str]) -> int:
    """Run ``lora-train`` in this process; ``naive`` loads the base model in fp32 (the task casts it afterwards)."""
    if os.environ.get(PHASES_ENV):
        trace_phases(Path(os.environ[PHASES_ENV]))
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
    ours_peak = ours.get("peak_rss_to_first_step_mb") or ours.get("peak_rss_mb", 0.0)  # what the goal is about
    print(json.dumps({"benchmark": "load_memory", "family": args.family, "model_gib": round(
        model.stat().st_size / 2**30, 2), "mixed_precision": "bf16", "resolution": 64, "results": results,
        "goal_peak_rss_mb": goal, "meets_goal": bool(ours.get("first_step_s")) and ours_peak <= goal,
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
