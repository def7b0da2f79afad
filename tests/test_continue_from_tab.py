"""Continue from a LoRA through the tab and the CLI, trained by a real daemon.

The tab (gradio 3.41 and 4.40) lists the Lora folder in "Continue from a LoRA"; a pick is sent as the file's full
path, and the daemon's run trains on exactly the layers of that file and publishes a LoRA with the same keys. The
CLI path (`lora-daemon submit FILE --wait` with `model.network_weights`) goes through the same submit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from daemon_fixtures import ROOT, daemon_factory, run_config, wait_until  # noqa: F401  (fixture)
from prepare_webui_envs import ENVS, require
from test_tools import make_lora

PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.import_lora_daemon()
from pathlib import Path
from lora_daemon.ui.context import TabContext, UiSettings
from lora_daemon.ui.forms import FIELDS, TEXT_FIELDS
from lora_daemon.ui.tab import IMAGE_KIND, TrainTab

home, lora_dir, base, data = sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
ctx = TabContext(settings=lambda: UiSettings(home=home), checkpoints=lambda: {"tiny [0]": base},
                 lora_dir=lambda: lora_dir)
tab = TrainTab(ctx)
tab.build()
values = {s.key: s.default for s in FIELDS}
values.update(network_weights="style.safetensors", output_name="continued", resolution=64, max_train_steps=4,
              lora_rank=4, alpha=2, batch_size=1, sample_every_n_steps=0, sample_prompts="")
row = [values[s.key] for s in FIELDS] + [s.default for s in TEXT_FIELDS]
refreshed = tab.refresh_loras(None)
config = tab._build_config(IMAGE_KIND, "tiny [0]", data, "", tuple(row))
status = tab.start(IMAGE_KIND, "tiny [0]", data, "", *row)[-1]
print("REPORT " + json.dumps({"choices": refreshed.get("choices"), "config": config, "status": status}, default=str))
"""


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("env_name", list(ENVS))
def test_a_lora_picked_in_the_tab_is_continued_by_the_daemon(env_name, daemon_factory, tiny_sd, tiny_data, tmp_path):
    python = require(env_name)
    lora_dir = tmp_path / "Lora"
    style = make_lora(lora_dir / "style.safetensors", "sd1", seed=1, text=False)
    daemon = daemon_factory()
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    done = subprocess.run([str(python), str(probe), str(ROOT / "daemon" / "bootstrap.py"), str(daemon.home),
                           str(daemon.lora_dir), str(tiny_sd), str(tiny_data)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    choices = [c[0] if isinstance(c, list) else c for c in report["choices"]]
    assert "style.safetensors" in choices
    assert report["config"]["model"]["network_weights"] == str(lora_dir / "style.safetensors")
    assert "Queued run" in report["status"], report["status"]

    client = daemon.client()
    run = [r for r in client.list_runs(all=True) if r["name"] == "continued"][0]
    wait_until(lambda: client.get(run["id"])["status"] in ("finished", "failed"), 300, 0.5, "the continued run")
    finished = client.get(run["id"])
    assert finished["status"] == "finished", (finished.get("error"), client.logs(run["id"])[-20:])
    assert _keys(Path(finished["published_file"])) == _keys(style)  # the file's layers, nothing else


def test_the_cli_submits_a_run_that_continues_from_a_lora(daemon_factory, tiny_sd, tiny_data, tmp_path):
    lora_dir = tmp_path / "Lora"
    style = make_lora(lora_dir / "style.safetensors", "sd1", seed=1, text=False)
    daemon = daemon_factory()
    config = run_config(tiny_sd, tiny_data, "cli_continued", steps=4)
    config["model"].update(network_weights=str(style), dim_from_weights=True)
    path = tmp_path / "continue.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(daemon.home), "submit", str(path),
                           "--wait"], capture_output=True, text=True, timeout=400, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = [r for r in daemon.client().list_runs(all=True) if r["name"] == "cli_continued"][0]
    assert run["status"] == "finished" and run["config"]["model"]["network_weights"] == str(style)
    assert _keys(Path(run["published_file"])) == _keys(style)
