"""With data.cache_latents_to_disk the VAE and the frozen text encoders leave memory once their outputs are cached
(their parameters hold no storage), and come back from the base model for a sample — which renders exactly what a
run that kept them renders. Diffusers folder, SD1 single file and SDXL single file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core.loop import make_accelerator, make_task


def _setup(cfg):
    task = make_task(cfg)
    task.setup(make_accelerator(cfg))
    return task


def _frozen(task) -> list:
    return [m for m in (task.model.vae, task.model.text_encoder, task.model.text_encoder_2) if m is not None]


@pytest.mark.parametrize("source", ["folder", "sd1-file", "sdxl-file"])
def test_frozen_parts_leave_memory_after_disk_caching_and_return_for_samples(train_config, tiny_sd, tiny_sd_file,
                                                                             tmp_path, source):
    if source == "sdxl-file":
        from lora_core.tiny import build_tiny_sd

        model = build_tiny_sd(tmp_path / "sdxl", single_file=True, family="sdxl")
    else:
        model = tiny_sd if source == "folder" else tiny_sd_file
    common = dict(base_model=str(model), max_train_steps=1)
    kept = _setup(train_config(output_dir=str(tmp_path / "kept"), **common))
    released = _setup(train_config(output_dir=str(tmp_path / "released"), cache_latents_to_disk=True, **common))
    assert not any(p.is_meta for m in _frozen(kept) for p in m.parameters())
    assert all(p.is_meta for m in _frozen(released) for p in m.parameters())
    assert not any(p.is_meta for p in released.model.unet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(kept.latent_cache.values(), released.latent_cache.values()))

    (a, _), = kept.sample(0, tmp_path / "a", preview=True)
    (b, _), = released.sample(0, tmp_path / "b", preview=True)
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert all(p.is_meta for m in _frozen(released) for p in m.parameters()), "released again after the sample"


def test_fp8_base_keeps_the_frozen_parts(train_config, tiny_sd_file, tmp_path):
    """fp8 base weights convert the frozen text encoders' layers, which a reload from the file would not match."""
    task = _setup(train_config(base_model=str(tiny_sd_file), cache_latents_to_disk=True, fp8_base=True,
                               max_train_steps=1))
    assert not any(p.is_meta for m in _frozen(task) for p in m.parameters())
