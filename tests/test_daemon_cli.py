"""`lora-daemon` as a user types it: start detached, submit and wait, inspect, stop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_daemon.home import read_info

ROOT = Path(__file__).resolve().parents[1]


def cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=str(ROOT))


@pytest.mark.slow
def test_start_submit_wait_show_and_stop_from_the_command_line(tmp_path, tiny_sd, tiny_data):
    home, lora = tmp_path / "home with spaces", tmp_path / "Lora"
    started = cli(home, "start", "--gpus", "cpu", "--lora-dir", str(lora))
    assert started.returncode == 0, started.stderr
    info = read_info(home)
    assert f"pid {info['pid']}" in started.stdout and info["endpoint"] in started.stdout
    try:
        assert cli(home, "start").returncode == 1  # one daemon per home
        config = tmp_path / "cfg" / "my.yaml"
        config.parent.mkdir()
        config.write_text(yaml.safe_dump({"base_model": str(tiny_sd), "train_data_dir": os.path.relpath(tiny_data,
                                          config.parent), "resolution": 64, "max_train_steps": 4,
                                          "output_dir": "out/cli_lora", "lora_rank": 4}))
        done = cli(home, "submit", str(config), "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        run_id = done.stdout.splitlines()[0]
        assert "step 4/4" in done.stdout and str(lora / "cli_lora.safetensors") in done.stdout

        shown = json.loads(cli(home, "show", run_id[:15], "--json").stdout)
        assert shown["status"] == "finished" and shown["name"] == "cli_lora"
        listed = json.loads(cli(home, "list", "--json").stdout)
        assert [r["id"] for r in listed] == [run_id]
        status = json.loads(cli(home, "status", "--json").stdout)
        assert status["queue_length"] == 0 and status["gpus"][0]["run_id"] is None
        assert cli(home, "logs", run_id).returncode == 0

        config.write_text("base_model: /nowhere\nresolution: 63\n")
        refused = cli(home, "submit", str(config))
        assert refused.returncode == 2
        assert "data.resolution: must be a multiple of 8 between 64 and 4096, got 63 (line 2)" in refused.stderr
        assert "model.base_model: no such file or folder" in refused.stderr
    finally:
        stopped = cli(home, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert cli(home, "status").stderr.strip() == "lora-daemon: daemon not running — start it with `lora-daemon start`"
