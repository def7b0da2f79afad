"""WD14-style tagger: an ONNX image classifier plus ``selected_tags.csv``, run with onnxruntime, giving booru tags.

The folder layout is the one SmilingWolf's taggers ship with: ``model.onnx`` (input NHWC, BGR, 0–255 floats, square)
and ``selected_tags.csv`` (``tag_id,name,category,count``; category 9 = rating, 4 = character, 0 = general). Tags are
kept when their score reaches the threshold (characters have their own, stricter one), most confident first,
characters before general tags — the order anime-style datasets are captioned in.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from . import CaptionerError

log = logging.getLogger(__name__)

CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9
DEFAULT_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85
# Kaomoji tags keep their underscores ("^_^" is a face, "^ ^" is not); the list WD14 taggers and sd-scripts use.
KAOMOJIS = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
            "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


def read_tags(path: Path) -> list[tuple[str, int]]:
    """(name, category) per model output, in output order; a malformed row is an error naming its line."""
    tags = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
            raise CaptionerError(f"{path.name}: expected columns tag_id,name,category,count, got {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            try:
                tags.append((row["name"], int(row["category"])))
            except (TypeError, ValueError) as e:
                raise CaptionerError(f"{path.name} line {lineno}: bad category {row.get('category')!r}") from e
    return tags


def display_name(tag: str) -> str:
    return tag if tag in KAOMOJIS else tag.replace("_", " ")


def ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise CaptionerError("device: cuda was asked for but this onnxruntime has no CUDAExecutionProvider "
                             "(install onnxruntime-gpu); use --device cpu or auto")
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def to_square_bgr(im: Image.Image, size: int) -> np.ndarray:
    """Pad to a white square (no crop: tags at the edges survive), resize, RGB → BGR float32 0–255."""
    im = im.convert("RGB")
    side = max(im.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    canvas = canvas.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1]


class WD14Tagger:
    name = "wd14"

    def __init__(self, model_path: Path, device: str = "auto", threshold: float = DEFAULT_THRESHOLD,
                 character_threshold: float = DEFAULT_CHARACTER_THRESHOLD, include_rating: bool = False,
                 exclude_tags: tuple[str, ...] = (), replace_underscores: bool = True):
        import onnxruntime as ort

        for name, value in (("threshold", threshold), ("character_threshold", character_threshold)):
            if not 0 < value <= 1:
                raise CaptionerError(f"{name}: must be in (0, 1], got {value}")
        self.tags = read_tags(model_path / "selected_tags.csv")
        self.session = ort.InferenceSession(str(model_path / "model.onnx"), providers=ort_providers(device))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        batch, height, width, channels = inp.shape
        if channels != 3 or height != width or not isinstance(height, int):
            raise CaptionerError(f"{model_path / 'model.onnx'}: expected a square NHWC RGB input, got {inp.shape}")
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags):
            raise CaptionerError(f"{model_path}: model.onnx has {outputs} outputs but selected_tags.csv "
                                 f"lists {len(self.tags)} tags")
        self.size = height
        self.fixed_batch = batch if isinstance(batch, int) else None
        self.threshold, self.character_threshold = threshold, character_threshold
        self.include_rating, self.replace_underscores = include_rating, replace_underscores
        self.exclude = {t.strip().lower().replace(" ", "_") for t in exclude_tags}

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """(n_images, n_tags) probabilities; models exported with a fixed batch size get chunks of that size."""
        batch = np.stack([to_square_bgr(im, self.size) for im in images])
        step = self.fixed_batch or len(images)
        parts = []
        for i in range(0, len(batch), step):
            chunk = batch[i:i + step]
            if len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            parts.append(self.session.run(None, {self.input_name: chunk})[0][:len(batch) - i])
        return np.concatenate(parts)

    def tags_for(self, probs: np.ndarray) -> list[str]:
        rating, characters, general = [], [], []
        for (name, category), p in zip(self.tags, probs):
            if name.lower() in self.exclude:
                continue
            if category == CATEGORY_RATING:
                rating.append((p, name))
            elif category == CATEGORY_CHARACTER and p >= self.character_threshold:
                characters.append((p, name))
            elif category == CATEGORY_GENERAL and p >= self.threshold:
                general.append((p, name))
        chosen = [max(rating)] if self.include_rating and rating else []
        chosen += sorted(characters, key=lambda t: -t[0]) + sorted(general, key=lambda t: -t[0])
        return [display_name(n) if self.replace_underscores else n for _, n in chosen]

    def caption_batch(self, images: list[Image.Image]) -> list[str]:
        return [", ".join(self.tags_for(p)) for p in self.scores(images)]
