"""Base models load straight into the training dtype, tensor by tensor: no fp32 copy of the model at any point.

Measured on the tiny models with `TensorMemoryMeter` (the peak of live tensor bytes while loading), for diffusers
folders and WebUI single files of SD1 and SDXL: a bf16 load peaks near the bf16 model's own size, an fp32 load
(what the trainer did before casting) at twice that. And the run itself: a bf16 training run's frozen weights are
bf16, its LoRA fp32, and the VAE stays fp32 with ``no_half_vae``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_core.image.sd_models import load_sd_model
from lora_core.image.weights_io import read_header, read_tensors, write_tensors
from lora_core.memory import TensorMemoryMeter, module_bytes

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def sources(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, diffusers folder, single file) of one tiny family."""
    from lora_core.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp(request.param)
    return (request.param, build_tiny_sd(root / "model", family=request.param),
            build_tiny_sd(root, single_file=True, family=request.param))


def parts(model) -> dict[str, torch.nn.Module]:
    return {p: getattr(model, p) for p in PARTS if getattr(model, p) is not None}


def float_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


def largest_tensor_bytes(path: Path) -> int:
    """The largest stored tensor of a folder's files or a single file (the one-tensor transient a load may hold)."""
    files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
    sizes = [e["data_offsets"][1] - e["data_offsets"][0] for f in files for e in read_header(f)[0].values()]
    return max(sizes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["folder", "single"])
def test_every_part_loads_in_the_asked_dtype_with_the_same_values(sources, kind, dtype):
    family, folder, single = sources
    path = folder if kind == "folder" else single
    reference = load_sd_model(path)  # fp32, as stored
    model = load_sd_model(path, dtype=dtype)
    for name, module in parts(model).items():
        assert float_dtypes(module) == {dtype}, name
        ref = parts(reference)[name].state_dict()
        for key, value in module.state_dict().items():
            assert value.dtype == (dtype if ref[key].is_floating_point() else ref[key].dtype), (name, key)
            assert torch.equal(value, ref[key].to(value.dtype)), (name, key)
    assert model.family == family


def test_vae_dtype_keeps_the_vae_in_fp32(sources):
    _family, folder, single = sources
    for path in (folder, single):
        model = load_sd_model(path, dtype=torch.bfloat16, vae_dtype=torch.float32)
        assert float_dtypes(model.vae) == {torch.float32}
        assert float_dtypes(model.unet) == float_dtypes(model.text_encoder) == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["folder", "single"])
def test_a_bf16_load_never_holds_an_fp32_copy(sources, kind):
    _family, folder, single = sources
    path = folder if kind == "folder" else single
    meters = {}
    for dtype in (torch.float32, torch.bfloat16):
        meter = TensorMemoryMeter()
        with meter:
            model = load_sd_model(path, dtype=dtype)
        meters[dtype] = (meter.peak_bytes, sum(module_bytes(m) for m in parts(model).values()))
        del model
    bf16_peak, bf16_size = meters[torch.bfloat16]
    fp32_peak, fp32_size = meters[torch.float32]
    in_flight = largest_tensor_bytes(path)  # one stored (fp32) tensor being read and cast
    assert bf16_size < 0.55 * fp32_size and fp32_peak >= fp32_size
    # the bf16 model, plus one tensor in flight and converter transients (SDXL's q/k/v split): never the fp32 model
    assert bf16_peak <= 1.25 * bf16_size + in_flight, (bf16_peak, bf16_size)
    assert bf16_peak - in_flight < 0.75 * fp32_size, "a bf16 load held about an fp32 model's worth of tensors"


def test_an_ema_copy_in_the_checkpoint_is_never_read(sources, tmp_path):
    """WebUI checkpoints may carry EMA weights (``model_ema.*``) the trainer does not use: skipping them keeps a
    7 GB 'full' SD1.5 file from costing 7 GB."""
    _family, _folder, single = sources
    header = read_header(single)[0]
    state = read_tensors(single, lambda name, stored: None)
    big = {**{k: (tuple(v.shape), v.dtype) for k, v in state.items()},
           "model_ema.decay": ((), torch.float32), "model_ema.big": ((4096, 1024), torch.float32)}
    path = write_tensors(tmp_path / "with-ema.safetensors", big,
                         lambda name, shape, dtype: state[name] if name in state else torch.ones(shape, dtype=dtype))
    peaks = []
    for file in (single, path):
        meter = TensorMemoryMeter()
        with meter:
            model = load_sd_model(file, dtype=torch.bfloat16)
        peaks.append(meter.peak_bytes)
    assert peaks[1] <= peaks[0] + 2**16, f"the 16 MB EMA tensor was read ({peaks})"
    assert set(header) < set(read_header(path)[0])
    assert float_dtypes(model.unet) == {torch.bfloat16}


def test_a_bf16_run_trains_fp32_lora_on_bf16_weights(tmp_path):
    """Through the CLI path: after setup the UNet and text encoder hold bf16 base weights, the LoRA is fp32 (the
    optimizer updates it), and ``no_half_vae`` keeps the VAE fp32."""
    from lora_core.config import config_from_dict
    from lora_core.image.task import ImageTask
    from lora_core.loop import make_accelerator
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    model = build_tiny_sd(tmp_path, single_file=True)
    data = make_tiny_dataset(tmp_path / "data", n=2)
    cfg = config_from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(tmp_path / "o"),
                            "resolution": 64, "mixed_precision": "bf16", "no_half_vae": True, "max_train_steps": 1})
    task = ImageTask(cfg)
    task.setup(make_accelerator(cfg))
    unet = getattr(task.unet, "module", task.unet)
    lora = {n: p.dtype for n, p in unet.named_parameters() if ".lora_" in n}
    assert lora and set(lora.values()) == {torch.float32}
    assert {p.dtype for n, p in unet.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    assert float_dtypes(task.model.vae) == {torch.float32}


def test_no_half_vae_runs_to_the_end_with_its_preview(tmp_path):
    """A bf16 run with an fp32 VAE trains, exports and renders its end-of-run preview (decoded in fp32)."""
    from lora_core.config import config_from_dict
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset
    from lora_core.train import run_training

    model = build_tiny_sd(tmp_path, single_file=True, family="sdxl")
    data = make_tiny_dataset(tmp_path / "data", n=2)
    cfg = config_from_dict({"base_model": str(model), "train_data_dir": str(data), "output_dir": str(tmp_path / "o"),
                            "resolution": 64, "mixed_precision": "bf16", "no_half_vae": True, "max_train_steps": 2})
    result = run_training(cfg, show_progress=False)
    assert result.status == "finished", result.error
    assert (tmp_path / "o" / "samples" / "preview.png").is_file()
