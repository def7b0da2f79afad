"""End to end: a real daemon trains the tiny SD model in real `python -m lora_core.train` children.

Each story is what a user does: queue runs, kill things, cancel things, and find the LoRAs in the Lora folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import pytest

from daemon_fixtures import daemon, daemon_factory, run_config, wait_until  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def collect_events(client, sink: list, stop: threading.Event) -> threading.Thread:
    sub = client.subscribe()

    def pump():
        while not stop.is_set():
            event = sub.next(0.2)
            if event is not None:
                sink.append(event)
        sub.close()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def status_of(client, run_id: str) -> str:
    return client.get(run_id)["status"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_three_runs_train_by_priority_stream_in_order_and_publish_without_overwriting(daemon, tiny_sd, tiny_data):
    client = daemon.client()
    events: list[dict] = []
    stop = threading.Event()
    pump = collect_events(client, events, stop)
    first = client.submit(run_config(tiny_sd, tiny_data, "alpha"), name="alpha")  # --name names the run and its file
    wait_until(lambda: status_of(client, first["id"]) == "running", 60, what="first run to start")
    same_name = client.submit(run_config(tiny_sd, tiny_data, "alpha"), name="alpha")
    urgent = client.submit(run_config(tiny_sd, tiny_data, "gamma", sample__sample_prompts=["a red circle"],
                                      sample__sample_every_n_steps=3, sample__sample_steps=2), priority=5)
    assert [r["id"] for r in client.list_runs() if r["status"] == "queued"] == [urgent["id"], same_name["id"]]

    ids = [first["id"], urgent["id"], same_name["id"]]
    wait_until(lambda: all(status_of(client, i) in ("finished", "failed") for i in ids), 300, 0.5, "all three runs")
    stop.set()
    pump.join(5)
    runs = {i: client.get(i) for i in ids}
    assert [runs[i]["status"] for i in ids] == ["finished"] * 3, [runs[i]["error"] for i in ids]
    assert sorted(ids, key=lambda i: runs[i]["started_at"]) == ids  # alpha, then gamma (priority 5), then alpha #2

    lora = daemon.lora_dir
    assert runs[first["id"]]["published_file"] == str(lora / "alpha.safetensors")
    assert runs[same_name["id"]]["published_file"] == str(lora / "alpha_v2.safetensors")
    assert digest(lora / "alpha.safetensors") == digest(Path(runs[first["id"]]["output_file"]))
    sidecar = json.loads((lora / "gamma.json").read_text())
    assert sidecar["activation text"] == "gamma style" and sidecar["preferred weight"] == 1.0
    assert (lora / "gamma.png").is_file()  # the last sample became the card's preview
    assert not list(lora.glob("*.part")) and not list(lora.glob("*.txt"))

    for run_id in ids:
        mine = [e["type"] for e in events if e.get("run_id") == run_id]
        order = [t for t in mine if t in ("run.queued", "run.started", "run.finished", "lora.published")]
        assert order == ["run.queued", "run.started", "lora.published", "run.finished"], mine
        steps = [e["step"] for e in events if e.get("run_id") == run_id and e["type"] == "run.progress"
                 and not e.get("phase")]  # sampling-phase progress (the card preview) repeats the step it is at
        assert steps == list(range(1, 7))
        assert client.metrics(run_id)[-1]["step"] == 6
    # the shortest prefix no other run shares (runs submitted in the same second share 16 characters)
    prefix = next(urgent["id"][:n] for n in range(17, len(urgent["id"]) + 1)
                  if not any(other.startswith(urgent["id"][:n]) for other in ids if other != urgent["id"]))
    shown = client.get(prefix)
    assert shown["id"] == urgent["id"] and shown["total_steps"] == 6 and shown["loss"] is not None
    assert client.status()["queue_length"] == 0
    assert any("finished" in line or "safetensors" in line for line in client.logs(first["id"]))


def test_killing_the_daemon_mid_run_resumes_from_the_checkpoint_and_keeps_the_queue(daemon_factory, tiny_sd,
                                                                                     tiny_data):
    daemon = daemon_factory()
    client = daemon.client()
    long_run = client.submit(run_config(tiny_sd, tiny_data, "survivor", steps=16, save_steps=2))
    waiting = client.submit(run_config(tiny_sd, tiny_data, "patient", steps=4))
    wait_until(lambda: client.get(long_run["id"])["checkpoint"], 120, 0.2, "a first checkpoint")
    daemon.kill9()

    daemon = daemon_factory()
    client = daemon.client()
    assert status_of(client, waiting["id"]) in ("queued", "running")
    wait_until(lambda: status_of(client, waiting["id"]) in ("finished", "failed"), 300, 0.5, "both runs")
    survivor, patient = client.get(long_run["id"]), client.get(waiting["id"])
    assert survivor["status"] == "finished", survivor["error"]
    assert patient["status"] == "finished", patient["error"]
    assert survivor["attempts"] == 2 and patient["started_at"] > survivor["started_at"]
    starts = [json.loads(line) for line in Path(survivor["run_dir"], "events.jsonl").read_text().splitlines()
              if '"start"' in line]
    assert starts[0]["resumed_from"] is None and starts[-1]["resumed_from"]  # the second life resumed
    assert (daemon.lora_dir / "survivor.safetensors").is_file()


def test_a_killed_child_fails_its_run_with_the_log_tail_and_the_next_run_starts(daemon, tiny_sd, tiny_data):
    client = daemon.client()
    doomed = client.submit(run_config(tiny_sd, tiny_data, "doomed", steps=200))
    cancelled_running = client.submit(run_config(tiny_sd, tiny_data, "stopped", steps=200, save_steps=50))
    never = client.submit(run_config(tiny_sd, tiny_data, "never", steps=4))

    wait_until(lambda: client.get(doomed["id"])["step"] >= 1, 120, 0.2, "the first run to train")
    assert client.cancel(never["id"])["status"] == "cancelled"  # still queued: cancelled without starting
    os.kill(client.get(doomed["id"])["pid"], signal.SIGKILL)
    wait_until(lambda: status_of(client, doomed["id"]) == "failed", 60, 0.2, "the run to fail")
    failed = client.get(doomed["id"])
    assert "killed by signal 9" in failed["error"]
    assert failed["log_tail"] and failed["advice"]

    wait_until(lambda: client.get(cancelled_running["id"])["step"] >= 2, 120, 0.2, "the next run to train")
    assert client.cancel(cancelled_running["id"])["status"] == "cancelling"
    wait_until(lambda: status_of(client, cancelled_running["id"]) == "cancelled", 120, 0.2, "the cancel")
    stopped = client.get(cancelled_running["id"])
    assert stopped["checkpoint"] and Path(stopped["checkpoint"]).is_dir()

    skipped = client.get(never["id"])
    assert skipped["started_at"] is None and not Path(skipped["run_dir"], "events.jsonl").exists()
    assert client.status()["queue_length"] == 0
    assert not (daemon.lora_dir / "never.safetensors").exists()


def test_stopping_the_daemon_checkpoints_the_running_job_and_the_next_start_resumes_it(daemon_factory, tiny_sd,
                                                                                       tiny_data):
    from lora_daemon.store import Store

    daemon = daemon_factory()
    client = daemon.client()
    run = client.submit(run_config(tiny_sd, tiny_data, "paused", steps=200))
    wait_until(lambda: client.get(run["id"])["step"] >= 2, 120, 0.2, "training to start")
    assert client.shutdown()["running"] == [run["id"]]
    assert daemon.proc.wait(120) == 0
    saved = Store(daemon.home / "runs.db").get_run(run["id"])
    assert saved["status"] == "queued" and saved["resume"] == 1 and Path(saved["checkpoint"]).is_dir()

    daemon = daemon_factory()
    client = daemon.client()
    events = Path(saved["run_dir"], "events.jsonl")
    resumed = lambda: (events.read_text().count('"type": "start"') == 2  # noqa: E731
                       and client.get(run["id"])["step"] > saved["step"])
    wait_until(resumed, 120, 0.2, "the resumed run to train")
    starts = [json.loads(line) for line in events.read_text().splitlines() if '"type": "start"' in line]
    assert starts[-1]["resumed_from"] and starts[-1]["step"] >= saved["step"]
    client.cancel(run["id"])
    wait_until(lambda: status_of(client, run["id"]) == "cancelled", 120, 0.2, "the cancel")
