"""Uploads dropped on the tab land in one dataset folder with plain names; zips cannot escape or overwrite."""
from __future__ import annotations

import zipfile

import pytest

from lora_daemon.ui.datasets import DatasetPathError, confined, dataset_folder, list_images, safe_name, save_uploads


def test_zip_with_parent_paths_is_unpacked_flat_inside_the_dataset(tmp_path):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../evil.png", b"png-bytes")
        zf.writestr("cats/cat 1.jpg", b"jpg-bytes")
        zf.writestr("cats/cat 1.txt", "a cat")
        zf.writestr("run.sh", "rm -rf /")
    folder = dataset_folder(tmp_path / "datasets", "my cats")
    report = save_uploads([archive], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["cat 1.jpg", "cat 1.txt", "evil.png"]
    assert not (tmp_path / "evil.png").exists()
    assert report.skipped == ["run.sh: not an image or caption file"]


def test_uploading_the_same_name_twice_keeps_both_files(tmp_path):
    from PIL import Image

    src = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(src)
    first = src.read_bytes()
    folder = dataset_folder(tmp_path / "datasets", "set")
    save_uploads([src], folder)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(src)
    second = src.read_bytes()
    report = save_uploads([src], folder)
    assert report.saved == ["a_2.png"] and first != second
    assert (folder / "a.png").read_bytes() == first and (folder / "a_2.png").read_bytes() == second
    assert [p.name for p in list_images(folder)] == ["a.png", "a_2.png"]


def test_dataset_names_cannot_leave_the_datasets_folder(tmp_path):
    assert dataset_folder(tmp_path, "../../etc").parent == tmp_path.resolve()
    assert safe_name("..\\..\\x:y?.png") == "x_y_.png"
    with pytest.raises(DatasetPathError, match="outside"):
        confined(tmp_path, "..", "elsewhere")


def test_an_image_cut_short_by_an_unfinished_upload_is_not_saved(tmp_path):
    from PIL import Image

    from lora_daemon.ui.datasets import save_uploads

    for name, fmt in (("whole.png", "PNG"), ("whole.jpg", "JPEG"), ("whole.webp", "WEBP")):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / name, fmt)
        cut = tmp_path / name.replace("whole", "cut")
        cut.write_bytes((tmp_path / name).read_bytes()[:-40])
    (tmp_path / "empty.png").write_bytes(b"")
    uploads = sorted(p for p in tmp_path.iterdir() if p.is_file())
    report = save_uploads(uploads, tmp_path / "dataset")
    assert sorted(report.saved) == ["whole.jpg", "whole.png", "whole.webp"]
    assert sorted(s.split(":")[0] for s in report.skipped) == ["cut.jpg", "cut.png", "cut.webp", "empty.png"]
    assert all("incomplete image (still uploading?)" in s for s in report.skipped)
