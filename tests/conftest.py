"""Shared fixtures: a tiny SD1 model (diffusers folder and single file), a tiny FLUX.1 model (folder and BFL single
file) and a tiny dataset, built once per session."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from lora_core.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd_file(tmp_path_factory) -> Path:
    from lora_core.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-file"), single_file=True)


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory) -> Path:
    """The tiny FLUX.1 [dev] model as a diffusers folder."""
    from lora_core.image.flux_tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="session")
def flux_file(tmp_path_factory) -> Path:
    """The tiny FLUX.1 [dev] model as a Forge-style full single file."""
    from lora_core.image.flux_tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux-file"), single_file=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread. On a shared 2-core machine under load, two OpenMP threads spin against
    each other and a tiny matmul takes ~40x longer (measured: 1.3 ms vs 0.03 ms for a 48x32 linear at load 10)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _tiny_images(tmp_path_factory) -> Path:
    from lora_core.tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "images", n=4, size=64)


@pytest.fixture
def tiny_data(_tiny_images, tmp_path) -> Path:
    """A fresh copy per test (tests may add broken files to it)."""
    dest = tmp_path / "data"
    shutil.copytree(_tiny_images, dest)
    return dest


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def train_config(tiny_sd, tiny_data, tmp_path):
    """A function returning a TrainConfig for the tiny model, with keyword overrides (flat names)."""
    from lora_core.config import config_from_dict

    def make(**overrides):
        raw = {"train_data_dir": str(tiny_data), "base_model": str(tiny_sd), "output_dir": str(tmp_path / "out"),
               "resolution": 64, "lora_rank": 4, "batch_size": 2, "max_train_steps": 10, "learning_rate": 1e-3,
               "save_precision": "float"}
        raw.update(overrides)
        return config_from_dict(raw, base_dir=tmp_path)

    return make
