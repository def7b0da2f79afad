"""The Runs section of a text run shows the latest completion per sample prompt, read from the run's own folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_daemon.ui.completions import MAX_CHARS, latest_completions
from daemon_fixtures import daemon, daemon_factory, wait_until  # noqa: F401  (fixtures)
from lora_core.text.tiny import write_tiny_instruction_set
from test_text_daemon import text_run_config
from text_fixtures import tiny_llama  # noqa: F401  (fixture)


def write_events(run_dir: Path, events: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"type": "sam',
                                          encoding="utf-8")


@pytest.mark.slow
def test_a_text_run_on_the_daemon_shows_its_latest_completion_per_prompt(daemon, tiny_llama, tmp_path):
    client = daemon.client()
    config = text_run_config(tiny_llama, write_tiny_instruction_set(tmp_path / "d.jsonl"), "sky")
    config["sample"]["sample_prompts"] = ["What colour is the sky?", "Name a <b>fruit</b>."]
    run = client.submit(config)
    wait_until(lambda: client.get(run["id"])["status"] in ("finished", "failed", "cancelled"), 300, 0.5,
               "the text run to end")
    done = client.get(run["id"])
    assert done["status"] == "finished", (done.get("error"), client.logs(run["id"])[-20:])

    completions = latest_completions(Path(done["run_dir"]))
    assert [c["prompt"] for c in completions] == ["What colour is the sky?", "Name a <b>fruit</b>."]
    for c in completions:
        assert c["step"] == 6 and c["file"].startswith("output/samples/step-00000006-")
        assert c["text"] == (Path(done["run_dir"]) / c["file"]).read_text(encoding="utf-8").rstrip("\n")


def test_completion_files_outside_the_run_folder_are_not_read_and_long_ones_are_cut(tmp_path):
    run_dir = tmp_path / "run"
    samples = run_dir / "output" / "samples"
    samples.mkdir(parents=True)
    (samples / "step-00000002-00.txt").write_text("early\n", encoding="utf-8")
    (samples / "step-00000004-00.txt").write_text("x" * (MAX_CHARS + 50), encoding="utf-8")
    (tmp_path / "secret.txt").write_text("do not show", encoding="utf-8")
    write_events(run_dir, [
        {"type": "step", "step": 1, "loss": 1.0},
        {"type": "sample", "step": 2, "prompt": "p", "path": str(samples / "step-00000002-00.txt")},
        {"type": "sample", "step": 2, "prompt": "leak", "path": str(tmp_path / "secret.txt")},
        {"type": "sample", "step": 2, "prompt": "climb", "path": "output/../../secret.txt"},
        {"type": "sample", "step": 4, "prompt": "p", "path": "output/samples/step-00000004-00.txt"},
    ])
    [only] = latest_completions(run_dir)
    assert only["prompt"] == "p" and only["step"] == 4 and only["truncated"] and len(only["text"]) == MAX_CHARS


def test_a_run_without_events_has_no_completions(tmp_path):
    assert latest_completions(tmp_path) == []
