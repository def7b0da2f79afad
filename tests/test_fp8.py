"""``model.fp8_base``: frozen Linear/Conv2d weights stored as float8_e4m3fn, upcast per layer, LoRA in fp32.

The layer maths is checked against PyTorch's own Linear/Conv2d on the dequantised weight (forward and the input
gradient), the conversion against the tiny UNet (what is converted, what is not, the bytes saved, no upcast copy kept
for backward), and whole runs on the tiny SD1 and SDXL models: the loss stays within tolerance of the bf16 run, the
LoRA file has exactly the bf16 run's format, and the memory plan counts one byte per fp8 weight.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lora_core.image.fp8 import FP8, Fp8Conv2d, Fp8Linear, quantize_weight, to_fp8
from lora_core.image.lora import add_lora
from lora_core.memory import module_bytes, saved_for_backward


def dequantised(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return module.weight.to(dtype) * module.fp8_scale.to(dtype)


def test_quantised_weights_stay_close_and_small_weights_do_not_vanish():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-4, 0, 64).unsqueeze(1)  # channels from 1e-4 to 1 in scale
    w8, scale = quantize_weight(w)
    assert w8.dtype == FP8 and scale.shape == (64, 1)
    back = w8.float() * scale
    per_channel = (back - w).norm(dim=1) / w.norm(dim=1)
    assert per_channel.max() < 0.05  # e4m3 keeps 3 mantissa bits; the scale keeps each channel in range
    assert (w8.float() != 0).float().mean() > 0.95  # a plain cast would flush the 1e-4 channels to zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_conv_match_torch_on_the_dequantised_weight(dtype):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 24), torch.nn.Conv2d(8, 12, 3, stride=2, padding=1),
              torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)]
    inputs = [torch.randn(2, 5, 16), torch.randn(2, 8, 9, 9), torch.randn(1, 8, 7, 7)]
    for layer, x in zip(layers, inputs):
        layer.requires_grad_(False)
        reference = {"weight": None, "bias": None}
        holder = torch.nn.Sequential(layer)
        assert to_fp8(holder, dtype) == 1
        assert isinstance(layer, (Fp8Linear, Fp8Conv2d)) and layer.weight.dtype == FP8
        w = dequantised(layer, dtype)
        reference["bias"] = None if layer.bias is None else layer.bias.to(dtype)
        x1 = x.to(dtype).requires_grad_(True)
        x2 = x.to(dtype).requires_grad_(True)
        out = layer(x1)
        if isinstance(layer, torch.nn.Linear):
            ref = F.linear(x2, w, reference["bias"])
        else:
            ref = F.conv2d(x2, w, reference["bias"], layer.stride, layer.padding, layer.dilation, layer.groups)
        assert out.dtype == dtype and torch.allclose(out, ref, atol=1e-5 if dtype == torch.float32 else 1e-2)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        assert torch.allclose(x1.grad, x2.grad, atol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.fixture(scope="module")
def tiny_unet_parts():
    from lora_core.tiny import build_components

    return build_components("sd1")


def lora_unet(parts, fp8: bool, dtype=torch.bfloat16):
    import copy

    unet = copy.deepcopy(parts["unet"]).to(dtype)
    torch.manual_seed(0)
    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 4.0, 0.0)
    if fp8:
        to_fp8(unet, dtype)
    return unet


def test_the_unet_keeps_lora_norms_and_embeddings_and_stores_the_rest_in_fp8(tiny_unet_parts):
    plain, unet = lora_unet(tiny_unet_parts, False), lora_unet(tiny_unet_parts, True)
    by_name = dict(unet.named_modules())
    for name, module in unet.named_modules():
        if type(module) in (torch.nn.Linear, torch.nn.Conv2d):
            assert ".lora_" in name, f"{name} was not converted"
            assert module.weight.dtype == torch.float32 and module.weight.requires_grad
        if isinstance(module, (Fp8Linear, Fp8Conv2d)):
            assert module.weight.dtype == FP8 and not module.weight.requires_grad
            assert module.bias is None or module.bias.dtype == torch.bfloat16
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            assert module.weight.dtype == torch.bfloat16
    assert any(n.endswith("to_q.base_layer") and isinstance(m, Fp8Linear) for n, m in by_name.items())
    assert module_bytes(unet) < 0.7 * module_bytes(plain)


def test_backward_keeps_no_upcast_copy_of_the_weights(tiny_unet_parts):
    """What autograd saves for backward, beyond the stored weights: fp8 layers must not add a bf16 weight copy."""
    saved = {}
    for fp8 in (False, True):
        unet = lora_unet(tiny_unet_parts, fp8)
        weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
        text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
        with saved_for_backward(exclude=weights) as total:
            out = unet(x, torch.tensor([10, 500]), text).sample
        out.float().pow(2).mean().backward()
        assert all(p.grad is not None for n, p in unet.named_parameters() if "lora_A" in n)
        saved[fp8] = total["bytes"]
    assert saved[True] <= saved[False]


def _train(tmp_path: Path, family: str, fp8: bool, model: Path, data: Path, steps: int = 6):
    from lora_core.config import config_from_dict
    from lora_core.train import run_training

    out = tmp_path / f"{family}-{'fp8' if fp8 else 'bf16'}"
    cfg = config_from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
                            "resolution": 64, "batch_size": 2, "max_train_steps": steps, "learning_rate": 1e-3,
                            "mixed_precision": "bf16", "fp8_base": fp8, "lora_rank": 4, "seed": 3})
    result = run_training(cfg, show_progress=False)
    assert result.status == "finished", result.error
    return result


def _format(path: Path) -> tuple[dict, set]:
    with safe_open(str(path), "pt") as f:
        layout = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        return layout, set(f.metadata())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp8_base_trains_like_bf16_and_writes_the_same_file_format(tmp_path, family):
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    model = build_tiny_sd(tmp_path, single_file=True, family=family)
    data = make_tiny_dataset(tmp_path / "data", n=4)
    bf16, fp8 = _train(tmp_path, family, False, model, data), _train(tmp_path, family, True, model, data)
    mean = lambda losses: sum(losses) / len(losses)  # noqa: E731
    assert all(torch.isfinite(torch.tensor(fp8.losses)))
    # same data, seed and noise: the per-step losses differ only by the fp8 rounding of the frozen weights
    assert abs(mean(fp8.losses) - mean(bf16.losses)) <= 0.1 * mean(bf16.losses), (fp8.losses, bf16.losses)
    a, b = _format(bf16.output), _format(fp8.output)
    assert a[0] == b[0], "the fp8 run's LoRA file has other keys, dtypes or shapes"
    assert a[1] == b[1], "the fp8 run's LoRA file has other metadata keys"


def test_the_memory_plan_counts_fp8_weights_at_one_byte(tmp_path):
    from lora_core.config import config_from_dict
    from lora_core.image.sd_models import load_sd_model
    from lora_core.plan import estimate_mb, make_plan, measure
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    model = build_tiny_sd(tmp_path, single_file=True)
    data = make_tiny_dataset(tmp_path / "data", n=2)
    base = {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(tmp_path / "o"),
            "resolution": 64, "mixed_precision": "bf16"}
    cfg = config_from_dict(base)
    meas = measure(cfg)
    plain = make_plan(cfg, meas)
    fp8 = make_plan(config_from_dict({**base, "fp8_base": True}), meas)
    # what the run really holds: the model loaded in bf16, LoRA added, the frozen Linear/Conv weights in fp8
    sd = load_sd_model(model, dtype=torch.bfloat16)
    add_lora(sd.unet, cfg.model.unet_target_modules, cfg.model.lora_rank, 8.0, 0.0)
    lora = sum(p.numel() * p.element_size() for n, p in sd.unet.named_parameters() if ".lora_" in n)
    for module in (sd.unet, sd.text_encoder):
        to_fp8(module, torch.bfloat16)
    held = (sum(module_bytes(m) for m in (sd.unet, sd.vae, sd.text_encoder)) - lora) / 2**20
    assert fp8.breakdown_mb["model weights"] < plain.breakdown_mb["model weights"]
    assert abs(fp8.breakdown_mb["model weights"] - held) <= 0.05 * held, (fp8.breakdown_mb, held)
    assert fp8.settings["fp8_base"] is True and estimate_mb(meas, fp8.settings, torch.device("cpu"))[0] \
        == pytest.approx(fp8.estimate_mb)
