"""The LoRA toolbox through a real daemon: jobs queued and run in a child with progress, files confined to the
daemon's Lora / checkpoint / home folders, and `lora-daemon tools` on the command line."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from daemon_fixtures import ROOT, daemon_factory  # noqa: F401  (fixture)
from lora_daemon.client import DaemonError
from test_tools import make_lora


def _wait(client, run_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(run_id)
        if run["status"] in ("finished", "failed", "cancelled"):
            return run
        time.sleep(0.2)
    raise TimeoutError(run)


@pytest.fixture
def tool_daemon(daemon_factory, tmp_path):
    checkpoints = tmp_path / "Stable-diffusion"
    checkpoints.mkdir()
    (tmp_path / "Lora").mkdir()
    return daemon_factory("--checkpoint-dir", str(checkpoints))


def test_a_merge_job_runs_in_the_daemon_with_progress_and_lands_in_the_lora_folder(tool_daemon, tmp_path):
    lora_dir = tmp_path / "Lora"
    make_lora(lora_dir / "style.safetensors", "sd1", seed=1, text=False)
    make_lora(lora_dir / "character.safetensors", "sd1", seed=2, text=False)
    client = tool_daemon.client()
    assert client.status()["checkpoint_dir"] == str((tmp_path / "Stable-diffusion").resolve())
    info = client.tools_inspect("style.safetensors")
    assert info["family"] == "sd1" and info["rank"] == 4
    job = client.tools("merge", loras=[{"path": "style.safetensors", "weight": 0.6},
                                       {"path": "character.safetensors", "weight": 1.0}], out="combined")
    assert job["kind"] == "tools" and job["status"] == "queued"
    run = _wait(client, job["id"])
    assert run["status"] == "finished", (run.get("error"), client.logs(job["id"]))
    out = lora_dir / "combined.safetensors"
    assert run["output_file"] == str(out) and out.is_file()
    assert run["total_steps"] and run["step"] == run["total_steps"]
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["lora_tools.merged_from"])[0]["weight"] == 0.6
    again = client.tools("merge", loras=[{"path": "style.safetensors"}], out="combined.safetensors", force=True)
    assert _wait(client, again["id"])["status"] == "finished"


def test_tool_requests_are_confined_to_the_daemons_folders_and_checked(tool_daemon, tmp_path):
    lora_dir = tmp_path / "Lora"
    make_lora(lora_dir / "style.safetensors", "sd1", seed=1, text=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    make_lora(outside / "x.safetensors", "sd1", seed=1, text=False)
    client = tool_daemon.client()
    before = len(client.list_runs(all=True))
    cases = [
        ({"loras": [{"path": str(outside / "x.safetensors")}], "out": "m"}, "outside the daemon's folders"),
        ({"loras": [{"path": "style.safetensors"}], "out": "../../escape"}, "outside the daemon's folders"),
        ({"loras": [{"path": "style.safetensors"}], "out": str(outside / "m.safetensors")}, "outside"),
        ({"loras": [{"path": "gone.safetensors"}], "out": "m"}, "no such file"),
        ({"loras": [{"path": "style.safetensors", "weight": "1; rm -rf /"}], "out": "m"}, "weight: must be"),
        ({"loras": [{"path": "style.safetensors"}], "out": "style"}, "already exists"),
        ({"loras": [{"path": "style.safetensors"}], "out": "m", "precision": "fp8"}, "precision"),
    ]
    for args, message in cases:
        with pytest.raises(DaemonError, match=message):
            client.tools("merge", **args)
    with pytest.raises(DaemonError, match="command: one of"):
        client.tools("rm", out="m")
    with pytest.raises(DaemonError, match="outside"):
        client.tools_inspect(str(outside / "x.safetensors"))
    assert len(client.list_runs(all=True)) == before and not list(lora_dir.glob("m*"))


def test_a_job_the_engine_refuses_fails_with_its_named_error(tool_daemon, tmp_path):
    make_lora(tmp_path / "Lora" / "sd1.safetensors", "sd1", seed=1, text=False)
    make_lora(tmp_path / "Lora" / "xl.safetensors", "sdxl", seed=1, text=False)
    client = tool_daemon.client()
    job = client.tools("merge", loras=[{"path": "sd1.safetensors"}, {"path": "xl.safetensors"}], out="mixed")
    run = _wait(client, job["id"])
    assert run["status"] == "failed" and "different model families" in run["error"]
    assert not (tmp_path / "Lora" / "mixed.safetensors").exists()


def test_lora_daemon_tools_cli_runs_a_bake_and_waits(tool_daemon, tmp_path):
    from lora_core.tiny import build_tiny_sd

    base = build_tiny_sd(tmp_path / "Stable-diffusion", single_file=True)
    make_lora(tmp_path / "Lora" / "style.safetensors", "sd1", seed=3)
    cmd = [sys.executable, "-m", "lora_daemon.cli", "--home", str(tool_daemon.home), "tools"]
    done = subprocess.run(cmd + ["bake", base.name, "style.safetensors:0.5", "--out", "baked", "--wait"],
                          capture_output=True, text=True, timeout=300, cwd=str(ROOT / "tests"))
    assert done.returncode == 0, done.stdout + done.stderr
    baked = tmp_path / "Stable-diffusion" / "baked.safetensors"
    assert baked.is_file() and f"finished: {baked}" in done.stdout
    shown = subprocess.run(cmd + ["inspect", "style.safetensors", "--json"], capture_output=True, text=True,
                           timeout=120)
    assert json.loads(shown.stdout)["family"] == "sd1"


def test_cancelling_a_running_bake_leaves_no_file_behind(tool_daemon, tmp_path):
    from lora_core.tiny import build_tiny_sd

    checkpoints = tmp_path / "Stable-diffusion"
    base = build_tiny_sd(checkpoints, single_file=True)
    make_lora(tmp_path / "Lora" / "style.safetensors", "sd1", seed=3)
    client = tool_daemon.client()
    job = client.tools("bake", base=base.name, loras=[{"path": "style.safetensors"}], out="never")
    deadline = time.monotonic() + 60
    while client.get(job["id"])["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    client.cancel(job["id"])
    run = _wait(client, job["id"])
    assert run["status"] == "cancelled", run
    assert sorted(p.name for p in checkpoints.iterdir()) == [base.name]  # no output, no hidden temp file
