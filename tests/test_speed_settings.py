"""GPU speed habits as settings (`lora_core.speed`): each resolves to off on a CPU when left empty, a CUDA-only one
asked for on a CPU is refused by field name before any model loads, and the ones that work anywhere do."""
from __future__ import annotations

import pytest
import torch

from lora_core.config import ConfigError, config_from_dict
from lora_core.errors import InputError
from lora_core.loop import make_accelerator, make_optimizer
from lora_core.speed import SpeedSettings, resolve

CPU = torch.device("cpu")


@pytest.fixture
def base(tmp_path) -> dict:
    (tmp_path / "data").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    return {"base_model": str(tmp_path / "model.safetensors"), "train_data_dir": str(tmp_path / "data"),
            "output_dir": str(tmp_path / "out"), "device": "cpu"}


def test_empty_settings_mean_off_on_a_cpu(base):
    assert resolve(config_from_dict(base), CPU) == SpeedSettings()
    assert resolve(config_from_dict({**base, "mixed_precision": "bf16"}), CPU) == SpeedSettings()


@pytest.mark.parametrize("name", ["tf32", "pin_memory"])
def test_cuda_only_settings_are_refused_on_a_cpu_by_field_name(base, name):
    cfg = config_from_dict({**base, name: True})
    with pytest.raises(InputError, match=f"training.{name}: .* needs a CUDA GPU"):
        make_accelerator(cfg)
    assert resolve(config_from_dict({**base, name: False}), CPU) == SpeedSettings()


def test_settings_that_work_anywhere_are_kept_on_a_cpu(base):
    cfg = config_from_dict({**base, "compile": True, "channels_last": True, "fused_optimizer": True})
    assert resolve(cfg, CPU) == SpeedSettings(compile=True, channels_last=True, fused_optimizer=True)
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer(cfg, [{"params": [weight], "lr": 1e-3}])
    assert optimizer.defaults["fused"] is True
    assert not make_optimizer(config_from_dict(base), [{"params": [weight], "lr": 1e-3}]).defaults.get("fused")


def test_fused_optimizer_and_fp8_base_are_refused_where_they_do_not_apply(base):
    with pytest.raises(ConfigError, match="training.fused_optimizer: applies to optimizer adamw only"):
        config_from_dict({**base, "fused_optimizer": True, "optimizer": "lion"})
    with pytest.raises(ConfigError, match="model.fp8_base: works with network_type lora or locon"):
        config_from_dict({**base, "fp8_base": True, "network_type": "loha"})
