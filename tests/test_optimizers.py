"""Every optimizer trains, resumes bit-exactly from a checkpoint (its state saved without pickle), is counted by the
memory plan as the state it really allocates, and a missing package or a CUDA-only one on a CPU is a field error."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from lora_core.config import ConfigError, OPTIMIZERS, TrainingConfig
from lora_core.errors import InputError
from lora_core.optimizers import OPTIMIZERS as TABLE
from lora_core.optimizers import evaluation_weights, make_optimizer, optimizer_state_bytes
from lora_core.train import run_training

# adamw's exact resume is tests/test_train.py's (several stops, every RNG); these are the others
RESUMED = ["prodigy", "adafactor", "adafactor-relative", "lion", "schedulefree_adamw", "came"]


def settings(name: str) -> dict:
    if name == "adafactor-relative":
        return {"optimizer": "adafactor", "adafactor_relative_step": True}
    extra = {"prodigy": {"learning_rate": 1.0, "prodigy_use_bias_correction": True, "prodigy_d_coef": 2.0},
             "lion": {"learning_rate": 3e-4}, "schedulefree_adamw": {"lr_warmup_steps": 2}}
    return {"optimizer": name, **extra.get(name, {})}


@pytest.mark.parametrize("name", RESUMED)
def test_each_optimizer_trains_and_resumes_exactly_from_a_mid_run_checkpoint(name, train_config, tmp_path):
    common = dict(max_train_steps=4, batch_size=2, save_steps=2, **settings(name))
    straight = run_training(train_config(output_dir=str(tmp_path / "straight"), **common), show_progress=False)
    assert straight.status == "finished", straight.error
    first = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000002" / "lora.safetensors"))
    last = load_file(str(tmp_path / "straight" / "checkpoints" / "step-00000004" / "lora.safetensors"))
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 0, "the optimizer did not move"

    mid = tmp_path / "mid"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000002", mid)
    resumed = run_training(train_config(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=str(mid),
                                        **common), show_progress=False)
    assert resumed.status == "finished" and resumed.step == 4
    a, b = load_file(str(straight.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume must continue bit for bit"


def test_schedule_free_files_hold_the_averaged_weights_and_saving_leaves_training_untouched(train_config, tmp_path):
    """Schedule-free AdamW trains on y and evaluates on x (its average): the exported file is x, the checkpoint is
    y, and switching to x and back for a save restores y bit for bit (the exact resume above depends on it)."""
    from lora_core.checkpoint import load_checkpoint, restore_training_state
    from lora_core.image.task import ImageTask
    from lora_core.loop import make_accelerator, make_lr_scheduler

    cfg = train_config(max_train_steps=3, optimizer="schedulefree_adamw")
    result = run_training(cfg, show_progress=False)
    task = ImageTask(cfg)
    task.setup(make_accelerator(cfg))
    ckpt = load_checkpoint(result.checkpoint)
    task.load_lora_state_dict(ckpt.lora)
    optimizer = make_optimizer(cfg, task.param_groups(cfg.training.learning_rate))
    restore_training_state(ckpt, optimizer, make_lr_scheduler(cfg, optimizer, 3), None, torch.Generator())
    y = task.lora_state_dict()
    assert all(torch.equal(y[k], ckpt.lora[k]) for k in y)
    with evaluation_weights(optimizer):
        averaged = load_file(str(task.export(tmp_path / "x", 3, 1)))
    training = load_file(str(task.export(tmp_path / "y", 3, 1)))
    exported = load_file(str(result.output))
    assert all(torch.equal(exported[k], averaged[k]) for k in exported), "the run's file holds x"
    assert any(not torch.equal(exported[k], training[k]) for k in exported), "x differs from y after training"
    after = task.lora_state_dict()
    assert all(torch.equal(after[k], y[k]) for k in y), "leaving evaluation_weights puts y back exactly"


def test_every_optimizer_has_a_table_entry_and_a_learning_rate_hint():
    hints = next(f for f in TrainingConfig.__dataclass_fields__.values() if f.name == "optimizer").metadata["lr_hints"]
    assert set(OPTIMIZERS) == set(TABLE) == set(hints)
    assert hints["prodigy"] == 1.0 and all(TABLE[n].default_lr == hints[n] for n in TABLE)


def test_the_memory_plan_counts_the_state_each_optimizer_really_allocates(train_config):
    """One measurement of a LoCon's trainable tensors; each optimizer then takes a real step on tensors of those
    shapes, and the plan's "LoRA + optimizer" line is weights + gradients + exactly the state it left behind."""
    from lora_core.plan import estimate_mb, measure

    meas = measure(train_config(network_type="locon", conv_rank=2))
    assert meas.param_shapes and sum(torch.Size(s).numel() for s in meas.param_shapes) == meas.lora_params
    parts_by_optimizer = {}
    for name in ("adamw", "prodigy", "adafactor", "lion", "schedulefree_adamw", "came"):
        cfg = train_config(**settings(name))
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in meas.param_shapes]
        opt = make_optimizer(cfg, [{"params": params, "lr": cfg.training.learning_rate}])
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        real = sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
                   if isinstance(v, torch.Tensor))
        assert optimizer_state_bytes(name, meas.param_shapes) == real, name
        plan_settings = {"batch_size": 1, "gradient_checkpointing": False, "cache_latents": True, "optimizer": name,
                         "mixed_precision": "no"}
        _, parts = estimate_mb(meas, plan_settings, torch.device("cpu"))
        assert parts["LoRA + optimizer"] == pytest.approx((meas.lora_params * 8 + real) / 2**20), name
        parts_by_optimizer[name] = parts["LoRA + optimizer"]
    assert parts_by_optimizer["prodigy"] > parts_by_optimizer["adamw"] > parts_by_optimizer["lion"] \
        > parts_by_optimizer["adafactor"]


def test_a_missing_optimizer_package_is_a_field_error_naming_the_package(train_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(ConfigError, match=r"training.optimizer: prodigy needs the package prodigyopt "
                                          r"\(pip install prodigyopt, or pip install lora-scripts\[optim\]\)"):
        train_config(optimizer="prodigy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_optimizers_are_refused_on_cpu_by_field(name, train_config):
    with pytest.raises(InputError, match=f"training.optimizer: {name} needs bitsandbytes and a CUDA GPU"):
        run_training(train_config(optimizer=name), show_progress=False)


def test_schedule_free_with_a_schedule_is_refused_by_field(train_config):
    with pytest.raises(ConfigError, match="training.lr_scheduler: schedulefree_adamw schedules itself"):
        train_config(optimizer="schedulefree_adamw", lr_scheduler="cosine")
