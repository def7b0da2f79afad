"""The memory plan: its estimate is checked against the tensor memory training steps really use, and its advice
(and auto_fit) lands under the budget."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lora_core.events import EventWriter, read_events
from lora_core.loop import make_accelerator, make_optimizer, make_task
from lora_core.memory import TensorMemoryMeter, module_bytes
from lora_core.plan import make_plan
from lora_core.train import run_training
from text_fixtures import text_config, tiny_llama  # noqa: F401  (tiny_llama: fixture)

TOLERANCE = 0.25  # the estimate must be within ±25% of the measured peak


def measured_peak_mb(cfg) -> float:
    """Frozen weights + the peak of live tensors over two real training steps of the run's task."""
    task = make_task(cfg)
    accelerator = make_accelerator(cfg)
    task.setup(accelerator)
    if cfg.is_text:
        static = module_bytes(task.model)
    else:
        models = (task.model.unet, task.model.vae, task.model.text_encoder, task.model.text_encoder_2)
        static = sum(module_bytes(m) for m in models if m is not None)
    optimizer = make_optimizer(cfg, task.param_groups(cfg.training.learning_rate))
    generator = torch.Generator().manual_seed(0)
    meter = TensorMemoryMeter()
    with meter:
        for batch_indices in task.epoch_batches(0, cfg.training.batch_size)[:2]:
            with accelerator.autocast():  # as the loop runs it (bf16 autocast for mixed_precision bf16)
                loss = task.loss(task.collate(batch_indices, 0), generator)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return (static + meter.peak_bytes) / 2**20


@pytest.mark.parametrize("overrides", [
    {}, {"batch_size": 1}, {"gradient_checkpointing": True}, {"cache_latents": False}, {"resolution": 128},
    {"mixed_precision": "bf16"}, {"mixed_precision": "bf16", "cache_latents": False},
], ids=["default", "batch1", "checkpointing", "uncached", "128px", "bf16", "bf16-uncached"])
def test_plan_estimate_is_within_tolerance_of_the_measured_peak(train_config, overrides):
    cfg = train_config(**{"batch_size": 4, **overrides})
    estimate = make_plan(cfg).estimate_mb
    measured = measured_peak_mb(cfg)
    assert abs(estimate - measured) <= TOLERANCE * measured, f"estimate {estimate:.1f} MB vs measured {measured:.1f} MB"


def test_plan_suggests_settings_that_fit_a_small_budget(train_config):
    full = make_plan(train_config(batch_size=4)).estimate_mb
    plan = make_plan(train_config(batch_size=4, memory_budget_mb=full * 0.9))
    assert not plan.fits
    assert plan.suggestion and plan.suggestion_estimate_mb <= full * 0.9 * 0.9
    assert "training.gradient_checkpointing" in plan.suggestion or "training.batch_size" in plan.suggestion
    assert "suggested:" in plan.describe() and "does NOT fit" in plan.describe()


def test_auto_fit_applies_the_suggestion_before_training(train_config, tmp_path):
    full = make_plan(train_config(batch_size=4)).estimate_mb
    events = tmp_path / "events.jsonl"
    cfg = train_config(batch_size=4, max_train_steps=2, auto_fit=True, memory_budget_mb=full * 0.9)
    result = run_training(cfg, EventWriter(events), show_progress=False)
    assert result.status == "finished"
    plan = next(e for e in read_events(events) if e["type"] == "plan")
    assert plan["applied"]
    saved = (tmp_path / "out" / "config.yaml").read_text()
    for key, value in plan["applied"].items():
        assert f"{key.split('.')[-1]}: {str(value).lower()}" in saved


def test_plan_cli_prints_json_without_training(train_config, tmp_path):
    cfg = train_config()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    proc = subprocess.run([sys.executable, "-m", "lora_core.train", "--config", str(path), "--plan", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["fits"] and plan["estimate_mb"] > 0 and "activations" in plan["breakdown_mb"]
    assert not (tmp_path / "out").exists()


def test_plan_estimate_holds_for_sdxl_with_text_encoder_lora(train_config, tmp_path):
    from lora_core.tiny import build_tiny_sd

    model = build_tiny_sd(tmp_path / "sdxl", family="sdxl")
    cfg = train_config(base_model=str(model), batch_size=2, train_text_encoder=True)
    estimate, measured = make_plan(cfg).estimate_mb, measured_peak_mb(cfg)
    assert abs(estimate - measured) <= TOLERANCE * measured, f"estimate {estimate:.1f} MB vs measured {measured:.1f} MB"


@pytest.mark.parametrize("settings", [{"batch_size": 4}, {"batch_size": 2, "gradient_checkpointing": True}],
                         ids=["batch4", "checkpointing"])
def test_plan_estimate_holds_for_a_text_run(tmp_path, tiny_llama, settings):
    cfg = text_config(tmp_path, tiny_llama, **settings)
    estimate, measured = make_plan(cfg).estimate_mb, measured_peak_mb(cfg)
    assert abs(estimate - measured) <= TOLERANCE * measured, f"estimate {estimate:.2f} MB vs measured {measured:.2f} MB"


def test_the_plan_measures_the_model_in_the_training_dtype(train_config):
    """bf16 frozen weights are measured as loaded (2 bytes each), not loaded in fp32 and halved; the LoRA stays fp32."""
    from lora_core.plan import measure

    fp32, bf16 = measure(train_config()), measure(train_config(mixed_precision="bf16"))
    assert bf16.half and not fp32.half
    assert bf16.lora_params == fp32.lora_params
    assert abs(2 * bf16.weights - fp32.weights) <= 0.01 * fp32.weights
    full, half = make_plan(train_config()), make_plan(train_config(mixed_precision="bf16"))
    assert half.breakdown_mb["model weights"] == pytest.approx(bf16.weights / 2**20)
    assert half.breakdown_mb["model weights"] == pytest.approx(full.breakdown_mb["model weights"] / 2, rel=0.01)
