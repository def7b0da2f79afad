"""`python -m lora_core.dataset captions …`: the tab's caption tools at the command line, with --dry-run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dataset_fixtures import snapshot, textured_image, write_caption
from lora_core.dataset.cli import main as dataset_main


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    for i, caption in enumerate(["red, circle, red", "blue, Circle, solo", "green, square"]):
        textured_image(i).save(root / f"{i}.png")
        write_caption(root / f"{i}.png", caption)
    textured_image(9).save(root / "no_caption.png")
    return root


def captions(root) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(root.glob("*.txt"))}


def test_every_edit_shows_its_changes_and_dry_run_writes_nothing(folder, capsys):
    before = snapshot(folder)
    assert dataset_main(["captions", "add-tags", str(folder), "shape, red", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0.png: 'red, circle, red' → 'red, circle, red, shape'" in out
    assert "3 caption(s) would change (dry run: nothing written)" in out
    assert "1 images have no caption and were left alone" in out
    assert snapshot(folder) == before

    assert dataset_main(["captions", "trigger", str(folder), "sks"]) == 0
    assert dataset_main(["captions", "dedupe", str(folder)]) == 0
    assert dataset_main(["captions", "remove-tags", str(folder), "SOLO"]) == 0
    assert dataset_main(["captions", "replace", str(folder), "circle", "ring"]) == 0
    assert captions(folder) == {"0": "sks, red, ring", "1": "sks, blue, Circle", "2": "sks, green, square"}
    assert dataset_main(["captions", "replace", str(folder), "(?i)circle", "ring", "--regex"]) == 0
    assert dataset_main(["captions", "sort", str(folder), "--keep", "1"]) == 0
    assert captions(folder) == {"0": "sks, ring, red", "1": "sks, ring, blue", "2": "sks, green, square"}
    assert dataset_main(["captions", "trigger", str(folder), "sks", "--remove"]) == 0
    assert captions(folder)["2"] == "green, square"
    assert not (folder / "no_caption.txt").exists()


def test_stats_json_and_clear_errors(folder, capsys):
    assert dataset_main(["captions", "stats", str(folder), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["images"], stats["captioned"], stats["sources"]) == (4, 3, {"txt": 3})
    assert stats["tag_frequency"]["circle"] == 2 and stats["tags_per_caption"] == pytest.approx(8 / 3)
    assert dataset_main(["captions", "replace", str(folder), "(", "x", "--regex"]) == 2
    assert "find: not a valid regular expression" in capsys.readouterr().err
    assert dataset_main(["captions", "dedupe", str(folder / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_module_prints_its_help():
    done = subprocess.run([sys.executable, "-m", "lora_core.dataset", "captions", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0
    for action in ("stats", "add-tags", "remove-tags", "replace", "trigger", "sort", "dedupe", "merge"):
        assert action in done.stdout
