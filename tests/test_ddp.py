"""Multi-process training: the same entry point under `accelerate launch` with two CPU processes (gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lora_core.events import read_events


@pytest.mark.slow
def test_two_cpu_processes_train_the_tiny_model_into_one_kohya_file(tiny_sd, tiny_data, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({"train_data_dir": str(tiny_data), "base_model": str(tiny_sd),
                                      "output_dir": str(tmp_path / "out"), "resolution": 64, "lora_rank": 4,
                                      "batch_size": 1, "max_train_steps": 4, "learning_rate": 1e-3}))
    events = tmp_path / "events.jsonl"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "lora_core.train", "--config", str(config), "--events", str(events),
        "--no-progress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = next(e for e in read_events(events) if e["type"] == "start")
    assert start["num_processes"] == 2
    steps = [e["step"] for e in read_events(events) if e["type"] == "step"]
    assert steps == [1, 2, 3, 4], "only the main process reports, once per optimizer step"
    output = Path(proc.stdout.strip().splitlines()[-1])
    assert output == tmp_path / "out" / "out.safetensors"
    state = load_file(str(output))
    assert state and all(k.startswith("lora_unet_") for k in state)
