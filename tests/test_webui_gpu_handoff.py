"""The GPU hand-off inside the stub WebUIs (gradio 3.41 for A1111, 4.40 for Forge) against a real daemon training
the tiny model: the WebUI's model leaves the card under the generation lock when the run starts, a generation pauses
the run (it waits "paused for generation"), and the run resumes after the idle delay and finishes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from daemon_fixtures import daemon_factory, run_config  # noqa: F401  (fixtures)
from prepare_webui_envs import ENVS, require

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ROOT / "tests" / "webui_stub" / "generate_like_webui.py"

pytestmark = pytest.mark.slow
FORGE_ENV = ".venv-gradio4"  # Forge runs gradio 4: that stub WebUI plays Forge (backend.memory_management)
UNLOAD = {"a1111": ["unload"], "forge": ["forge.unload_all_models", "forge.soft_empty_cache"]}


def generate_like_webui(env_name: str, tmp_path: Path, home: Path, run_id: str) -> dict:
    python = require(env_name)
    (tmp_path / "webui" / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WEBUI_STUB_ROOT": str(tmp_path / "webui"), "LORA_DAEMON_HOME": str(home),
           "WEBUI_STUB_DEVICE_ID": "cpu", "PYTHONPATH": ""}
    forge = ["--forge"] if env_name == FORGE_ENV else []
    proc = subprocess.run([str(python), str(GENERATE), str(ROOT), run_id, "--idle", "1", *forge], capture_output=True,
                          text=True, env=env, timeout=2000, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("env_name", list(ENVS))
def test_a_generation_pauses_the_run_on_the_webui_gpu_and_it_resumes_after_the_idle_delay(
        env_name, daemon_factory, tiny_sd, tiny_data, tmp_path):
    daemon = daemon_factory()
    client = daemon.client(timeout=60)
    run = client.submit(run_config(tiny_sd, tiny_data, "handoff", steps=12))
    report = generate_like_webui(env_name, tmp_path, daemon.home, run["id"])

    assert report["scripts"] == ["LoRA Training: GPU hand-off"]
    assert report["host"] == ("forge" if env_name == FORGE_ENV else "a1111")
    unload = UNLOAD[report["host"]]
    assert report["settings"] == {"lora_scripts_gpu_handoff": "free the WebUI's VRAM",
                                  "lora_scripts_generate_while_training": "pause the run",
                                  "lora_scripts_resume_idle_s": 1.0}
    # the run started on the WebUI's device: its model left the card, under the generation lock
    assert report["on_gpu_while_training"] is False
    # the generation found the run paused (checkpoint written, child gone) and marked as paused for generation
    assert report["during"]["status"] == "paused" and report["during"]["pause_reason"] == "generation"
    assert report["during"]["pid"] is None and report["during"]["step"] >= report["step_before"]
    # unload (run started) → reload (the generation) → unload (idle: before the run resumes), all under the lock
    assert [c["call"] for c in report["calls"]] == unload + ["reload"] + unload
    assert all(c["locked"] for c in report["calls"]), report["calls"]
    assert report["final"]["status"] == "finished" and report["final"]["step"] == 12
    assert report["on_gpu_after"] is False, "A1111 reloads its model at the next generation by itself"

    record = client.get(run["id"])
    starts = [json.loads(line) for line in Path(record["run_dir"], "events.jsonl").read_text().splitlines()
              if '"type": "start"' in line]
    assert len(starts) == 2 and starts[1]["resumed_from"], "the run resumed from the pause's checkpoint"
    paused = client.run_events(run["id"], types=["run.paused"])
    assert len(paused) == 1 and paused[0]["reason"] == "generation"


ASK = ROOT / "tests" / "webui_stub" / "ask_like_webui.py"


@pytest.mark.parametrize("env_name", list(ENVS))
def test_ask_puts_the_question_in_the_tab_and_the_answer_acts_and_the_model_reloads_on_request(
        env_name, daemon_factory, tiny_sd, tiny_data, tmp_path):
    """Setting "ask": a run starting on the WebUI's GPU puts "Run X wants the GPU: free the WebUI's VRAM now?" in
    the tab's live poll; Keep leaves the model on the card (and that run is not asked again), Free moves it off
    under the generation lock; "Reload the WebUI's model now" (REST route and the Daemon section's button) brings
    it back under the lock."""
    python = require(env_name)
    daemon = daemon_factory()
    client = daemon.client(timeout=60)
    kept = client.submit(run_config(tiny_sd, tiny_data, "kept", steps=100000))
    freed = client.submit(run_config(tiny_sd, tiny_data, "freed", steps=8))
    (tmp_path / "webui" / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WEBUI_STUB_ROOT": str(tmp_path / "webui"), "LORA_DAEMON_HOME": str(daemon.home),
           "WEBUI_STUB_DEVICE_ID": "cpu", "PYTHONPATH": ""}
    forge = ["--forge"] if env_name == FORGE_ENV else []
    proc = subprocess.run([str(python), str(ASK), str(ROOT), kept["id"], freed["id"], *forge], capture_output=True,
                          text=True, env=env, timeout=2000, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(lines[-1][len("REPORT "):])

    host = report["host"]
    assert host == ("forge" if env_name == FORGE_ENV else "a1111")
    assert {"lora_scripts_handoff_host", "lora_scripts_handoff_setting_host",
            "lora_scripts_handoff_reload"} <= set(report["hosts"])
    assert report["reload_handlers"] == 1 and report["reload_visible"] == [True]
    # "ask" frees nothing by itself: the tab asks
    assert report["calls_before_answer"] == []
    asked = report["asked"]
    assert asked["setting"] == "ask" and asked["asked"] == kept["id"] and asked["freed"] is False
    assert asked["asked_name"] == kept["name"]
    assert f"Run {kept['name']} wants the GPU: free the WebUI's VRAM now?" in asked["question_html"]
    assert 'data-handoff="free">Free</button>' in asked["question_html"]
    assert 'data-handoff="keep">Keep</button>' in asked["question_html"]
    assert 'data-setting="ask"' in asked["setting_html"] and "Settings → LoRA Training" in asked["setting_html"]
    # Keep: the model stays, the question goes
    assert report["keep"]["asked"] is None and report["after_keep"]["question_html"] == ""
    assert report["calls_after_keep"] == []
    # the next run is asked again; Free moves the model off the GPU under the generation lock
    assert report["asked_again"]["asked"] == freed["id"]
    unload = UNLOAD[host]
    assert [c["call"] for c in report["calls_after_free"]] == unload
    assert report["free"]["freed"] is True and report["free"]["asked"] is None
    assert 'data-freed="true"' in report["free"]["setting_html"]
    # reload now: the REST route, then the Daemon section's button; A1111 reloads under the lock, Forge loads on
    # demand at the next generation (nothing to call), and both count the model as back
    reloads = ["reload", "reload"] if host == "a1111" else []
    assert [c["call"] for c in report["calls_after_button"]] == unload + reloads
    assert all(c["locked"] for c in report["calls_after_button"]), report["calls_after_button"]
    assert report["reload"]["freed"] is False and "back on its GPU" in report["button"]
    assert report["nonsense"] == 404
    assert report["final"]["status"] == "finished", report["final"]
    assert report["after_end"]["asked"] is None
