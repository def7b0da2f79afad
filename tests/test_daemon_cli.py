"""`lora-daemon` as a user types it: start detached, submit and wait, inspect, stop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon_fixtures import wait_until
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


@pytest.mark.slow
def test_runs_are_found_by_name_id_tail_or_last_and_list_shows_speed_eta_and_the_plan(tmp_path, tiny_sd, tiny_data):
    """`--name` names the run and its LoRA file; `show`/`cancel` take the name, the id's random tail or `last`;
    `list` shows it/s and an ETA for a running run, from its step events; `show` gives the memory plan the run
    worked out as its first phase."""
    home, lora = tmp_path / "home", tmp_path / "Lora"
    assert cli(home, "start", "--gpus", "cpu", "--lora-dir", str(lora)).returncode == 0
    try:
        config = tmp_path / "my.yaml"
        config.write_text(yaml.safe_dump({"base_model": str(tiny_sd), "train_data_dir": str(tiny_data),
                                          "resolution": 64, "max_train_steps": 3, "lora_rank": 4,
                                          "output_name": "from_config"}))
        done = cli(home, "submit", str(config), "--name", "prio_run", "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        first = done.stdout.splitlines()[0]
        assert "memory plan: peak ~" in done.stdout  # the plan arrives as the run's first phase
        assert (lora / "prio_run.safetensors").is_file() and not (lora / "from_config.safetensors").exists()

        by_tail = json.loads(cli(home, "show", first[-4:], "--json").stdout)
        by_name = json.loads(cli(home, "show", "prio_run", "--json").stdout)
        assert by_tail["id"] == by_name["id"] == first and by_name["name"] == "prio_run"
        assert by_name["plan"]["estimate_mb"] > 0 and by_name["plan"]["fits"] is True
        shown = cli(home, "show", "last").stdout
        assert f"id: {first}" in shown and "memory plan: peak ~" in shown

        config.write_text(yaml.safe_dump({"base_model": str(tiny_sd), "train_data_dir": str(tiny_data),
                                          "resolution": 64, "max_train_steps": 100000, "lora_rank": 4}))
        second = cli(home, "submit", str(config), "--name", "long_run").stdout.strip()
        assert json.loads(cli(home, "show", "last", "--json").stdout)["id"] == second

        def running_line():
            line = next(l for l in cli(home, "list").stdout.splitlines() if l.startswith(second))
            return line if "running" in line and " 0/" not in line and "/100000" in line else None

        header = cli(home, "list").stdout.splitlines()[0]
        assert header.split()[-3:] == ["IT/S", "ETA", "NAME"]
        fields = wait_until(running_line, 180, 0.5, "a running run in list").split()
        it_s, eta = fields[-3], fields[-2]
        assert float(it_s) > 0 and eta != "-" and eta[-1] in "sm"
        cancelled = cli(home, "cancel", "last")
        assert cancelled.returncode == 0 and second in cancelled.stdout
        ambiguous = cli(home, "show", "-")  # every id holds a dash
        assert ambiguous.returncode == 1 and "matches more than one run" in ambiguous.stderr
    finally:
        cli(home, "stop")


@pytest.mark.slow
def test_the_tabs_advice_starts_the_daemon_as_printed_and_captioners_are_looked_for_in_its_home(tmp_path):
    """While the daemon is down the tab prints a command; pasted into a shell as is, it starts the daemon with
    the tab's Lora folder, and that daemon looks for captioner weights under its own state folder."""
    import shlex

    from lora_daemon.ui.context import TabContext, UiSettings

    home, lora = tmp_path / "state home", tmp_path / "webui" / "models" / "Lora"
    ctx = TabContext(settings=lambda: UiSettings(home=str(home), daemon_python=sys.executable),
                     checkpoints=dict, lora_dir=lambda: lora)
    advice = ctx.start_advice()
    assert advice.startswith("Press “Start daemon” below, or run: ")
    command = shlex.split(advice.split("or run: ", 1)[1])
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_SCRIPTS_CAPTIONERS", "LORA_DAEMON_HOME")}
    env["PYTHONPATH"] = str(ROOT)
    started = subprocess.run(command + ["--gpus", "cpu"], capture_output=True, text=True, timeout=120, env=env,
                             cwd=str(tmp_path))
    assert started.returncode == 0, started.stderr
    try:
        status = wait_until(lambda: (lambda s: s if s.get("captioners") else None)(
            json.loads(cli(home, "status", "--json").stdout)), timeout=120, every=0.5)
        assert status["lora_dir"] == str(lora.resolve())
        assert any(c["model_dir"] for c in status["captioners"]) and all(Path(c["model_dir"]).parent == home.resolve() / "captioners"
                                            for c in status["captioners"] if c["model_dir"])
    finally:
        cli(home, "stop")
    no_engine = TabContext(settings=lambda: UiSettings(home=str(home)), checkpoints=dict, lora_dir=lambda: lora)
    assert "press “Set up the training engine”" in no_engine.start_advice()


@pytest.mark.slow
def test_a_second_start_with_the_same_settings_while_the_first_is_pending_queues_no_twin(tmp_path, tiny_sd, tiny_data):
    """The tab's Start submits with ``dedupe``: the same settings again (a double click) answer the pending run;
    other settings, another name, or a plain submit (the CLI's, on purpose) queue a new run."""
    from lora_daemon.client import DaemonClient

    home, lora = tmp_path / "home", tmp_path / "Lora"
    assert cli(home, "start", "--gpus", "cpu", "--lora-dir", str(lora)).returncode == 0
    try:
        client = DaemonClient(home=home, timeout=30)
        config = {"base_model": str(tiny_sd), "train_data_dir": str(tiny_data), "resolution": 64, "lora_rank": 4,
                  "max_train_steps": 100000, "output_name": "twin"}
        first = client.submit(config, lora_dir=str(lora), dedupe=True)
        again = client.submit(config, lora_dir=str(lora), dedupe=True)
        assert again["id"] == first["id"] and again["duplicate"] is True and "duplicate" not in first
        other = client.submit({**config, "lora_rank": 8}, lora_dir=str(lora), dedupe=True)
        renamed = client.submit({**config, "output_name": "twin2"}, lora_dir=str(lora), dedupe=True)
        plain = client.submit(config, lora_dir=str(lora))
        ids = {first["id"], other["id"], renamed["id"], plain["id"]}
        assert len(ids) == 4 and {r["id"] for r in client.list_runs(all=True)} == ids
        assert sorted(p.name for p in (home / "runs").iterdir()) == sorted(ids)  # no folder left by the twin
        for run_id in ids:
            client.cancel(run_id)
    finally:
        cli(home, "stop")


@pytest.mark.slow
def test_submit_wait_shows_sampling_progress_and_show_says_what_the_run_is_doing(tmp_path, tiny_sd, tiny_data):
    """Sampling never looks like a hang at the terminal either: `submit --wait` prints the prompt and denoising
    step as the samples render, and the run log says how long they took."""
    home, lora = tmp_path / "home", tmp_path / "Lora"
    assert cli(home, "start", "--gpus", "cpu", "--lora-dir", str(lora)).returncode == 0
    try:
        config = tmp_path / "sampled.yaml"
        config.write_text(yaml.safe_dump({"base_model": str(tiny_sd), "train_data_dir": str(tiny_data),
                                          "resolution": 64, "max_train_steps": 2, "lora_rank": 4,
                                          "sample_every_n_steps": 2, "output_name": "sampled",
                                          "sample_prompts": ["a red circle --w 64 --h 64 --s 3",
                                                             "a blue square --w 64 --h 64 --s 3"]}))
        done = cli(home, "submit", str(config), "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        for prompt in (1, 2):
            assert f"sampling prompt {prompt}/2, step 3/3" in lines
        assert lines.index("sampling prompt 1/2, step 0/3") < lines.index("sampling prompt 2/2, step 3/3")
        logs = cli(home, "logs", "last").stdout
        assert "samples at step 2: 2 image(s) in" in logs
        shown = json.loads(cli(home, "show", "sampled", "--json").stdout)
        assert shown["phase"] is None and shown["preview_file"].endswith("step00000002_01.png")
    finally:
        cli(home, "stop")
