"""BLIP and BLIP-2 captions through transformers, from a local model folder (``local_files_only``, safetensors only).

The model class comes from ``config.json``'s ``model_type``, so a BLIP-2 folder works the same way as a BLIP one.
Batches go through the processor and ``generate`` together: a 100-image folder is a few forward passes, not 100.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from PIL import Image

from . import CaptionerError, MissingWeightsError

log = logging.getLogger(__name__)

MODEL_CLASSES = {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration"}
DEFAULT_MAX_LENGTH = 75  # new tokens; BLIP captions are one sentence, sd-scripts' make_captions uses the same cap
DEFAULT_MIN_LENGTH = 5  # stops BLIP's habit of one- or two-word captions ("a dog")
DEFAULT_NUM_BEAMS = 3


def torch_device(device: str) -> str:
    """"auto" → cuda when available; asking for cuda without one is an error, not a silent CPU run."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CaptionerError("device: cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return device


class BlipCaptioner:
    """``max_length``/``min_length`` count new tokens; ``prompt`` conditions the caption ("a photo of") and is
    part of the text BLIP returns."""

    name = "blip"

    def __init__(self, model_path: Path, device: str = "auto", max_length: int = DEFAULT_MAX_LENGTH,
                 min_length: int = DEFAULT_MIN_LENGTH, num_beams: int = DEFAULT_NUM_BEAMS,
                 prompt: Optional[str] = None):
        import torch
        import transformers

        model_type = json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in MODEL_CLASSES:
            raise CaptionerError(f"{model_path / 'config.json'}: model_type {model_type!r} is not a BLIP model "
                                 f"(expected {' or '.join(MODEL_CLASSES)})")
        if not any(model_path.glob("*.safetensors")):
            raise MissingWeightsError(f"{model_path}: no .safetensors weights (pickle .bin files are not loaded); "
                                      f"download the model's model.safetensors into this folder")
        if num_beams < 1 or not 0 <= min_length <= max_length:
            raise CaptionerError(f"num_beams must be >= 1 and 0 <= min_length <= max_length, got num_beams="
                                 f"{num_beams}, min_length={min_length}, max_length={max_length}")
        self.device = torch_device(device)
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.max_length, self.min_length, self.num_beams, self.prompt = max_length, min_length, num_beams, prompt
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model_path, local_files_only=True)
            model_cls = getattr(transformers, MODEL_CLASSES[model_type])
            self.model = model_cls.from_pretrained(model_path, local_files_only=True, use_safetensors=True,
                                                   dtype=self.dtype)
        except OSError as e:
            raise MissingWeightsError(f"{model_path}: incomplete BLIP folder ({e}); it needs config.json, "
                                      f"model.safetensors, the preprocessor and tokenizer files") from e
        self.model.to(self.device).eval()

    def caption_batch(self, images: list[Image.Image]) -> list[str]:
        import torch

        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_length, min_new_tokens=self.min_length,
                                      num_beams=self.num_beams)
        return [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]

