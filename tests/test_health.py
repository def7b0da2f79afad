"""Training health: each detector on synthetic series, the monitor's once-until-cleared reporting, image validation,
and tiny runs made to misbehave (a huge learning rate; one image repeated) that emit ``health`` events."""
from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core import health
from lora_core.config import ConfigError
from lora_core.events import EventWriter, read_events
from lora_core.health import HealthMonitor, grad_explosion, loss_spike, overfitting, plateau, sample_problem
from lora_core.image.task import ImageTask
from lora_core.loop import make_accelerator
from lora_core.tiny import make_tiny_dataset
from lora_core.train import run_training


def diffusion_like(n: int, level: float = 0.15, seed: int = 0) -> list[float]:
    """Per-step losses as diffusion training has them: each step its own timestep, so values spread 10x."""
    rng = random.Random(seed)
    return [level * rng.uniform(0.15, 2.0) for _ in range(n)]


# ---- detectors on synthetic series ---------------------------------------------------------------------------------
def test_a_loss_spike_is_found_and_ordinary_diffusion_noise_is_not():
    calm = diffusion_like(120)
    assert loss_spike(calm) is None
    assert all(loss_spike(calm[:i]) is None for i in range(10, 121))
    spiked = calm + [2.0, 2.5, 1.8, 2.2, 3.0]
    message = loss_spike(spiked)
    assert message is not None and "jumped" in message


def test_a_plateau_is_a_flat_window_and_a_falling_loss_is_not_one():
    flat = diffusion_like(250, seed=1)
    assert plateau(flat) is not None
    falling = [v * math.exp(-i / 120) for i, v in enumerate(diffusion_like(250, seed=2))]
    assert plateau(falling) is None
    assert plateau(flat[:150]) is None  # not enough steps to tell


def test_gradient_norm_explosion_and_non_finite_norms():
    rng = random.Random(3)
    steady = [1.0 + rng.uniform(-0.3, 0.3) for _ in range(60)]
    assert grad_explosion(steady) is None
    message, value = grad_explosion(steady + [40.0])
    assert value == 40.0 and "gradient norm" in message
    assert grad_explosion(steady + [float("nan")]) is not None
    assert grad_explosion([1.0, 50.0]) is None  # too little history for a median


def test_overfitting_needs_validation_rising_while_training_loss_falls():
    train = [(s, 0.3 - s * 0.001) for s in range(1, 201)]
    rising = [(25, 0.30), (50, 0.25), (75, 0.22), (100, 0.21), (125, 0.24), (150, 0.27)]
    message = overfitting(rising, train)
    assert message is not None and "step 100" in message
    assert overfitting(rising[:5], train) is None  # one evaluation above the best is not a trend
    assert overfitting([(25, 0.3), (50, 0.25), (75, 0.2), (100, 0.18)], train) is None
    train_rising_too = [(s, 0.1 + s * 0.001) for s in range(1, 201)]
    assert overfitting(rising, train_rising_too) is None  # both rising: divergence, not overfitting


def textured(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_collapsed_samples_black_flat_and_copies(tmp_path):
    assert sample_problem(Image.new("RGB", (64, 64)))[0] == "sample_nan"
    assert sample_problem(np.full((8, 8, 3), np.nan))[0] == "sample_nan"
    assert sample_problem(Image.new("RGB", (64, 64), (120, 60, 200)))[0] == "sample_flat"
    textured(1).save(tmp_path / "train.png")
    hashes = health.image_hashes([tmp_path / "train.png", tmp_path / "missing.png"])
    assert [name for name, _ in hashes] == ["train.png"]
    copy = textured(1).resize((96, 96))  # a resized copy is still a copy
    kind, message = sample_problem(copy, hashes)
    assert kind == "sample_copy" and "train.png" in message
    assert sample_problem(textured(2), hashes) is None


# ---- the monitor -----------------------------------------------------------------------------------------------------
def test_the_monitor_reports_a_kind_once_until_it_clears_and_reads_tensor_norms_at_checks():
    monitor = HealthMonitor(stop_on=["plateau"], check_every=10)
    found = []
    losses = diffusion_like(400, seed=4)
    for step, loss in enumerate(losses, start=1):
        found += monitor.observe_step(step, loss, torch.tensor(1.0 + (step % 7) / 10))
    assert [w.kind for w in found] == ["plateau"]  # reported once, not every check
    assert monitor.stop_reason is not None and monitor.stop_reason.kind == "plateau"
    assert len(monitor.norms) == 400 and not monitor._pending_norms  # read in batches, all of them
    event = found[0].to_event()
    assert event["kind"] == "plateau" and event["advice"] == health.ADVICE["plateau"] and event["step"] % 10 == 0
    # an explosion between two checks is still seen at the next check
    for step in range(401, 411):
        found += monitor.observe_step(step, 0.15, torch.tensor(80.0 if step == 403 else 1.0))
    assert "grad_explosion" in [w.kind for w in found]


def test_the_monitor_does_not_stop_on_kinds_not_asked_for():
    monitor = HealthMonitor(stop_on=["overfit"])
    for step, loss in enumerate(diffusion_like(300), start=1):
        monitor.observe_step(step, loss)
    assert "plateau" in monitor.active and monitor.stop_reason is None


# ---- settings --------------------------------------------------------------------------------------------------------
def test_stop_on_is_checked_by_name(train_config):
    with pytest.raises(ConfigError) as e:
        train_config(stop_on=["overfit"])
    assert any(p.startswith("training.stop_on:") and "validation_split" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        train_config(stop_on="plateau, boredom")
    assert any(p.startswith("training.stop_on:") and "boredom" in p for p in e.value.problems)
    assert train_config(stop_on="plateau").training.stop_on == ["plateau"]


# ---- image validation -------------------------------------------------------------------------------------------------
def test_held_out_images_never_train_and_their_loss_is_a_fixed_function_of_the_lora(train_config, tmp_path):
    data = make_tiny_dataset(tmp_path / "eight", n=8)
    cfg = train_config(train_data_dir=str(data), validation_split=0.25)
    task = ImageTask(cfg)
    task.setup(make_accelerator(cfg))
    held = {i.path.name for i in task.val_items}
    assert len(held) == 2 and not held & {ex.item.path.name for ex in task.examples}
    first, again = task.evaluate(0), task.evaluate(0)
    assert first["eval_loss"] == again["eval_loss"] and first["validation_images"] == 2
    with torch.no_grad():
        for p in (p for p in task.model.unet.parameters() if p.requires_grad):
            p.add_(0.05)
    assert task.evaluate(0)["eval_loss"] != first["eval_loss"]
    assert task.dataset_summary()["validation_images"] == sorted(held) or \
        set(task.dataset_summary()["validation_images"]) == held


# ---- tiny runs made to misbehave -------------------------------------------------------------------------------------
def health_events(path: Path) -> list[dict]:
    return [e for e in read_events(path) if e["type"] == "health"]


def test_a_huge_learning_rate_is_reported_with_advice_in_events_and_tensorboard(train_config, tmp_path):
    """Warm-up from nothing to a learning rate no LoRA survives: calm steps first, then the warning."""
    cfg = train_config(max_train_steps=60, batch_size=1, learning_rate=20.0, lr_scheduler="constant_with_warmup",
                       lr_warmup_steps=40, max_grad_norm=0.0, output_dir=str(tmp_path / "huge"))
    events = tmp_path / "events.jsonl"
    result = run_training(cfg, EventWriter(events), show_progress=False)
    found = health_events(events)
    kinds = {e["kind"] for e in found}
    assert kinds & {"loss_spike", "grad_explosion"}, (result.status, found, result.losses)
    for e in found:
        assert e["advice"] == health.ADVICE[e["kind"]] and e["message"] and e["step"] >= 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "huge" / "logs"), size_guidance={"tensors": 0})
    acc.Reload()
    assert any(tag.startswith("health/") for tag in acc.Tags()["tensors"]), acc.Tags()


def one_image_repeated(root: Path, repeats: int = 40) -> Path:
    """One training image repeated, and one held out beside it (validation_split 0.5 holds out one of the two)."""
    src = make_tiny_dataset(root / "src", n=2, seed=5)
    folder = root / "one" / f"{repeats}_shapez"
    folder.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, folder / f.name)
    return root / "one"


def test_one_image_repeated_overfits_and_stop_on_keeps_the_best_lora(train_config, tmp_path):
    data = one_image_repeated(tmp_path)
    cfg = train_config(train_data_dir=str(data), max_train_steps=60, batch_size=1, learning_rate=0.1, lora_rank=8,
                       validation_split=0.5, validation_every=3, stop_on=["overfit"], output_dir=str(tmp_path / "out"))
    events = tmp_path / "events.jsonl"
    result = run_training(cfg, EventWriter(events), show_progress=False)
    found = health_events(events)
    evals = [e for e in read_events(events) if e["type"] == "eval"]
    assert evals and all(e["validation_images"] == 1 for e in evals)
    assert [e for e in found if e["kind"] == "overfit"], (found, [(e["step"], e["eval_loss"]) for e in evals])
    stop = [e for e in found if e["kind"] == "early_stop"]
    assert len(stop) == 1 and stop[0]["reason"] == "overfit" and result.status == "finished"
    assert result.step == stop[0]["step"] < 60 and f"step {stop[0]['best_step']}" in stop[0]["message"]
    during = [e for e in evals if e["step"] <= stop[0]["step"]][:-1]  # the last eval is the written LoRA's
    best = min(during, key=lambda e: e["eval_loss"])
    assert stop[0]["best_step"] == best["step"] < stop[0]["step"]
    # the LoRA written is the best one: its validation loss (the final eval, fixed noise and timesteps) is the best
    assert evals[-1]["step"] == result.step and evals[-1]["eval_loss"] == best["eval_loss"]


# ---- through the daemon, the CLI and the REST routes -------------------------------------------------------------------
from daemon_fixtures import daemon, daemon_factory, run_config, wait_until  # noqa: E402,F401  (fixtures)


def test_the_daemon_stores_health_show_lists_it_and_the_run_view_renders_it_with_a_rating(daemon_factory, tiny_sd,
                                                                                         tiny_data, tmp_path):
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from daemon_fixtures import ROOT
    from prepare_webui_envs import require
    from test_webui_routes_auth import SERVER, free_port

    daemon = daemon_factory()
    client = daemon.client()
    data = one_image_repeated(tmp_path)
    config = run_config(tiny_sd, data, "shapez", steps=60, data__validation_split=0.5, data__validation_every=3,
                        training__stop_on=["overfit"], training__learning_rate=0.1, training__batch_size=1,
                        model__lora_rank=8)
    run = client.submit(config, name="shapez")
    done = wait_until(lambda: (r := client.get(run["id"]))["status"] in ("finished", "failed") and r, timeout=400,
                      what="the run to end")
    assert done["status"] == "finished", done.get("error")
    stored = client.run_events(run["id"], last=100, types=["run.health"])
    assert {"overfit", "early_stop"} <= {e["kind"] for e in stored}, stored
    shown = subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(daemon.home), "show", run["id"],
                            "--events", "50"], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert shown.returncode == 0 and "run.health kind=overfit" in shown.stdout, shown.stdout + shown.stderr

    # the tab's REST side (gradio 3.41, as A1111 serves it): the run view's health list, 👍, and Recommend
    python = require(".venv-gradio3")
    (tmp_path / "webui" / "models" / "Stable-diffusion").mkdir(parents=True)
    env = {**os.environ, "WEBUI_STUB_ROOT": str(tmp_path / "webui"), "LORA_DAEMON_HOME": str(daemon.home),
           "PYTHONPATH": "", "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    log_path = tmp_path / "webui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(python), str(SERVER), str(ROOT), "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 180
        while "READY" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        api = f"http://127.0.0.1:{port}/lora-scripts/v1"

        def call(path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(api + path, data=json.dumps(body).encode() if body is not None
                                             else None, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())

        view = call(f"/runs/{run['id']}")
        assert "Training health" in view["health_html"] and "early stop" in view["health_html"]
        assert call(f"/runs/{run['id']}/rate_up", {})["rating"] == "up"
        assert client.get(run["id"])["rating"] == "up"
        rec = call("/recommend", {"folder": str(tiny_data), "base_model": str(tiny_sd), "kind": "character"})
        assert rec["validated"] and any(h["run"] == run["id"] for h in rec["history"])
        assert rec["settings"]["lora_rank"] == 8  # taken from the 👍 run
    finally:
        proc.terminate()
        proc.wait(timeout=30)
