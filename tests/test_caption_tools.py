"""Caption editing on a folder, as the tab's caption editor uses it: what is written is what the trainer reads."""
from __future__ import annotations

import json

import pytest

from dataset_fixtures import textured_image, write_caption
from lora_core.dataset.captions import (CaptionError, add_trigger, apply_edit, merge_captions, read_captions,
                                     remove_tags, replace_text, set_caption, sort_tags)
from lora_core.dataset.scan import read_metadata_csv, scan_dataset


@pytest.fixture
def sidecar_folder(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    for i, caption in enumerate(["1girl, solo, red hair", "solo, 1girl, smile", "landscape, sky, solo"]):
        textured_image(i).save(root / f"{i}.png")
        write_caption(root / f"{i}.png", caption)
    textured_image(9).save(root / "new.png")
    return root


def trained_captions(root) -> dict[str, str]:
    return {i.path.name: i.caption for i in scan_dataset(root, default_caption="").items if i.caption}


def test_read_captions_says_where_each_caption_comes_from(sidecar_folder):
    (sidecar_folder / "metadata.csv").write_text("file_name,text\n0.png,from csv\n", encoding="utf-8")
    entries = {e.file: (e.caption, e.source) for e in read_captions(sidecar_folder).entries}
    assert entries == {"0.png": ("from csv", "csv"), "1.png": ("solo, 1girl, smile", "txt"),
                       "2.png": ("landscape, sky, solo", "txt"), "new.png": (None, None)}
    assert json.loads(json.dumps(read_captions(sidecar_folder).to_dict()))["entries"][0]["source"] == "csv"


def test_set_caption_writes_where_the_trainer_reads(sidecar_folder):
    (sidecar_folder / "metadata.csv").write_text("file_name,text\n0.png,from csv\n", encoding="utf-8")
    set_caption(sidecar_folder, "0.png", "edited in csv")
    set_caption(sidecar_folder, "1.png", "edited sidecar")
    entry = set_caption(sidecar_folder, "new.png", "brand new")
    assert entry.source == "csv"  # a folder with metadata.csv gets new captions there
    assert read_metadata_csv(sidecar_folder / "metadata.csv") == {"0.png": "edited in csv", "new.png": "brand new"}
    assert (sidecar_folder / "1.txt").read_text(encoding="utf-8").strip() == "edited sidecar"
    assert trained_captions(sidecar_folder)["0.png"] == "edited in csv"
    assert not list(sidecar_folder.glob("*.tmp"))


def test_set_caption_refuses_paths_outside_the_folder_and_non_images(sidecar_folder, tmp_path):
    textured_image(5).save(tmp_path / "outside.png")
    with pytest.raises(CaptionError, match="outside the dataset folder"):
        set_caption(sidecar_folder, "../outside.png", "x")
    with pytest.raises(CaptionError, match="not an image"):
        set_caption(sidecar_folder, "0.txt", "x")
    with pytest.raises(CaptionError, match="one line"):
        set_caption(sidecar_folder, "0.png", "two\nlines")


def test_trigger_word_is_added_first_once_and_removed_again(sidecar_folder):
    report = apply_edit(sidecar_folder, "add_trigger", {"word": "sks"})
    assert len(report.changed) == 3 and "1 images have no caption" in report.notes[0]
    apply_edit(sidecar_folder, "add_trigger", {"word": "sks"})
    assert trained_captions(sidecar_folder)["0.png"] == "sks, 1girl, solo, red hair"
    apply_edit(sidecar_folder, "remove_trigger", {"word": "sks"})
    assert trained_captions(sidecar_folder)["0.png"] == "1girl, solo, red hair"


def test_find_replace_and_remove_tags_apply_to_every_caption(sidecar_folder):
    apply_edit(sidecar_folder, "replace", {"find": "red hair", "replace": "crimson hair"})
    apply_edit(sidecar_folder, "remove_tags", {"tags": "solo, SMILE"})
    assert trained_captions(sidecar_folder) == {"0.png": "1girl, crimson hair", "1.png": "1girl",
                                                "2.png": "landscape, sky"}


def test_sort_by_frequency_keeps_the_first_tags(sidecar_folder):
    apply_edit(sidecar_folder, "add_trigger", {"word": "sks"})
    apply_edit(sidecar_folder, "sort_by_frequency", {"keep": 1})
    assert trained_captions(sidecar_folder)["2.png"] == "sks, solo, landscape, sky"
    assert trained_captions(sidecar_folder)["1.png"] == "sks, solo, 1girl, smile"


def test_dry_run_previews_without_writing(sidecar_folder):
    report = apply_edit(sidecar_folder, "add_trigger", {"word": "sks"}, dry_run=True)
    assert report.changed[0].after.startswith("sks, ")
    assert trained_captions(sidecar_folder)["0.png"] == "1girl, solo, red hair"


def test_edits_on_a_metadata_csv_folder_rewrite_the_csv(tmp_path):
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    textured_image(1).save(root / "sub" / "a.png")
    textured_image(2).save(root / "b.png")
    (root / "metadata.csv").write_text("file_name,text\nsub/a.png,\"cat, cute\"\nb.png,dog\n", encoding="utf-8")
    apply_edit(root, "add_trigger", {"word": "sks"})
    assert read_metadata_csv(root / "metadata.csv") == {"sub/a.png": "sks, cat, cute", "b.png": "sks, dog"}


def test_bad_edit_requests_name_the_problem(sidecar_folder):
    with pytest.raises(CaptionError, match="unknown edit 'shout'"):
        apply_edit(sidecar_folder, "shout")
    with pytest.raises(CaptionError, match="missing parameter word"):
        apply_edit(sidecar_folder, "add_trigger", {})
    with pytest.raises(CaptionError, match="unknown parameter colour"):
        apply_edit(sidecar_folder, "add_trigger", {"word": "x", "colour": "red"})
    with pytest.raises(CaptionError, match="not a valid regular expression"):
        apply_edit(sidecar_folder, "replace", {"find": "(", "regex": True})


def test_merge_prefers_the_stated_source_and_reports_conflicts(sidecar_folder):
    (sidecar_folder / "metadata.csv").write_text("file_name,text\n0.png,csv says\nnew.png,only in csv\n",
                                                 encoding="utf-8")
    report = merge_captions(sidecar_folder, prefer="txt", into="csv")
    assert report.conflicts == [{"file": "0.png", "csv": "csv says", "txt": "1girl, solo, red hair",
                                 "kept": "1girl, solo, red hair"}]
    assert read_metadata_csv(sidecar_folder / "metadata.csv") == {
        "0.png": "1girl, solo, red hair", "1.png": "solo, 1girl, smile", "2.png": "landscape, sky, solo",
        "new.png": "only in csv"}


def test_merge_into_sidecars_moves_the_csv_aside_so_the_sidecars_train(sidecar_folder):
    (sidecar_folder / "metadata.csv").write_text("file_name,text\n0.png,csv says\nnew.png,only in csv\n",
                                                 encoding="utf-8")
    report = merge_captions(sidecar_folder, prefer="csv", into="txt")
    assert report.moved_aside.endswith("metadata.csv.bak") and not (sidecar_folder / "metadata.csv").exists()
    assert trained_captions(sidecar_folder) == {"0.png": "csv says", "1.png": "solo, 1girl, smile",
                                                "2.png": "landscape, sky, solo", "new.png": "only in csv"}


def test_caption_helpers_work_on_single_captions():
    assert add_trigger("a, sks, b", "sks") == "sks, a, b"
    assert remove_tags("1girl, Solo,  smile ", ["solo"]) == "1girl, smile"
    assert replace_text("a cat", r"c(a)t", r"b\1t", regex=True) == "a bat"
    assert sort_tags("rare, common", {"common": 9, "rare": 1}) == "common, rare"
