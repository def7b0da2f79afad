"""Generated image folders for the dataset-tool tests: real files, written with PIL, each with one known flaw."""
from __future__ import annotations

import csv
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
    """A WD14-layout tagger folder (model.onnx + selected_tags.csv) with hand-set weights, built with onnx alone.

    Its interface is WD14's: NHWC BGR 0-255 in, one sigmoid per tag out; inside, the image's mean colour goes
    through one linear layer. ``dynamic_batch=False`` exports a fixed batch of one, as some published taggers are.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out.mkdir(parents=True, exist_ok=True)
    rgb = np.array([t[3] for t in tags], dtype=np.float32).T / 255.0  # (3, tags); the input is 0-255
    bgr = rgb[::-1].copy()  # the tagger is fed BGR
    bias = np.array([t[2] for t in tags], dtype=np.float32)
    batch = "batch" if dynamic_batch else 1
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["output"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 32, 32, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, len(tags)])],
        [numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
         numpy_helper.from_array(bgr, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(out / "model.onnx"))
    with open(out / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, *_) in enumerate(tags):
            writer.writerow([i, name, category, 100 - i])
    return out
