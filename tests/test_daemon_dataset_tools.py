"""The Train tab's dataset commands, served by a real daemon running the engine's tools in a child process."""
from __future__ import annotations

import pytest

from lora_core.config import config_from_dict
from lora_core.plan import make_plan
from lora_daemon.client import DaemonError
from daemon_fixtures import daemon, daemon_factory  # noqa: F401  (fixtures)


def test_check_reports_the_folder_by_file_name(daemon, tiny_data):
    (tiny_data / "broken.png").write_bytes(b"not a png")
    report = daemon.client().check(str(tiny_data), resolution=64)
    assert any(p["file"] == "broken.png" and p["kind"] == "corrupt" for p in report["problems"])
    assert len(report["images"]) == 4


def test_captions_can_be_read_set_and_edited_through_the_daemon(daemon, tiny_data):
    client = daemon.client()
    entries = client.captions_get(str(tiny_data))["entries"]
    first = entries[0]["file"]
    client.captions_set(str(tiny_data), first, "a pink blob")
    assert (tiny_data / first).with_suffix(".txt").read_text().strip() == "a pink blob"
    report = client.captions_edit(str(tiny_data), "add_trigger", {"word": "shp"})
    assert len(report["changed"]) == len(entries)
    assert (tiny_data / first).with_suffix(".txt").read_text().strip().startswith("shp")


def test_dataset_tool_errors_name_the_problem(daemon, tiny_data):
    client = daemon.client()
    with pytest.raises(DaemonError, match="outside the dataset folder"):
        client.captions_set(str(tiny_data), "../escape.png", "x")
    with pytest.raises(DaemonError, match="unknown argument"):
        client.check(str(tiny_data), run_shell="rm -rf /")
    with pytest.raises(DaemonError, match="no such folder"):
        client.check(str(tiny_data / "missing"))


def test_plan_returns_the_engines_plan_for_a_config(daemon, tiny_sd, tiny_data):
    from daemon_fixtures import run_config

    config = run_config(tiny_sd, tiny_data, "planned")
    config["training"]["batch_size"] = 3
    plan = daemon.client().plan(config)
    assert plan["settings"]["batch_size"] == 3 and plan["device"] == "cpu"
    assert plan["estimate_mb"] > 0 and isinstance(plan["fits"], bool)
    # the daemon's answer is the engine's own plan for that config (it fills in the run folder itself)
    local = make_plan(config_from_dict(config, overrides={"output.output_dir": str(daemon.home / "plan-check")}))
    assert plan["estimate_mb"] == pytest.approx(local.estimate_mb, rel=0.01)
    assert not list((daemon.home / "plans").glob("*"))  # the temporary snapshot is gone


def test_plan_refuses_a_bad_config_before_starting_a_child(daemon, tiny_sd, tiny_data):
    from daemon_fixtures import run_config

    config = run_config(tiny_sd, tiny_data, "planned")
    config["training"]["batch_size"] = 0
    with pytest.raises(DaemonError) as err:
        daemon.client().plan(config)
    assert err.value.code == "config_invalid"
    assert err.value.details["problems"] == ["training.batch_size: must be at least 1, got 0"]
    assert not list((daemon.home / "plans").glob("*"))
