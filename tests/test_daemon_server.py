"""A real daemon process answering real clients over loopback TCP: security, validation and errors."""
from __future__ import annotations

import json
import stat
import sys

import pytest
import zmq

from lora_daemon.client import DaemonClient, DaemonError, DaemonNotRunning
from lora_daemon.home import read_info
from lora_daemon.protocol import encode, make_request
from lora_daemon.server import Daemon, DaemonOptions, DaemonStartError
from daemon_fixtures import daemon, daemon_factory, run_config, wait_until  # noqa: F401  (fixtures)
from dataset_fixtures import make_tagger_dir


def raw_request(endpoint: str, payload: bytes, timeout_ms: int = 3000) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(payload)
        assert sock.poll(timeout_ms), "the daemon did not answer"
        return json.loads(sock.recv())
    finally:
        sock.close()


def test_status_reports_version_devices_and_queue(daemon):
    status = daemon.client().status()
    assert status["pid"] == daemon.proc.pid
    assert status["gpus"] == [{"slot": "cpu", "run_id": None}]
    assert status["queue_length"] == 0
    assert status["lora_dir"] == str(daemon.lora_dir.resolve())


def test_status_lists_the_engines_captioners_and_which_have_weights_without_loading_torch(daemon_factory,
                                                                                        tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SCRIPTS_CAPTIONERS", str(tmp_path / "captioners"))
    make_tagger_dir(tmp_path / "captioners" / "wd14")
    daemon = daemon_factory()
    captioners = wait_until(lambda: daemon.client().status()["captioners"], 30, 0.1, "the captioner list")
    by_name = {c["name"]: c for c in captioners}
    assert {"blip", "wd14"} <= set(by_name)
    assert by_name["wd14"]["ready"] and by_name["wd14"]["model_dir"] == str(tmp_path / "captioners" / "wd14")
    assert not by_name["blip"]["ready"]
    if sys.platform.startswith("linux"):  # the daemon asked a child: no torch or onnxruntime library is mapped in
        maps = open(f"/proc/{daemon.proc.pid}/maps").read()
        assert "libtorch" not in maps and "onnxruntime" not in maps


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_daemon_json_is_readable_by_its_owner_only(daemon):
    mode = stat.S_IMODE((daemon.home / "daemon.json").stat().st_mode)
    assert mode == 0o600
    info = read_info(daemon.home)
    assert info["endpoint"].startswith("tcp://127.0.0.1:") and len(info["token"]) >= 32


def test_wrong_token_is_refused_and_changes_nothing(daemon, tiny_sd, tiny_data):
    endpoint = read_info(daemon.home)["endpoint"]
    request = make_request("submit", {"config": run_config(tiny_sd, tiny_data, "intruder")}, token="not-the-token")
    reply = raw_request(endpoint, encode(request))
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    assert reply["id"] == request["id"]
    assert daemon.client().list_runs(all=True) == []


def test_bad_config_is_refused_with_the_engines_field_message_and_nothing_is_queued(daemon, tiny_sd, tiny_data):
    config = run_config(tiny_sd, tiny_data, "bad")
    config["training"]["learning_rate"] = -1
    config["data"]["train_data_dir"] = str(tiny_data / "missing")
    with pytest.raises(DaemonError) as err:
        daemon.client().submit(config)
    assert err.value.code == "config_invalid"
    problems = err.value.details["problems"]
    assert any(p.startswith("training.learning_rate: must be > 0") for p in problems)
    assert any(p.startswith("data.train_data_dir: no such folder") for p in problems)
    assert daemon.client().list_runs(all=True) == []


def test_yaml_errors_point_at_the_line(daemon, tiny_sd, tiny_data):
    text = f"base_model: {tiny_sd}\ntrain_data_dir: {tiny_data}\nresolution: 64\nlerning_rate: 0.001\n"
    result = daemon.client().validate(text)
    assert result["ok"] is False
    assert result["problems"] == ["lerning_rate: unknown setting (did you mean 'learning_rate'?) (line 4)"]


def test_validate_resolves_relative_paths_against_config_dir(daemon, tiny_sd, tiny_data):
    config = run_config(tiny_sd, tiny_data, "rel")
    config["data"]["train_data_dir"] = tiny_data.name
    config["config_dir"] = str(tiny_data.parent)
    result = daemon.client().validate(config)
    assert result["ok"], result["problems"]
    assert result["config"]["data"]["train_data_dir"] == str(tiny_data.resolve())
    assert result["config"]["output"]["output_name"] == "rel"


def test_unknown_command_and_unknown_run_are_clear_errors(daemon):
    client = daemon.client()
    with pytest.raises(DaemonError) as err:
        client.request("train-faster")
    assert err.value.code == "unknown_command" and "train-faster" in err.value.message
    with pytest.raises(DaemonError) as err:
        client.get("no-such-run")
    assert err.value.code == "not_found"


@pytest.mark.timeout(20)  # a hang guard: the client is told to wait up to 60 s, so only early detection passes
def test_a_dead_daemon_is_noticed_by_its_closed_port_not_by_waiting_out_the_timeout(daemon):
    client = daemon.client(timeout=60, retries=0)
    client.ping()
    daemon.kill9()
    with pytest.raises(DaemonNotRunning, match="start it with `lora-daemon start`"):
        client.status()


def test_no_daemon_at_all_is_reported_at_once(tmp_path):
    with pytest.raises(DaemonNotRunning, match="daemon not running"):
        DaemonClient(home=tmp_path / "nothing-here").ping()


def test_binding_beyond_loopback_without_curve_keys_is_refused(tmp_path):
    with pytest.raises(DaemonStartError, match="CURVE"):
        Daemon(DaemonOptions(home=tmp_path, host="0.0.0.0"))


def test_a_second_daemon_on_the_same_home_refuses_to_start(daemon):
    with pytest.raises(DaemonStartError, match="already running"):
        Daemon(DaemonOptions(home=daemon.home)).start()


def test_curve_keys_let_an_authorised_client_in(daemon_factory, tmp_path):
    from lora_daemon.curve import create_keys

    keys = create_keys(tmp_path / "keys")
    proc = daemon_factory("--curve-dir", str(keys))
    assert read_info(proc.home)["curve_dir"] == str(keys)
    assert proc.client().ping()["pong"] is True
    plain = raw_request_times_out(read_info(proc.home)["endpoint"], proc)
    assert plain


def raw_request_times_out(endpoint: str, proc) -> bool:
    """A client without the CURVE keys gets no answer at all (the handshake fails), even with the right token."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(encode(make_request("ping", token=read_info(proc.home)["token"])))
        return not sock.poll(1000)
    finally:
        sock.close()


def test_shutdown_removes_daemon_json_and_exits_cleanly(daemon):
    assert daemon.client().shutdown()["stopping"] is True
    assert daemon.proc.wait(30) == 0
    assert not (daemon.home / "daemon.json").exists()
