"""The benchmarks give figures that can be trusted: each repeat is its own run, its rate comes from its own file, the
machine's load rides along, and the GPU suite's CPU path produces its full JSON shape. No timing thresholds: only
that figures exist, are positive and come from where they say."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _module(name: str):
    """A benchmark module by path (benchmarks/ is a folder of scripts, not a package)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: float = 2400) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _check_load_fields(result: dict) -> None:
    assert result["cores"] >= 1
    for key in ("load_start", "load_end"):
        assert len(result[key]) == 3 and all(x >= 0 for x in result[key])
    assert result["other_cores"] >= 0
    assert result["loaded"] == (result["other_cores"] > 0.25)


def test_the_cpu_others_use_beside_a_benchmark_is_measured_and_its_own_is_not(tmp_path):
    """A busy child of ours does not count as other work (its CPU is ours); a busy process that is not ours (not
    waited for) does, with the CPU time it really used."""
    common = _module("bench_common")
    spin = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"]
    watch = common.LoadWatch()
    time.sleep(1.5)
    idle = watch.other_cores()  # what the rest of the machine does anyway
    watch = common.LoadWatch()
    before = common.own_cpu_seconds()
    subprocess.run(spin, check=True)
    ours = common.own_cpu_seconds() - before
    own = watch.other_cores()
    assert ours > 0.5 and abs(own - idle) < ours / 1.5 / 2, (idle, own, ours)  # the child's core is not in it

    watch, started = common.LoadWatch(), time.monotonic()
    stranger = subprocess.Popen(spin)
    time.sleep(1.5)
    ticks = Path(f"/proc/{stranger.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
    used = sum(int(x) for x in ticks) / os.sysconf("SC_CLK_TCK")
    beside = watch.other_cores() * (time.monotonic() - started)
    stranger.wait()
    assert used > 0.2 and beside >= 0.8 * used, (beside, used)  # the stranger's CPU is counted

def test_rate_refuses_two_runs_appended_to_one_events_file(tmp_path):
    """The old bug: two repeats appending to one events.jsonl gave a rate spanning both runs. Now it is refused."""
    from lora_core.events import EventWriter

    common = _module("bench_common")
    path = tmp_path / "events.jsonl"
    for _ in range(2):  # two runs, appending, as the broken benchmark did
        writer = EventWriter(path)
        writer.emit("start", step=0, total_steps=3)
        for step in range(1, 4):
            writer.emit("step", step=step, loss=1.0)
        writer.close()
    with pytest.raises(common.EventsError, match="2 runs in one events file"):
        common.rate_from_events(path, warmup=0)
    with pytest.raises(FileExistsError, match="must be fresh"):
        common.fresh_dir(tmp_path)


@pytest.mark.slow
def test_train_speed_repeats_each_in_own_folder_with_own_rate(tmp_path):
    common = _module("bench_common")
    work = tmp_path / "work"
    result, _ = _run("train_speed.py", "--size", "tiny", "--resolution", "64", "--batch-size", "2", "--steps", "5",
                     "--warmup", "1", "--repeats", "2", "--images", "4", "--work-dir", str(work))
    for key in ("ours_steps_s", "baseline_steps_s", "ratio", "ours_peak_mb", "baseline_peak_mb", "ours_setup_s",
                "baseline_setup_s"):
        assert result[key] > 0, key
    _check_load_fields(result)
    runs = result["runs"]
    assert sorted((r["variant"], r["repeat"]) for r in runs) == [("baseline", 0), ("baseline", 1), ("ours", 0),
                                                                 ("ours", 1)]
    assert len({r["events"] for r in runs}) == 4 and len({r["dir"] for r in runs}) == 4
    for run in runs:
        for key in ("steps_s", "setup_s", "wall_s", "peak_mb", "peak_rss_mb"):
            assert run[key] > 0, (run["variant"], run["repeat"], key)
        events = Path(run["events"])
        assert events.parent == Path(run["dir"]) or events.parent.parent == Path(run["dir"])
        # the reported rate is the one this run's own file gives, and the file holds exactly this one run
        assert [s for s, _ in common.step_times(events)] == [1, 2, 3, 4, 5]
        again = common.rate_from_events(events, warmup=1)
        assert again["steps_s"] == pytest.approx(run["steps_s"], rel=1e-3)
        assert again["first_timed_time"] == pytest.approx(run["first_timed_time"])
    # each variant's figure is one of its own repeats
    for variant in ("ours", "baseline"):
        assert result[f"{variant}_steps_s"] in [round(r["steps_s"], 4) for r in runs if r["variant"] == variant]


def test_train_speed_peer_kohya_needs_a_checkout_and_the_full_model(tmp_path):
    """--peer kohya runs a real sd-scripts checkout the user gives; without one, or on a model its SD1 loader cannot
    build, it stops at once with a message naming the option."""
    proc = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), "--peer", "kohya", "--kohya-dir",
                           str(tmp_path), "--size", "full"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no train_network.py" in proc.stderr
    (tmp_path / "train_network.py").write_text("")
    proc = subprocess.run([sys.executable, str(BENCH / "train_speed.py"), "--peer", "kohya", "--kohya-dir",
                           str(tmp_path), "--size", "tiny"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--size full" in proc.stderr


def test_kohya_command_uses_the_same_run_settings(tmp_path):
    """The command line given to train_network.py carries the run's steps, resolution, batch and rank, and the
    folder gets the dataset TOML and tokenizer cache sd-scripts reads (it would otherwise go to Hugging Face)."""
    import argparse

    ts = _module("train_speed")
    (tmp_path / "sd-scripts").mkdir()
    (tmp_path / "sd-scripts" / "train_network.py").write_text("")
    args = argparse.Namespace(resolution=256, batch_size=3, steps=12, mixed_precision="no")
    out = tmp_path / "run"
    out.mkdir()
    cmd = ts.kohya_command(tmp_path / "sd-scripts", "python", tmp_path / "m.safetensors", tmp_path / "data", out, args)
    assert cmd[1] == str(tmp_path / "sd-scripts" / "train_network.py")
    assert "--network_train_unet_only" in cmd and "--cache_latents" in cmd
    assert cmd[cmd.index("--max_train_steps") + 1] == "12" and cmd[cmd.index("--network_dim") + 1] == "8"
    toml = (out / "dataset.toml").read_text()
    assert "resolution = 256" in toml and "batch_size = 3" in toml and str(tmp_path / "data") in toml
    assert (out / "tokenizers" / "openai_clip-vit-large-patch14" / "vocab.json").is_file()


def test_gpu_peak_table_prefers_the_specific_name():
    gs = _module("gpu_suite")
    assert gs.peak_tflops("NVIDIA H100 PCIe") == (756.0, "H100 PCIe")
    assert gs.peak_tflops("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert gs.peak_tflops("NVIDIA A10G") == (70.0, "A10G")
    assert gs.peak_tflops("NVIDIA GeForce RTX 4090") == (165.0, "RTX 4090")
    assert gs.peak_tflops("Some Future GPU") is None


def test_flops_of_a_step_count_forward_and_backward():
    """FLOPs come from FlopCounterMode on a meta UNet: a LoRA step (forward + activation backward) costs about twice
    the forward, and twice the batch twice the FLOPs."""
    gs = _module("gpu_suite")
    one, two = gs.flops_per_step("sd1", "tiny", 1, 64), gs.flops_per_step("sd1", "tiny", 2, 64)
    assert one > 0 and two == pytest.approx(2 * one, rel=0.01)


@pytest.mark.slow
def test_gpu_suite_cpu_smoke_path_reports_every_variant(tmp_path):
    result, stderr = _run("gpu_suite.py", "--device", "cpu", "--size", "tiny", "--steps", "4", "--warmup", "1",
                          "--images", "4", "--budget-s", "3000", "--variant-timeout", "1200",
                          "--work-dir", str(tmp_path / "work"))
    assert result["bench"] == "gpu_suite" and result["device"]["cuda"] is False
    _check_load_fields(result)
    variants = result["variants"]
    gs = _module("gpu_suite")
    assert set(variants) == {v.name for v in gs.variants(False, "tiny")}
    for name, r in variants.items():
        assert "error" not in r, (name, r)
    # CUDA-only settings are refused on the CPU with a message naming the field
    assert "training.mixed_precision" in variants["sd15_64px_bs2_fp16_scaler"]["skipped"]
    assert "training.optimizer" in variants["sd15_64px_bs2_bf16_adamw8bit"]["skipped"]
    trained = [r for n, r in variants.items() if "steps_s" in r]
    assert len(trained) >= 4  # bf16 and checkpointing for both families at least (fp8 when the setting exists)
    for r in trained:
        assert r["steps_s"] > 0 and r["peak_rss_mb"] > 0 and r["tflop_per_step"] > 0 and r["mfu"] is None
        assert r["plan"]["estimate_mb"] > 0 and r["plan"]["measured_mb"] > 0
        assert Path(r["dir"], "events.jsonl").is_file()
    oom = variants["sd15_64px_bs2_bf16_oom_step_down"]
    assert "injected" in oom["oom_source"] and oom["ooms_caught"] >= 1 and oom["final_status"] == "finished"
    assert oom["changes"][0]["training.batch_size"] == 1 and oom["steps_done"] == 4
    for name in ("sd15_64px_bs2_bf16_fp8base", "sdxl_64px_bs1_bf16_fp8base"):
        assert "steps_s" in variants[name] or "fp8_base" in variants[name]["skipped"]


def test_daemon_latency_reports_load_and_one_socket_per_client():
    result, _ = _run("daemon_latency.py", "--clients", "3", "--requests", "5", "--steps", "0", timeout=300)
    _check_load_fields(result)
    for row in ("echo", "status", "validate"):
        assert result[row]["sockets"] == 3 and result[row]["n"] == 15 and result[row]["p50_ms"] > 0


def test_kohya_step_times_are_read_from_its_tensorboard_log(tmp_path):
    """sd-scripts logs each optimizer step through accelerate's TensorBoard tracker ("loss/current" at the global
    step); the same tracker, driven here the way train_network.py drives it, gives one rate read by the one
    `rate_from_events`."""
    from accelerate import Accelerator

    ts = _module("train_speed")
    common = _module("bench_common")
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    accelerator.init_trackers("network_train")
    accelerator.log({}, step=0)
    for step in range(1, 6):
        accelerator.log({"loss/current": 0.1 * step, "loss/average": 0.1}, step=step)
    accelerator.end_training()
    steps = ts.tensorboard_steps(tmp_path / "logs")
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5]
    events = ts.steps_to_events(steps, tmp_path / "steps.jsonl")
    rate = common.rate_from_events(events, warmup=1)
    assert rate["timed_steps"] == 4 and rate["steps_s"] > 0
