"""Generated image folders for the dataset-tool tests: real files, written with PIL, each with one known flaw."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION_ROTATE_90_CW = 6
# A tiny WD14-style tagger's tags: (name, category, bias, weight on the image's mean R, G, B in 0-1). Red and blue
# images get their colour tag (grey and white do not); the tags with a bias alone go on every image or on none.
TAGGER_TAGS = [("general", 9, 2.0, (0, 0, 0)), ("sensitive", 9, -2.0, (0, 0, 0)),
               ("red_theme", 0, -10.0, (20, -20, 0)), ("blue_theme", 0, -10.0, (0, -20, 20)),
               ("solo", 0, 3.0, (0, 0, 0)), ("hatsune_miku", 4, 0.0, (0, 0, 0)), ("^_^", 0, 1.0, (0, 0, 0)),
               ("rare_tag", 0, -3.0, (0, 0, 0))]


def textured_image(seed: int, size: tuple[int, int] = (96, 96), mode: str = "RGB") -> Image.Image:
    """A smooth random colour field: distinct per seed (unlike flat colours, whose difference hashes all agree)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8), "RGB")
    return coarse.resize(size, Image.Resampling.BICUBIC).convert(mode)


def write_caption(image: Path, caption: str) -> None:
    image.with_suffix(".txt").write_text(caption, encoding="utf-8")


def make_messy_folder(root: Path) -> Path:
    """One folder with every flaw `check` must name; for training at resolution 64.

    good_*.png are fine; the others are named after what is wrong with them.
    """
    root.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(["red field, sky", "blue field, sky", "green field"]):
        textured_image(i).save(root / f"good_{i}.png")
        write_caption(root / f"good_{i}.png", caption)

    (root / "good_0_copy.png").write_bytes((root / "good_0.png").read_bytes())
    write_caption(root / "good_0_copy.png", "red field, sky")

    near = textured_image(1).resize((90, 90), Image.Resampling.LANCZOS)
    near.save(root / "near_dup_of_good_1.jpg", quality=85)
    write_caption(root / "near_dup_of_good_1.jpg", "blue field")

    data = (root / "good_2.png").read_bytes()
    (root / "corrupt.png").write_bytes(data[: len(data) // 2])
    write_caption(root / "corrupt.png", "broken")

    alpha = textured_image(10, mode="RGBA")
    alpha.putalpha(Image.linear_gradient("L").resize(alpha.size))
    alpha.save(root / "alpha.png")
    write_caption(root / "alpha.png", "transparent, sky")

    textured_image(11).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    write_caption(root / "cmyk.jpg", "printed, sky")

    stored = textured_image(12, size=(64, 96))
    exif = Image.Exif()
    exif[0x0112] = ORIENTATION_ROTATE_90_CW
    stored.save(root / "rotated.jpg", exif=exif, quality=95)
    write_caption(root / "rotated.jpg", "rotated")

    textured_image(13, size=(32, 32)).save(root / "small.png")
    write_caption(root / "small.png", "tiny")

    textured_image(14, size=(256, 64)).save(root / "wide.png")
    write_caption(root / "wide.png", "panorama")

    textured_image(15).save(root / "uncaptioned.png")

    textured_image(16).save(root / "old scan.bmp")
    write_caption(root / "old scan.bmp", "scanned")

    (root / "orphan.txt").write_text("caption of a deleted image", encoding="utf-8")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file's bytes, to prove a tool left a folder exactly as it was."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def colour_folder(root: Path) -> Path:
    """Three flat 64 px images, red, blue and grey: what `TAGGER_TAGS` tells apart."""
    root.mkdir()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(root / "red.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(root / "blue.png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(root / "grey.png")
    return root


def make_tagger_dir(out: Path, tags: list[tuple] = TAGGER_TAGS, dynamic_batch: bool = True) -> Path:
    """A WD14-layout tagger folder with hand-set weights: the engine's demo tagger (`lora_core.tiny`) with these
    tags. ``dynamic_batch=False`` exports a fixed batch of one, as some published taggers are."""
    from lora_core.tiny import build_tiny_tagger

    return build_tiny_tagger(out, tags, dynamic_batch)
