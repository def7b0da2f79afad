"""What the tab prints for the engine's plan and the daemon's check report, with user text escaped."""
from __future__ import annotations

from lora_daemon.ui.render import check_report, count_tags, vram_plan


def test_vram_plan_says_whether_it_fits_and_what_to_change():
    plan = {"device": "cuda:0", "capacity_mb": 8000.0, "estimate_mb": 9500.0, "fits": False,
            "suggestion": {"training.batch_size": 1, "training.gradient_checkpointing": True}}
    html = vram_plan(plan)
    assert "9,500 MB of 7,200 MB usable on cuda:0 (does NOT fit)" in html
    assert "suggested: batch_size=1, gradient_checkpointing=True" in html and "lora-scripts-error" in html


def test_check_report_names_each_bad_file_and_escapes_it():
    report = {"ok": False, "summary": {"readable_images": 3, "captioned": 2, "errors": 1, "warnings": 0},
              "problems": [{"severity": "error", "file": "<b>x.png", "kind": "corrupt", "detail": "cannot open"}]}
    html = check_report(report)
    assert "3 readable images, 2 captioned, 1 errors" in html
    assert "&lt;b&gt;x.png" in html and "<b>x.png" not in html


def test_tags_are_counted_once_per_image():
    entries = [{"caption": "red, circle, red"}, {"caption": "Red, square"}, {"caption": None}]
    assert count_tags(entries) == {"red": 2, "circle": 1, "square": 1}
