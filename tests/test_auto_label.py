"""Auto-labeling with real captioners built in the test: a tiny random BLIP and a tiny ONNX tagger, from folders."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_fixtures import colour_folder, make_tagger_dir, textured_image, write_caption
from lora_core.dataset.auto_label import label_folder, main as label_main
from lora_core.dataset.captioners import (CaptionerSpec, MissingWeightsError, available_captioners, load_captioner,
                                  register_captioner)
from lora_core.dataset.scan import read_metadata_csv, scan_dataset

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + "a red blue cat dog on the table photo of".split()


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A BLIP captioner with random weights, built from tiny configs and saved the way a downloaded one is."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    out = tmp_path_factory.mktemp("blip")
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=16),
        text_config=dict(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=16,
                         bos_token_id=VOCAB.index("[DEC]"), pad_token_id=0, sep_token_id=3, eos_token_id=3),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    return make_tagger_dir(tmp_path_factory.mktemp("wd14"))


@pytest.fixture
def ten_images(tmp_path) -> Path:
    root = tmp_path / "ds"
    root.mkdir()
    for i in range(10):
        textured_image(i, size=(48 + 4 * i, 64)).save(root / f"img_{i}.png")
    return root


def test_blip_captions_a_folder_in_batches_into_a_metadata_csv_the_trainer_reads(blip_dir, ten_images):
    captioner = load_captioner("blip", blip_dir, device="cpu", max_length=8, min_length=3, num_beams=2)
    calls = []
    report = label_folder(ten_images, captioner, batch_size=4, trigger="sks",
                          progress=lambda done, total: calls.append((done, total)))
    assert report.batches == 3 and calls == [(4, 10), (8, 10), (10, 10)]
    rows = read_metadata_csv(ten_images / "metadata.csv")
    assert sorted(rows) == [f"img_{i}.png" for i in range(10)]
    assert all(c.startswith("sks, ") and len(c) > len("sks, ") for c in rows.values())
    assert {i.path.name: i.caption for i in scan_dataset(ten_images).items} == rows


def test_only_missing_captions_are_made_unless_overwrite(blip_dir, ten_images):
    write_caption(ten_images / "img_0.png", "hand written")
    captioner = load_captioner("blip", blip_dir, device="cpu", max_length=4, min_length=2, num_beams=1)
    report = label_folder(ten_images, captioner, fmt="txt", batch_size=8)
    assert report.kept_existing == ["img_0.png"] and len(report.captions) == 9
    assert (ten_images / "img_0.txt").read_text(encoding="utf-8") == "hand written"
    assert label_folder(ten_images, captioner, fmt="txt").captions == {}
    assert len(label_folder(ten_images, captioner, fmt="txt", overwrite=True).captions) == 10


def test_tagger_gives_thresholded_booru_tags_most_confident_first(tagger_dir, tmp_path):
    root = colour_folder(tmp_path / "colours")
    tagger = load_captioner("wd14", tagger_dir, device="cpu")
    report = label_folder(root, tagger, fmt="txt")
    assert report.captions == {"blue.png": "blue theme, solo, ^_^", "grey.png": "solo, ^_^",
                               "red.png": "red theme, solo, ^_^"}
    strict = load_captioner("wd14", tagger_dir, device="cpu", threshold=0.9, character_threshold=0.4,
                            include_rating=True, exclude_tags=("solo",))
    assert strict.caption_batch([Image.open(root / "red.png")]) == ["general, hatsune miku, red theme"]


def test_tagger_exported_with_a_fixed_batch_of_one_still_labels_every_image(tmp_path):
    tagger = load_captioner("wd14", make_tagger_dir(tmp_path / "fixed", dynamic_batch=False), device="cpu")
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "white")]
    assert tagger.caption_batch(images) == ["red theme, solo, ^_^", "blue theme, solo, ^_^", "solo, ^_^"]


def test_cli_labels_with_the_tagger_and_reports_json(tagger_dir, tmp_path, capsys):
    root = colour_folder(tmp_path / "colours")
    out = tmp_path / "captions.csv"
    assert label_main(["--input", str(root), "--output", str(out), "--captioner", "wd14", "--model",
                       str(tagger_dir), "--device", "cpu", "--batch-size", "2", "--prefix", "sks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["batches"] == 2
    assert read_metadata_csv(out)["red.png"] == "sks, red theme, solo, ^_^"
    scan = scan_dataset(root, metadata_path=out)
    assert {i.path.name for i in scan.items} == {"red.png", "blue.png", "grey.png"}


def test_unreadable_images_are_reported_and_the_rest_labelled(tagger_dir, tmp_path):
    root = colour_folder(tmp_path / "colours")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    report = label_folder(root, load_captioner("wd14", tagger_dir, device="cpu"))
    assert [f["file"] for f in report.failed] == ["broken.png"] and len(report.captions) == 3


def test_missing_weights_say_where_to_put_them_without_a_stack_trace(tmp_path, ten_images):
    empty = tmp_path / "models" / "wd14"
    empty.mkdir(parents=True)
    with pytest.raises(MissingWeightsError, match="lacks model.onnx, selected_tags.csv"):
        load_captioner("wd14", empty)
    proc = subprocess.run([sys.executable, "-m", "lora_core.dataset.auto_label", "--input", str(ten_images),
                           "--captioner", "blip"], capture_output=True, text=True, timeout=120,
                          env={"LORA_SCRIPTS_CAPTIONERS": str(tmp_path / "models"), "PATH": "/usr/bin:/bin"},
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'models' / 'blip'} does not exist" in proc.stderr and "Download" in proc.stderr
    assert not (ten_images / "metadata.csv").exists()


def test_options_for_another_captioner_are_refused(tagger_dir, ten_images, capsys):
    assert label_main(["--input", str(ten_images), "--captioner", "wd14", "--model", str(tagger_dir),
                       "--max-length", "10"]) == 2
    assert "--max-length: applies to --captioner blip" in capsys.readouterr().err


class MeanColourCaptioner:
    """A captioner from outside lora_core, registered the way a plugin would register one."""

    name = "mean-colour"

    def caption_batch(self, images):
        return ["bright" if np.asarray(im).mean() > 127 else "dark" for im in images]


def test_an_outside_captioner_registers_and_labels_like_the_built_in_ones(tmp_path):
    register_captioner(CaptionerSpec("mean-colour", "test", lambda path, device: MeanColourCaptioner(),
                                     needs_model_path=False), replace=True)
    assert {"blip", "wd14", "mean-colour"} <= {s.name for s in available_captioners()}
    root = colour_folder(tmp_path / "colours")
    report = label_folder(root, load_captioner("mean-colour"), fmt="txt")
    assert report.captions == {"blue.png": "dark", "grey.png": "bright", "red.png": "dark"}
    assert next(s for s in available_captioners() if s.name == "wd14").to_dict()["required_files"] == [
        "model.onnx", "selected_tags.csv"]
