"""kill -9 inside publishing: a real daemon kills itself at each point (LORA_DAEMON_FAULT_PUBLISH), a fresh one
finishes the publication — exactly one complete LoRA and its sidecar, no .part, no _v2, no orphan card.

``LORA_TEST_PUBLISH_ROUNDS`` (default 1) repeats each point that many times with a new run each round.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from daemon_fixtures import daemon_factory, run_config, wait_until  # noqa: F401  (fixtures)
from lora_daemon.publish import FAULT_ENV, FAULT_POINTS

pytestmark = pytest.mark.slow
ROUNDS = int(os.environ.get("LORA_TEST_PUBLISH_ROUNDS", "1"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_of(lora: Path, stem: str) -> list[str]:
    """Every entry in the Lora folder that belongs to this name: final files, versions, hidden temporaries."""
    return sorted(p.name for p in lora.iterdir() if p.name.lstrip(".").startswith((f"{stem}.", f"{stem}_v")))


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_daemon_killed_inside_publishing_leaves_one_complete_lora_after_restart(daemon_factory, tiny_sd,
                                                                                 tiny_data, monkeypatch, point):
    for round_no in range(1, ROUNDS + 1):
        name = f"{point.replace('-', '_')}_{round_no}"
        monkeypatch.setenv(FAULT_ENV, point)
        doomed = daemon_factory()
        monkeypatch.delenv(FAULT_ENV)
        run = doomed.client().submit(run_config(tiny_sd, tiny_data, name, steps=4))
        wait_until(lambda: doomed.proc.poll() is not None, 240, 0.2, f"the daemon to kill itself at {point}")
        assert doomed.proc.returncode == -9, doomed.log_text()[-2000:]
        lora = doomed.lora_dir
        left = files_of(lora, name)
        # what the kill left behind, as the issue found it: proof the fault hit where it should
        assert f"{name}.json" in left, left
        weights, parts = f"{name}.safetensors" in left, [n for n in left if n.endswith(".part")]
        if point == "after-sidecar":
            assert not weights and not parts, left
        elif point == "mid-copy":
            assert not weights and parts == [f".{name}.safetensors.{run['id']}.part"], left
        else:
            assert weights and not parts, left

        survivor = daemon_factory()
        client = survivor.client()
        done = wait_until(lambda: (r := client.get(run["id"]))["status"] in ("finished", "failed") and r, 120, 0.2,
                          "the restarted daemon to settle the run")
        assert done["status"] == "finished", (done["error"], survivor.log_text()[-3000:])
        assert done["attempts"] == 1, "trained once: the restart finished the publication, it did not train again"
        assert done["published_file"] == str(lora / f"{name}.safetensors")
        card = [f"{name}.png"] if done.get("preview_file") else []  # the last sample, when the run made one
        assert files_of(lora, name) == sorted([f"{name}.json", f"{name}.safetensors", *card])
        assert digest(lora / f"{name}.safetensors") == digest(Path(done["output_file"]))
        assert "pending" not in (done.get("publish") or {})
        published = [e for e in client.run_events(run["id"], last=100) if e["type"] == "lora.published"]
        assert len(published) == 1 and published[0]["path"] == done["published_file"]
        survivor.stop()
