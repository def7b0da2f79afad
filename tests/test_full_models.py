"""The one full-size builder (benchmarks/full_models.py) writes the published SD 1.5 / SDXL shapes under WebUI key
names, tensor by tensor. Only the shapes are computed here (on the meta device): the files themselves are gigabytes
and belong to the benchmarks, not to CI."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import full_models  # noqa: E402

# parameter counts of the released models' parts (runwayml/stable-diffusion-v1-5, stabilityai/sdxl-base-1.0); the
# OpenCLIP tower as transformers' CLIPTextModelWithProjection holds it (the released file's one extra scalar,
# logit_scale, is used by no trainer and not written)
PUBLISHED = {"sd1": {"model.diffusion_model.": 859_520_964, "first_stage_model.": 83_653_863,
                     "cond_stage_model.transformer.": 123_060_480},
             "sdxl": {"model.diffusion_model.": 2_567_463_684, "first_stage_model.": 83_653_863,
                      "conditioner.embedders.0.transformer.": 123_060_480,
                      "conditioner.embedders.1.model.": 694_659_840}}


def _counts(family: str) -> dict:
    shapes = full_models.ldm_shapes(family)
    counts = {prefix: 0 for prefix in PUBLISHED[family]}
    for key, (shape, dtype) in shapes.items():
        prefix = next(p for p in counts if key.startswith(p))
        if dtype.is_floating_point:
            assert dtype == torch.float16, key
            counts[prefix] += math.prod(shape)
    return counts


def test_sd15_shapes_are_the_published_ones():
    assert _counts("sd1") == PUBLISHED["sd1"]


def test_sdxl_shapes_are_the_published_ones():
    assert _counts("sdxl") == PUBLISHED["sdxl"]


def test_random_tensors_are_seeded_by_name_and_keep_a_forward_pass_finite():
    a = full_models.random_tensor("model.diffusion_model.out.2.weight", (4, 320, 3, 3), torch.float16)
    b = full_models.random_tensor("model.diffusion_model.out.2.weight", (4, 320, 3, 3), torch.float16)
    c = full_models.random_tensor("model.diffusion_model.out.0.weight", (4, 320, 3, 3), torch.float16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float16 and abs(a.float().std().item() - 1 / math.sqrt(320 * 9)) < 0.01
    norm = full_models.random_tensor("first_stage_model.encoder.norm_out.weight", (512,), torch.float16)
    assert torch.equal(norm, torch.ones(512, dtype=torch.float16))
