"""`dataset prepare` turns a messy folder into a clean one and never touches the source."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from safetensors import safe_open

from dataset_fixtures import make_messy_folder, snapshot, textured_image
from lora_core.dataset.cli import main as dataset_main
from lora_core.dataset.scan import DatasetError, read_metadata_csv, scan_dataset
from lora_core.dataset.check import check_dataset
from lora_core.dataset.prepare import prepare_dataset, safe_name


@pytest.fixture
def messy(tmp_path):
    return make_messy_folder(tmp_path / "raw")


def test_prepared_folder_is_clean_and_the_source_bytes_are_unchanged(messy, tmp_path):
    before = snapshot(messy)
    report = prepare_dataset(messy, tmp_path / "clean", max_short_side=80, resolution=64)
    assert snapshot(messy) == before
    after = check_dataset(tmp_path / "clean", resolution=64)
    assert {p.kind for p in after.problems} == {"too_small", "extreme_aspect", "no_caption"}
    assert {(p.file, p.kind) for p in report.left_out} == {
        ("corrupt.png", "corrupt"), ("good_0_copy.png", "exact_duplicate"),
        ("near_dup_of_good_1.jpg", "near_duplicate"), ("orphan.txt", "caption_without_image")}


def test_images_are_upright_rgb_on_white_and_capped(messy, tmp_path):
    report = prepare_dataset(messy, tmp_path / "clean", max_short_side=80)
    out = tmp_path / "clean"
    changes = {w.source: (w.target, w.changes) for w in report.written}
    with Image.open(out / "rotated.jpg") as im:
        assert im.mode == "RGB" and im.size == (96, 64) and im.getexif().get(0x0112, 1) == 1
    with Image.open(out / "alpha.png") as im:
        assert im.mode == "RGB" and im.size == (80, 80)
        assert min(im.getpixel((0, 0))) >= 250  # the fully transparent top row → white
    with Image.open(out / "cmyk.jpg") as im:
        assert im.mode == "RGB"
    assert changes["old scan.bmp"][0] == "old_scan.png" and "converted_from_bmp" in changes["old scan.bmp"][1]
    assert changes["small.png"] == ("small.png", [])  # never upscaled, copied as is
    assert (out / "small.png").read_bytes() == (messy / "small.png").read_bytes()


def test_captions_follow_their_image_to_its_new_name(messy, tmp_path):
    prepare_dataset(messy, tmp_path / "clean")
    assert (tmp_path / "clean" / "old_scan.txt").read_text(encoding="utf-8").strip() == "scanned"
    assert not (tmp_path / "clean" / "orphan.txt").exists()


def test_captions_can_be_written_as_one_metadata_csv_the_trainer_reads(messy, tmp_path):
    prepare_dataset(messy, tmp_path / "clean", captions="csv", resolution=64)
    rows = read_metadata_csv(tmp_path / "clean" / "metadata.csv")
    assert rows["old_scan.png"] == "scanned" and "uncaptioned.png" not in rows
    assert not list((tmp_path / "clean").glob("*.txt"))
    scan = scan_dataset(tmp_path / "clean", default_caption="photo")
    assert {i.path.name: i.caption for i in scan.items}["rotated.jpg"] == "rotated"


def test_near_duplicates_can_be_kept(messy, tmp_path):
    report = prepare_dataset(messy, tmp_path / "clean", drop_near_duplicates=False)
    assert "near_dup_of_good_1.jpg" in {w.source for w in report.written}
    assert "good_0_copy.png" not in {w.source for w in report.written}


def test_names_are_made_safe_and_unique_and_repeat_folders_survive(tmp_path):
    src = tmp_path / "raw"
    (src / "10_my char").mkdir(parents=True)
    textured_image(1).save(src / "10_my char" / "Foto 1!.png")
    textured_image(2).save(src / "10_my char" / "foto_1.PNG")
    textured_image(3).save(src / "10_my char" / "CON.png")
    textured_image(4).save(src / "10_my char" / "猫.jpeg")
    report = prepare_dataset(src, tmp_path / "clean")
    targets = sorted(w.target for w in report.written)
    assert targets == ["10_my_char/Foto_1.png", "10_my_char/_CON.png",
                       "10_my_char/foto_1_2.png", "10_my_char/猫.jpg"]
    assert safe_name("../../etc") == "etc"


def test_output_must_not_overlap_the_source_or_hold_files(messy, tmp_path):
    with pytest.raises(DatasetError, match="outside the source"):
        prepare_dataset(messy, messy / "clean")
    with pytest.raises(DatasetError, match="outside the source"):
        prepare_dataset(messy, messy.parent)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DatasetError, match="not empty"):
        prepare_dataset(messy, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_a_cancelled_prepare_leaves_no_partial_folder(messy, tmp_path):
    def cancel_after_first(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(messy, tmp_path / "clean", progress=cancel_after_first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_cli_prepares_and_reports_json(messy, tmp_path, capsys):
    assert dataset_main(["prepare", str(messy), "--out", str(tmp_path / "clean"), "--resolution", "64",
                         "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["out"] == str(tmp_path / "clean") and len(data["left_out"]) == 4
    assert dataset_main(["prepare", str(messy), "--out", str(tmp_path / "clean")]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_prepared_folder_trains_without_conversion(messy, tmp_path, tiny_sd):
    from lora_core.dataset.captions import set_caption
    from lora_core.config import config_from_dict
    from lora_core.train import run_training

    prepare_dataset(messy, tmp_path / "clean", max_short_side=80, resolution=64, captions="csv")
    set_caption(tmp_path / "clean", "uncaptioned.png", "a field at dusk")
    assert check_dataset(tmp_path / "clean", resolution=64).ok
    cfg = config_from_dict({"train_data_dir": str(tmp_path / "clean"), "base_model": str(tiny_sd),
                            "output_dir": str(tmp_path / "out"), "resolution": 64, "enable_bucket": True,
                            "min_bucket_reso": 32, "max_bucket_reso": 128, "lora_rank": 4, "batch_size": 2,
                            "max_train_steps": 4, "learning_rate": 1e-3, "save_precision": "float"},
                           base_dir=tmp_path)
    result = run_training(cfg, show_progress=False)
    assert result.status == "finished" and result.step == 4 and result.output.is_file()
    with safe_open(result.output, "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_num_train_images"] == "10"
    assert "a field at dusk" in json.loads(meta["ss_tag_frequency"])["images"]


def test_of_a_duplicate_pair_the_original_is_kept_and_the_report_says_which(tmp_path):
    """`dup.png` sorts first and is even the older file, yet `photo.png` is the original: copies are recognised by
    name; between two plain names the older file is the original."""
    import os

    src = tmp_path / "src"
    src.mkdir()
    textured_image(1).save(src / "dup.png")
    (src / "photo.png").write_bytes((src / "dup.png").read_bytes())
    textured_image(2).save(src / "b.png")
    (src / "a.png").write_bytes((src / "b.png").read_bytes())
    os.utime(src / "dup.png", (1_000_000, 1_000_000))
    os.utime(src / "a.png", (2_000_000, 2_000_000))
    os.utime(src / "b.png", (1_500_000, 1_500_000))
    for name in ("dup.png", "photo.png", "a.png", "b.png"):
        (src / name).with_suffix(".txt").write_text("x")
    report = prepare_dataset(src, tmp_path / "clean")
    assert sorted(w.source for w in report.written) == ["b.png", "photo.png"]
    left = {p.file: p for p in report.left_out}
    assert set(left) == {"a.png", "dup.png"}
    assert left["dup.png"].other == "photo.png" and "kept: the one not named like a copy" in left["dup.png"].detail
    assert left["a.png"].other == "b.png" and "kept: the older file" in left["a.png"].detail
    assert "dup.png: exact_duplicate, same bytes as photo.png" in report.to_text()
