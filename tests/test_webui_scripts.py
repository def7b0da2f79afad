"""scripts/ loaded the way A1111/Forge load it, under gradio 3.41.2 (A1111) and 4.40.0 (Forge)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from prepare_webui_envs import ENVS, require

ROOT = Path(__file__).resolve().parent.parent
LOADER = ROOT / "tests" / "webui_stub" / "load_like_webui.py"


def load_like_webui(env_name: str, tmp_path: Path, *extra: str) -> dict:
    python = require(env_name)
    (tmp_path / "webui" / "models" / "Stable-diffusion").mkdir(parents=True)
    (tmp_path / "webui" / "models" / "Stable-diffusion" / "base.safetensors").write_bytes(b"")
    env = {**os.environ, "WEBUI_STUB_ROOT": str(tmp_path / "webui"), "LORA_DAEMON_HOME": str(tmp_path / "home"),
           "PYTHONPATH": ""}
    proc = subprocess.run([str(python), str(LOADER), str(ROOT), *extra], capture_output=True, text=True, env=env,
                          timeout=240, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


@pytest.mark.parametrize("env_name", list(ENVS))
def test_tab_settings_routes_and_one_watcher_register_and_survive_a_reload(env_name, tmp_path):
    report = load_like_webui(env_name, tmp_path)
    for load in report["loads"]:
        assert load["tabs"] == [["LoRA Training", "lora_scripts"]]
        assert not load["error_html"]
        assert {"lora_scripts_home", "lora_scripts_endpoint", "lora_scripts_autostart", "lora_scripts_default_preset",
                "lora_scripts_lora_dir"} <= set(load["settings"])
        assert {"/lora-scripts/v1/status", "/lora-scripts/v1/runs", "/lora-scripts/v1/runs/{run_id}",
                "/lora-scripts/v1/runs/{run_id}/{action}", "/lora-scripts/v1/runs/{run_id}/log",
                "/lora-scripts/v1/runs/{run_id}/metrics", "/lora-scripts/v1/live"} <= set(load["routes"])
        assert load["watchers"] == 1
        # Refresh (and the page load, the same handler) rescans the folders: a model added after start is offered
        assert load["refreshed_models"]["handlers"] == 2
    first, second = (load["refreshed_models"]["choices"] for load in report["loads"])
    assert first == ["added_0.safetensors [0000000000]", "base.safetensors [0000000000]"]
    assert second == ["added_0.safetensors [0000000000]", "added_1.safetensors [0000000000]",
                      "base.safetensors [0000000000]"]
    for load in report["loads"]:
        assert load["run_kinds"] == ["Image LoRA", "Text LoRA (language model)"]
        assert {"base_model", "train_data_file", "text_format", "lora_rank", "max_seq_length", "target_modules",
                "sample_prompts"} <= set(load["text_fields"])
    assert report["watchers_after_unload"] == 0
    assert report["heavy_modules"] == []


def test_a_missing_pyzmq_shows_a_tab_that_says_how_to_fix_it(tmp_path):
    report = load_like_webui(".venv-gradio3", tmp_path, "--block", "zmq")
    load = report["loads"][0]
    assert load["tabs"] == [["LoRA Training", "lora_scripts"]]
    assert "pip install pyzmq" in load["error_html"][0]
    assert load["watchers"] == 0 and load["routes"] == []
