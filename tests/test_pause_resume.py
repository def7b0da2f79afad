"""Pause and resume through a real daemon: the run pauses at the end of a step (checkpoint written, child gone), waits
holding its device slot across a daemon restart, resumes first in the queue, and ends with the same weights as a run
that was never paused — the exact-resume guarantee of `tests/test_train.py`, reached through a pause."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from daemon_fixtures import ROOT, daemon_factory, run_config, wait_until  # noqa: F401  (fixtures)
from lora_daemon.client import DaemonError

pytestmark = pytest.mark.slow

STEPS = 12


def cli(daemon, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORA_DAEMON_HOME": str(daemon.home)}
    return subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(daemon.home), *args],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=180)


def starts(run: dict) -> list[dict]:
    lines = Path(run["run_dir"], "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"type": "start"' in line]


def step_numbers(run: dict) -> list[int]:
    lines = Path(run["run_dir"], "events.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"type": "step"' in line]


def test_a_paused_and_resumed_run_gives_the_weights_of_an_uninterrupted_one(daemon_factory, tiny_sd, tiny_data):
    daemon = daemon_factory()
    client = daemon.client(timeout=60)
    # one name for both: the name is also the trigger word in the captions, so it must not differ between them
    straight = client.submit(run_config(tiny_sd, tiny_data, "same", steps=STEPS))
    wait_until(lambda: client.get(straight["id"])["status"] == "finished", 900, 0.2, "the straight run")

    run = client.submit(run_config(tiny_sd, tiny_data, "same", steps=STEPS))
    wait_until(lambda: (client.get(run["id"])["step"] or 0) >= 3, 600, 0.05, "training to reach step 3")
    with pytest.raises(DaemonError) as refused:  # nothing to resume yet
        client.resume(straight["id"])
    assert refused.value.code == "invalid_state"
    done = cli(daemon, "pause", run["id"])  # the CLI, as a user types it
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in (f"{run['id']}: pausing", f"{run['id']}: paused")
    paused = wait_until(lambda: (r := client.get(run["id"]))["status"] == "paused" and r, 600, 0.1, "the pause")
    assert paused["pause_reason"] == "user" and paused["pid"] is None
    assert Path(paused["checkpoint"]).is_dir(), "a pause writes a checkpoint"
    k = paused["step"]
    assert 3 <= k < STEPS
    assert "paused for user" in cli(daemon, "list").stdout

    # queued behind the paused run: it must not take the paused run's device slot, and runs after it on resume
    later = client.submit(run_config(tiny_sd, tiny_data, "later", steps=2), priority=5)

    daemon.stop()  # a paused run survives a daemon restart: it is a row in runs.db, not a process
    daemon = daemon_factory()
    client = daemon.client(timeout=60)
    assert client.get(run["id"])["status"] == "paused"
    assert client.get(later["id"])["status"] == "queued"

    assert client.resume(run["id"])["status"] in ("queued", "running")
    wait_until(lambda: client.get(run["id"])["status"] == "finished", 900, 0.2, "the resumed run")
    wait_until(lambda: client.get(later["id"])["status"] == "finished", 900, 0.2, "the run queued behind it")
    resumed, after = client.get(run["id"]), client.get(later["id"])
    assert after["started_at"] > resumed["started_at"], "the resumed run goes first, before a higher priority"

    lives = starts(resumed)
    assert len(lives) == 2 and lives[0]["resumed_from"] is None and lives[1]["resumed_from"]
    assert lives[1]["step"] == k, "the second life starts where the pause saved"
    assert step_numbers(resumed) == list(range(1, STEPS + 1)), "no step lost or repeated across the pause"

    a = load_file(client.get(straight["id"])["published_file"])
    b = load_file(resumed["published_file"])
    assert a.keys() == b.keys()
    assert max((a[key] - b[key]).abs().max().item() for key in a) < 1e-6


def test_pause_is_refused_for_runs_that_do_not_run_and_cancel_ends_a_paused_run(daemon_factory, tiny_sd, tiny_data):
    daemon = daemon_factory()
    client = daemon.client(timeout=60)
    run = client.submit(run_config(tiny_sd, tiny_data, "cancelme", steps=STEPS))
    queued = client.submit(run_config(tiny_sd, tiny_data, "waiting", steps=2))
    with pytest.raises(DaemonError) as refused:
        client.pause(queued["id"])
    assert refused.value.code == "invalid_state" and "only a running run pauses" in str(refused.value)
    with pytest.raises(DaemonError) as bad:
        client.pause(run["id"], reason="not a word!")
    assert bad.value.code == "bad_request" and "reason" in str(bad.value)

    wait_until(lambda: (client.get(run["id"])["step"] or 0) >= 1, 600, 0.05, "training to start")
    assert client.pause(run["id"], reason="generation")["status"] in ("pausing", "paused")
    assert client.pause(run["id"], reason="generation")["status"] in ("pausing", "paused")  # twice: no harm
    wait_until(lambda: client.get(run["id"])["status"] == "paused", 600, 0.1, "the pause")
    assert client.get(run["id"])["pause_reason"] == "generation"
    assert client.get(queued["id"])["status"] == "queued", "the paused run holds its slot"

    cancelled = client.cancel(run["id"])
    assert cancelled["status"] == "cancelled" and Path(cancelled["checkpoint"]).is_dir()
    wait_until(lambda: client.get(queued["id"])["status"] == "finished", 900, 0.2, "the slot to be used again")


def test_the_memory_plan_counts_the_vram_the_webui_frees_but_never_more_than_is_used(train_config):
    from lora_core.plan import webui_freed_mb

    cfg = train_config(webui_vram_mb=6000)
    assert webui_freed_mb(cfg, free_mb=4000, total_mb=12000) == 6000  # a 12 GB card, SDXL checkpoint in the WebUI
    assert webui_freed_mb(cfg, free_mb=10000, total_mb=12000) == 2000  # the WebUI already let some of it go
    assert webui_freed_mb(train_config(), free_mb=4000, total_mb=12000) == 0
    assert webui_freed_mb(train_config(webui_vram_mb=6000, memory_budget_mb=5000), 4000, 12000) == 0


def test_a_pause_while_the_child_is_still_starting_pauses_instead_of_failing(daemon_factory, tiny_sd, tiny_data):
    daemon = daemon_factory()
    client = daemon.client(timeout=60)
    run = client.submit(run_config(tiny_sd, tiny_data, "early", steps=STEPS))
    wait_until(lambda: client.get(run["id"])["status"] == "running", 600, 0.02, "the child to be spawned")
    client.pause(run["id"])  # the child may not have its signal handler yet: SIGTERM ends it at once
    paused = wait_until(lambda: (r := client.get(run["id"]))["status"] not in ("running", "pausing") and r, 600,
                        0.1, "the pause")
    assert paused["status"] == "paused", paused.get("error")
    assert client.resume(run["id"])["status"] in ("queued", "running")
    wait_until(lambda: client.get(run["id"])["status"] == "finished", 900, 0.2, "the run after an early pause")
    assert client.get(run["id"])["step"] == STEPS
