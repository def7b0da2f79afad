"""Uploads dropped on the tab land in one dataset folder with plain names; zips cannot escape or overwrite."""
from __future__ import annotations

import zipfile

import pytest

from daemon.ui.datasets import DatasetPathError, confined, dataset_folder, list_images, safe_name, save_uploads


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
    src = tmp_path / "a.png"
    src.write_bytes(b"first")
    folder = dataset_folder(tmp_path / "datasets", "set")
    save_uploads([src], folder)
    src.write_bytes(b"second")
    report = save_uploads([src], folder)
    assert report.saved == ["a_2.png"]
    assert (folder / "a.png").read_bytes() == b"first" and (folder / "a_2.png").read_bytes() == b"second"
    assert [p.name for p in list_images(folder)] == ["a.png", "a_2.png"]


def test_dataset_names_cannot_leave_the_datasets_folder(tmp_path):
    assert dataset_folder(tmp_path, "../../etc").parent == tmp_path.resolve()
    assert safe_name("..\\..\\x:y?.png") == "x_y_.png"
    with pytest.raises(DatasetPathError, match="outside"):
        confined(tmp_path, "..", "elsewhere")
