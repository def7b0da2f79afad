"""Auto-label (caption) jobs queued like training runs, in real child processes (text runs: test_text_daemon.py)."""
from __future__ import annotations

import pytest

from daemon_fixtures import daemon, daemon_factory, wait_until  # noqa: F401  (fixtures)
from dataset_fixtures import colour_folder, make_tagger_dir
from lora_core.dataset.scan import read_metadata_csv

pytestmark = pytest.mark.slow


def finished(client, run_id: str) -> dict:
    wait_until(lambda: client.get(run_id)["status"] in ("finished", "failed", "cancelled"), 300, 0.3, run_id)
    return client.get(run_id)


def test_a_caption_job_labels_the_folder_in_a_child_and_a_missing_model_fails_clearly(daemon, tmp_path):
    client = daemon.client()
    folder = colour_folder(tmp_path / "colours")
    tagger = make_tagger_dir(tmp_path / "wd14")
    with client.subscribe(("run.",)) as events:
        job = client.caption(str(folder), captioner="wd14", model=str(tagger), device="cpu", prefix="sks",
                             batch_size=1)
        assert job["kind"] == "caption" and job["status"] == "queued"
        done = finished(client, job["id"])
        progress = []
        while (event := events.next(timeout=2.0)) is not None:
            if event["type"] == "run.progress" and event["run_id"] == job["id"]:
                progress.append((event["step"], event["total_steps"]))
    assert done["status"] == "finished", done["error"]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert (done["step"], done["total_steps"]) == (3, 3) and done["it_s"] > 0
    assert read_metadata_csv(folder / "metadata.csv")["red.png"].startswith("sks, red theme")

    missing = client.caption(str(folder), captioner="wd14", model=str(tmp_path / "no-model"))
    failed = finished(client, missing["id"])
    assert failed["status"] == "failed" and "lora-label:" in failed["error"] and "no-model" in failed["error"]

