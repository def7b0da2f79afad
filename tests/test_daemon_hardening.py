"""What the daemon refuses, tried against a real daemon as an attacker or a careless user would (issue 11).

Nothing written outside the folders it owns, no code run from a config, no event stream without the token, no
frame that makes it log a traceback or stop answering, and bad input refused by field name before it is queued.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
from PIL import Image
from safetensors.torch import save_file

from daemon_fixtures import ROOT, daemon, daemon_factory, run_config, wait_until  # noqa: F401  (fixtures)
from lora_daemon.client import DaemonBusy, DaemonError, DaemonNotRunning
from lora_daemon.home import read_info
from lora_daemon.protocol import MAX_MESSAGE_BYTES, ProtocolError, encode, make_request


def raw_dealer(info: dict) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(info["endpoint"])
    return sock


def ask(sock: zmq.Socket, frame: bytes, timeout_ms: int = 5000) -> dict:
    sock.send_multipart([b"", frame])
    assert sock.poll(timeout_ms), "no reply"
    return json.loads(sock.recv_multipart()[-1])


class Evil:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def evil_ckpt(folder: Path) -> tuple[Path, Path]:
    marker = folder / "pwned.txt"
    path = folder / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil(marker)}, path)
    return path, marker


# --- one error class ----------------------------------------------------------------------------------------

def test_the_client_and_the_daemon_share_one_error_class():
    assert DaemonError is ProtocolError


# --- nothing written outside the folders it owns --------------------------------------------------------------

def test_captions_set_refuses_a_metadata_path_outside_the_dataset_and_image_suffixes(daemon, tiny_data, tmp_path):
    client = daemon.client()
    victim = tmp_path / "victim.conf"
    victim.write_text("precious = true\n")
    first = client.captions_get(str(tiny_data))["entries"][0]["file"]
    with pytest.raises(DaemonError, match="metadata_path: must be a .csv file inside the dataset folder"):
        client.captions_set(str(tiny_data), first, "x", metadata_path=str(victim))
    with pytest.raises(DaemonError, match="metadata_path"):
        client.captions_set(str(tiny_data), first, "x", metadata_path="../victim.csv")
    image = (tiny_data / first).read_bytes()
    with pytest.raises(DaemonError, match="caption_extension: must be one of .txt, .caption"):
        client.captions_set(str(tiny_data), first, "x", caption_extension=".png")
    with pytest.raises(DaemonError, match="caption_extension"):
        client.captions_edit(str(tiny_data), "add_trigger", {"word": "x"}, caption_extension=".png")
    assert victim.read_text() == "precious = true\n"
    assert (tiny_data / first).read_bytes() == image
    # inside the folder, a .csv is still fine
    entry = client.captions_set(str(tiny_data), first, "a pink blob", metadata_path="captions.csv")
    assert entry["caption"] == "a pink blob"


@pytest.mark.parametrize("options", [{"inp": "/etc"}, {"even": "/tmp/x.jsonl"}, {"outp": "/tmp/x.csv"},
                                     {"input": "/etc"}, {"events": "/tmp/e"}, {"output": "/tmp/elsewhere.csv"},
                                     {"output": "../up.csv"}, {"caption_extension": ".png"},
                                     {"trigger": "a\nb"}, {"batch_size": "8; rm"}, {"json": True}])
def test_caption_job_options_outside_the_fixed_table_or_folder_are_refused(daemon, tmp_path, options):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    with pytest.raises(DaemonError) as refused:
        daemon.client().caption(str(folder), **options)
    assert refused.value.code == "bad_request" and "options." in refused.value.message
    assert daemon.client().list_runs(all=True) == []


def test_caption_command_lines_use_only_checked_flags_as_flag_equals_value():
    from lora_daemon.queue import caption_command_args, caption_job

    folder = ROOT / "tests"
    job = caption_job(str(folder), {"trigger": "-x --events /etc/passwd", "overwrite": True, "batch-size": 2}, None)
    assert caption_command_args(job["options"]) == ["--batch-size=2", "--overwrite",
                                                    "--trigger=-x --events /etc/passwd"]
    assert caption_command_args({"evil_flag": "x", "trigger": "t"}) == ["--trigger=t"]


def test_the_auto_label_parser_takes_no_abbreviations():
    from lora_core.dataset.auto_label import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--input", "a", "--even", "x"])


def test_a_per_submit_lora_dir_outside_the_daemons_folder_is_refused_and_not_created(daemon, tiny_sd, tiny_data,
                                                                                      tmp_path):
    target = tmp_path / "anywhere" / "deep"
    with pytest.raises(DaemonError, match="lora_dir: .* is outside the folder this daemon publishes to"):
        daemon.client().submit(run_config(tiny_sd, tiny_data, "x"), lora_dir=str(target))
    assert not target.exists() and daemon.client().list_runs(all=True) == []
    inside = daemon.lora_dir / "sub"
    run = daemon.client().submit(run_config(tiny_sd, tiny_data, "x"), lora_dir=str(inside))
    assert run["publish"]["lora_dir"] == str(inside.resolve())
    daemon.client().cancel(run["id"])


# --- no code execution from a request -------------------------------------------------------------------------

def test_allow_pickle_is_refused_over_the_protocol_and_no_code_runs(daemon, tiny_data, tmp_path):
    ckpt, marker = evil_ckpt(tmp_path)
    config = {"model": {"base_model": str(ckpt), "allow_pickle": True},
              "data": {"train_data_dir": str(tiny_data), "resolution": 64}, "output": {"output_name": "evil"}}
    client = daemon.client()
    result = client.validate(config)
    assert not result["ok"] and any(p.startswith("model.allow_pickle: refused by this daemon") and
                                    "--allow-pickle" in p for p in result["problems"])
    for call in (lambda: client.submit(config), lambda: client.plan(config)):
        with pytest.raises(DaemonError) as refused:
            call()
        assert refused.value.code == "config_invalid" and "--allow-pickle" in refused.value.message
    assert client.list_runs(all=True) == [] and not marker.exists()


def test_with_allow_pickle_the_flag_is_accepted(daemon_factory, tiny_data, tmp_path):
    ckpt, _ = evil_ckpt(tmp_path)
    config = {"model": {"base_model": str(ckpt), "allow_pickle": True},
              "data": {"train_data_dir": str(tiny_data), "resolution": 64}, "output": {"output_name": "ok"}}
    result = daemon_factory("--allow-pickle").client().validate(config)
    assert not any("allow_pickle" in p for p in result["problems"]), result["problems"]


def test_ckpt_loading_tries_the_restricted_unpickler_first(tmp_path):
    from lora_core.image.sd_models import _load_pickle

    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    assert torch.equal(_load_pickle(plain)["state_dict"]["w"], torch.ones(2))
    # a file that needs more than tensors is only unpickled in full when the config allowed pickle at all
    from lora_core.image.sd_models import ModelLoadError, load_sd_model

    ckpt, marker = evil_ckpt(tmp_path)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_sd_model(ckpt, allow_pickle=False)
    assert not marker.exists()


# --- authentication and abuse ---------------------------------------------------------------------------------

def test_the_event_stream_needs_the_token(daemon, tmp_path):
    info = read_info(daemon.home)
    ctx = zmq.Context.instance()
    strangers = []
    for password in (None, b"wrong"):
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        if password is not None:
            sub.plain_username, sub.plain_password = b"lora", password
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(info["events"])
        strangers.append(sub)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    client = daemon.client()
    with client.subscribe(("run.",)) as events:
        time.sleep(0.5)  # let every subscription finish its handshake (or be refused) before the events
        job = client.caption(str(folder), captioner="wd14", model=str(tmp_path / "no-model"))
        seen = []
        while (event := events.next(timeout=30)) is not None:
            seen.append(event["type"])
            if event["type"] in ("run.failed", "run.finished"):
                break
    assert seen[0] == "run.queued" and seen[-1] == "run.failed", seen
    for sub in strangers:
        assert not sub.poll(1000), "a subscriber without the token received an event"
        sub.close()
    assert client.get(job["id"])["status"] == "failed"


def test_deep_nesting_is_bad_json_and_logged_once_per_peer_not_per_frame(daemon):
    info = read_info(daemon.home)
    dealer = raw_dealer(info)
    log_before = len(daemon.log_text())
    nested = b"[" * 5000 + b"]" * 5000
    for frame in (nested, b'{"v":1,"args":' + b"[" * 100 + b"]" * 100 + b"}"):
        assert ask(dealer, frame)["error"]["code"] == "bad_json"
    for _ in range(500):
        dealer.send_multipart([b"", nested])
    replies = 0
    while replies < 500 and dealer.poll(5000):
        reply = json.loads(dealer.recv_multipart()[-1])
        assert reply["error"]["code"] == "bad_json"
        replies += 1
    assert replies == 500
    assert daemon.client(timeout=1.0).status()["pid"] == daemon.proc.pid
    grown = daemon.log_text()[log_before:]
    assert "Traceback" not in grown and grown.count("refused a request from") <= 1, grown[-2000:]
    dealer.close()


def test_frames_over_the_limit_are_answered_too_large_by_the_daemon_and_refused_by_the_client(daemon):
    info = read_info(daemon.home)
    dealer = raw_dealer(info)
    big = encode(make_request("ping", {"pad": "x" * (MAX_MESSAGE_BYTES + 10)}, token=info["token"]))
    assert ask(dealer, big)["error"]["code"] == "too_large"
    with pytest.raises(DaemonError) as refused:
        daemon.client().validate({"model": {"base_model": "x" * (MAX_MESSAGE_BYTES + 10)}})
    assert refused.value.code == "too_large"
    dealer.close()


def test_a_yaml_alias_bomb_is_refused_and_status_answers_while_slow_requests_run(daemon, tiny_sd, tiny_data):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(7))
    client = daemon.client()
    result = client.validate(bomb)
    assert not result["ok"] and "anchors/aliases" in result["problems"][0]
    # a plan runs a child for seconds; status must not wait behind it
    done = {}
    planner = threading.Thread(target=lambda: done.update(plan=daemon.client().plan(run_config(tiny_sd, tiny_data,
                                                                                             "p"))))
    planner.start()
    answers = [daemon.client(timeout=1.0, retries=0).status()["pid"] for _ in range(10)]
    planner.join(300)
    assert answers == [daemon.proc.pid] * 10 and "plan" in done


def test_home_is_owner_only_and_so_are_its_database_and_log(daemon_factory, tmp_path):
    d = daemon_factory("--log-file", str(tmp_path / "home" / "daemon.log"))
    assert stat.S_IMODE(d.home.stat().st_mode) == 0o700
    for name in ("runs.db", "daemon.log", "daemon.json"):
        assert stat.S_IMODE((d.home / name).stat().st_mode) == 0o600, name
    assert "listening on" in (d.home / "daemon.log").read_text()


def test_a_connection_flood_is_dropped_and_clients_hear_busy_not_gone(daemon):
    info = read_info(daemon.home)
    port = int(info["endpoint"].rsplit(":", 1)[1])
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4096)), hard))
    flood = []
    try:
        for _ in range(1100):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        try:
            assert daemon.client(timeout=10).status()["pid"] == daemon.proc.pid
        except DaemonBusy:
            pass  # acceptable: "busy", never "not running" while it runs
        except DaemonNotRunning as e:
            pytest.fail(f"a flooded daemon was reported as not running: {e}")
        # a connection that never speaks ZeroMQ is closed by the daemon after the handshake interval
        silent = flood[0]
        silent.settimeout(30)
        data = b"x"
        while data:
            try:
                data = silent.recv(4096)
            except ConnectionResetError:
                data = b""
    finally:
        for s in flood:
            s.close()
    assert daemon.client(timeout=5).status()["pid"] == daemon.proc.pid


# --- bad input is refused before it is queued, by name --------------------------------------------------------

def test_bad_input_is_refused_by_field_name_before_queueing(daemon, tiny_sd, tiny_data, tmp_path):
    lora_file = tmp_path / "a_lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(8, 4)}, str(lora_file))
    text_as_model = tmp_path / "notes.safetensors"
    text_as_model.write_text("these are my notes, not a model\n" * 10)
    txt_model = tmp_path / "model.txt"
    txt_model.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "model.base_model: a_lora.safetensors is a LoRA, not a base model":
            run_config(lora_file, tiny_data, "x"),
        "model.base_model: notes.safetensors is not a safetensors file": run_config(text_as_model, tiny_data, "x"),
        "model.base_model: model.txt is not a model file": run_config(txt_model, tiny_data, "x"),
        "output.output_name: must not contain control characters": run_config(tiny_sd, tiny_data, "a\x00b"),
        "output.output_name: must not contain control": run_config(tiny_sd, tiny_data, "two\nlines"),
        "data.train_data_dir: no images in": run_config(tiny_sd, empty, "x"),
    }
    client = daemon.client()
    for expected, config in cases.items():
        result = client.validate(config)
        assert not result["ok"] and any(p.startswith(expected) for p in result["problems"]), (expected, result)
        with pytest.raises(DaemonError) as refused:
            client.submit(config)
        assert refused.value.code == "config_invalid" and expected in refused.value.message
    assert client.list_runs(all=True) == []


def test_lora_train_runs_the_same_preflight(tmp_path, tiny_sd):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: {tiny_sd}\ntrain_data_dir: {empty}\noutput_dir: {tmp_path / 'out'}\n")
    done = subprocess.run([sys.executable, "-m", "lora_core.train", "--config", str(config)], capture_output=True,
                          text=True, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 2 and "data.train_data_dir: no images in" in done.stderr


# --- the run's stored events -----------------------------------------------------------------------------------

def test_a_runs_stored_events_are_served_and_shown(daemon, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    client = daemon.client()
    job = client.caption(str(folder), captioner="wd14", model=str(tmp_path / "no-model"))
    wait_until(lambda: client.get(job["id"])["status"] == "failed", 120, 0.2, "the job to fail")
    types = [e["type"] for e in client.run_events(job["id"])]
    assert types[0] == "run.queued" and types[-1] == "run.failed" and "run.started" in types
    assert [e["type"] for e in client.run_events(job["id"], last=1)] == ["run.failed"]
    shown = subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(daemon.home), "show", job["id"]],
                           capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert shown.returncode == 0 and "events:" in shown.stdout and "run.failed" in shown.stdout, shown
