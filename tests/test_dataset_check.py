"""`dataset check` on a folder with one of every flaw: each is named by file and kind, and nothing is written."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from dataset_fixtures import make_messy_folder, snapshot, textured_image, write_caption
from lora_core.dataset.cli import main as dataset_main
from lora_core.dataset.scan import DatasetError
from lora_core.dataset.check import check_dataset, colour_dhash, hash_distance


@pytest.fixture
def messy(tmp_path):
    return make_messy_folder(tmp_path / "raw")


def kinds_by_file(report) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for p in report.problems:
        found.setdefault(p.file, set()).add(p.kind)
    return found


def test_every_flaw_is_reported_by_file_name_and_kind(messy):
    report = check_dataset(messy, resolution=64)
    found = kinds_by_file(report)
    assert found.pop("corrupt.png") == {"corrupt"}
    assert found.pop("alpha.png") == {"alpha"}
    assert found.pop("cmyk.jpg") == {"colour_mode"}
    assert found.pop("rotated.jpg") == {"exif_rotated"}
    assert found.pop("good_0_copy.png") == {"exact_duplicate"}
    assert found.pop("near_dup_of_good_1.jpg") == {"near_duplicate"}
    assert found.pop("small.png") == {"too_small"}
    assert found.pop("wide.png") == {"extreme_aspect"}
    assert found.pop("uncaptioned.png") == {"no_caption"}
    assert found.pop("old scan.bmp") == {"unsupported_format"}
    assert found.pop("orphan.txt") == {"caption_without_image"}
    assert found == {}, "the good images must not be reported"
    assert not report.ok


def test_duplicates_name_the_image_they_copy_and_how_close(messy):
    report = check_dataset(messy, resolution=64)
    exact, = report.by_kind("exact_duplicate")
    near, = report.by_kind("near_duplicate")
    assert (exact.other, exact.distance) == ("good_0.png", 0)
    assert near.other == "good_1.png" and 0 < near.distance <= 12


def test_rotated_image_reports_its_upright_size(messy):
    info = {i.file: i for i in check_dataset(messy, resolution=64).images}
    assert (info["rotated.jpg"].width, info["rotated.jpg"].height) == (96, 64)


def test_check_never_modifies_the_folder(messy):
    before = snapshot(messy)
    check_dataset(messy, resolution=64)
    assert snapshot(messy) == before


def test_tag_frequency_counts_comma_separated_tags_most_frequent_first(messy):
    freq = check_dataset(messy, resolution=64).tag_frequency
    assert list(freq)[0] == "sky" and freq["sky"] == 5
    assert freq["red field"] == 2  # good_0 and its exact copy both carry it


def test_report_is_json_for_the_daemon_and_the_tab(messy):
    data = json.loads(json.dumps(check_dataset(messy, resolution=64).to_dict()))
    assert data["summary"]["errors"] == 3
    assert {"file": "small.png", "kind": "too_small", "severity": "warning"}.items() <= next(
        p for p in data["problems"] if p["file"] == "small.png").items()


def test_captions_in_metadata_csv_count_and_rows_without_image_are_reported(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    textured_image(1).save(root / "a.png")
    (root / "metadata.csv").write_text("file_name,text\na.png,a cat\ngone.png,a dog\n", encoding="utf-8")
    report = check_dataset(root, resolution=64)
    assert [(p.file, p.kind) for p in report.problems] == [("metadata.csv", "caption_without_image")]
    assert "gone.png" in report.problems[0].detail and report.ok


def test_broken_metadata_csv_is_an_error_naming_its_line(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    textured_image(1).save(root / "a.png")
    write_caption(root / "a.png", "a cat")
    (root / "metadata.csv").write_text("file_name,text\njust-a-name\n", encoding="utf-8")
    bad, = check_dataset(root, resolution=64).by_kind("bad_metadata")
    assert "line 2" in bad.detail


def test_a_recoloured_copy_is_not_a_near_duplicate():
    red = Image.new("RGB", (64, 64), "white")
    red.paste((255, 0, 0), (16, 16, 48, 48))
    blue = Image.new("RGB", (64, 64), "white")
    blue.paste((0, 0, 255), (16, 16, 48, 48))
    shrunk = red.resize((50, 50), Image.Resampling.LANCZOS)
    assert hash_distance(colour_dhash(red), colour_dhash(shrunk)) <= 4
    assert hash_distance(colour_dhash(red), colour_dhash(blue)) > 12


def test_cli_prints_the_report_and_fails_on_errors(messy, capsys):
    assert dataset_main(["check", str(messy), "--resolution", "64"]) == 1
    out = capsys.readouterr().out
    assert "corrupt.png" in out and "near_dup_of_good_1.jpg" in out and "sky" in out
    assert dataset_main(["check", str(messy), "--resolution", "64", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DatasetError, match="no such folder"):
        check_dataset(tmp_path / "nope")
    assert dataset_main(["check", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_an_empty_or_unreadable_folder_is_an_error_not_zero_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    report = check_dataset(empty, resolution=64)
    assert not report.ok and [p.kind for p in report.problems] == ["no_images"]
    assert "no png, jpg or webp images" in report.problems[0].detail
    assert dataset_main(["check", str(empty)]) == 1
    assert "no_images" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    kinds = {p.kind for p in check_dataset(broken).problems}
    assert kinds == {"corrupt", "no_images"}
    assert "1 image file(s), none readable" in check_dataset(broken).problems[0].detail


def test_check_json_into_a_reader_that_stops_early_ends_without_a_traceback(messy):
    """`dataset check --json | head`: the reader goes away; the tool must end quietly (exit 1: errors found)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already gone when the report is printed
    proc = subprocess.run([sys.executable, "-m", "lora_core.dataset", "check", str(messy), "--json"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
