"""Rendering samples never looks like a hang: every prompt and denoising step is an event, the log says how long it
took, and a run that asked for no samples still gets a card preview at the end (training resolution, few steps)."""
from __future__ import annotations

import logging

from PIL import Image

from lora_core.events import EventWriter, read_events
from lora_core.train import run_training


def test_each_prompt_and_denoising_step_is_reported_and_the_log_says_how_long(train_config, tmp_path, caplog):
    events = tmp_path / "events.jsonl"
    cfg = train_config(max_train_steps=2, sample_every_n_steps=2,
                       sample_prompts=["a red circle --w 64 --h 64 --s 3", "a blue square --w 64 --h 64 --s 2"])
    with caplog.at_level(logging.INFO, logger="lora_core.loop"):
        assert run_training(cfg, EventWriter(events), show_progress=False).status == "finished"
    progress = [(e["prompt_index"], e["prompts"], e["denoise_step"], e["denoise_steps"])
                for e in read_events(events) if e["type"] == "sample_progress"]
    assert progress == [(1, 2, 0, 3), (1, 2, 1, 3), (1, 2, 2, 3), (1, 2, 3, 3),
                        (2, 2, 0, 2), (2, 2, 1, 2), (2, 2, 2, 2)]
    assert all(e["step"] == 2 for e in read_events(events) if e["type"] == "sample_progress")
    assert any(r.getMessage().startswith("samples at step 2: 2 image(s) in ") for r in caplog.records)
    assert not (tmp_path / "out" / "samples" / "preview.png").exists()  # it had samples: no extra preview


def test_a_run_without_samples_renders_one_preview_at_the_training_resolution(train_config, tmp_path):
    events = tmp_path / "events.jsonl"
    cfg = train_config(max_train_steps=2, resolution=64, trigger_word="sks")
    assert run_training(cfg, EventWriter(events), show_progress=False).status == "finished"
    kinds = [e["type"] for e in read_events(events)]
    samples = [e for e in read_events(events) if e["type"] == "sample"]
    assert len(samples) == 1 and samples[0]["preview"] is True and samples[0]["prompt"].startswith("sks, ")
    assert kinds.index("sample") < kinds.index("end")  # in place before the daemon publishes the LoRA
    with Image.open(samples[0]["path"]) as im:
        assert im.size == (64, 64)
    steps = {e["denoise_steps"] for e in read_events(events) if e["type"] == "sample_progress"}
    assert steps == {8}
