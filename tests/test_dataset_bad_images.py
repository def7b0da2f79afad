"""Images the trainer would have used silently or choked on: each is named, with what was done to it and why."""
from __future__ import annotations

import logging
import warnings

import numpy as np
from PIL import Image

from lora_core.dataset.scan import scan_dataset, upright_rgb


def bad_folder(root):
    root.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(root / "fine.png")
    Image.new("CMYK", (64, 64), (0, 50, 100, 0)).save(root / "cmyk.jpg")
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(root / "gray16.png")
    Image.new("RGB", (1, 1)).save(root / "dot.png")
    Image.new("L", (10000, 10000)).save(root / "bomb.png")
    frames = [Image.new("RGB", (64, 64), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(root / "moving.webp", save_all=True, append_images=frames[1:])
    frames[0].save(root / "moving.gif", save_all=True, append_images=frames[1:])
    return root


def test_each_odd_image_is_reported_by_name_with_what_was_done(tmp_path, caplog):
    folder = bad_folder(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # never PIL's nameless warning
        with caplog.at_level(logging.WARNING):
            scan = scan_dataset(folder, default_caption="x")
    used = sorted(i.path.name for i in scan.items)
    skipped = dict(scan.skipped)
    notes = dict(scan.notes)
    assert used == ["cmyk.jpg", "fine.png", "gray16.png", "moving.webp"]
    assert skipped["dot.png"].startswith("too small (1×1")
    assert skipped["bomb.png"].startswith("too large (10000×10000")
    assert skipped["moving.gif"].startswith(".gif is not read by the trainer")
    assert notes["moving.webp"] == "animated (3 frames): only the first frame is used"
    assert notes["cmyk.jpg"].startswith("CMYK: converted to RGB")
    assert notes["gray16.png"].startswith("16-bit grayscale: converted to 8-bit")
    assert "fine.png" not in notes
    for name in ("dot.png", "bomb.png", "moving.gif", "moving.webp", "cmyk.jpg", "gray16.png"):
        assert name in caplog.text  # the run log names each one


def test_a_16_bit_grayscale_image_is_scaled_not_clipped_to_white(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65520
    Image.fromarray(ramp).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        rgb = np.asarray(upright_rgb(im))
    expected = ramp.astype(np.float64) * 255.0 / 65535.0
    assert rgb.shape == (64, 64, 3)
    assert np.abs(rgb[..., 0].astype(np.float64) - expected).max() <= 1.0
