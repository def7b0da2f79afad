"""Thousands of hostile frames against a real daemon: it must answer what it can, and never fall over or act."""
from __future__ import annotations

import json
import random

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_daemon.home import read_info
from lora_daemon.protocol import MAX_MESSAGE_BYTES, encode, make_request
from daemon_fixtures import daemon, daemon_factory, run_config  # noqa: F401  (fixtures)

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=10)
envelopes = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), json_values), "id": st.one_of(st.text(max_size=20), json_values),
    "token": st.one_of(st.text(max_size=40), json_values),
    "command": st.one_of(st.sampled_from(["submit", "cancel", "shutdown", "retry", "caption", "ping"]), json_values),
    "args": st.one_of(st.dictionaries(st.text(max_size=10), json_values, max_size=4), json_values)})
payloads = st.one_of(st.binary(max_size=300), envelopes.map(lambda e: json.dumps(e).encode()),
                     json_values.map(lambda v: json.dumps(v).encode()))


def _drain(sock: zmq.Socket) -> list[dict]:
    replies = []
    while sock.poll(0):
        replies.append(json.loads(sock.recv_multipart()[-1]))
    return replies


def test_garbage_never_crashes_or_blocks_the_daemon_and_wrong_tokens_change_nothing(daemon, tiny_sd, tiny_data):
    info = read_info(daemon.home)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(info["endpoint"])
    client = daemon.client()
    sent = {"answerable": 0, "answered": 0}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(payloads, min_size=5, max_size=25),
           raw_multipart=st.lists(st.lists(st.binary(max_size=50), min_size=0, max_size=5), max_size=3))
    def attack(batch, raw_multipart):
        for payload in batch:
            dealer.send_multipart([b"", payload])
        for frames in raw_multipart:
            if frames:
                dealer.send_multipart(frames)
        replies = []
        while len(replies) < len(batch) and dealer.poll(3000):
            replies += _drain(dealer)
        sent["answerable"] += len(batch)
        sent["answered"] += len(replies)
        assert all(r["ok"] is False for r in replies), [r for r in replies if r["ok"]]
        assert client.ping()["pong"] is True

    attack()
    # every single-frame request got an error reply; the odd multipart frames were dropped silently
    assert sent["answered"] >= sent["answerable"] > 1000
    # well-formed requests with a wrong token: refused, and nothing happened
    submit = make_request("submit", {"config": run_config(tiny_sd, tiny_data, "x")}, token="wrong")
    shutdown = make_request("shutdown", token=info["token"] + "x")
    for request in (submit, shutdown):
        dealer.send_multipart([b"", encode(request)])
        assert dealer.poll(3000)
        assert json.loads(dealer.recv_multipart()[-1])["error"]["code"] == "unauthorized"
    assert client.list_runs(all=True) == []
    assert client.status()["pid"] == daemon.proc.pid
    dealer.close()


def test_oversized_messages_are_refused_and_the_daemon_keeps_serving(daemon):
    info = read_info(daemon.home)
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(info["endpoint"])
    big = encode(make_request("ping", {"pad": "x" * MAX_MESSAGE_BYTES}, token=info["token"]))
    dealer.send_multipart([b"", big])
    assert dealer.poll(5000)
    assert json.loads(dealer.recv_multipart()[-1])["error"]["code"] == "too_large"
    dealer.send_multipart([b"", b"y" * (MAX_MESSAGE_BYTES * 5)])  # beyond libzmq's cap: the peer is dropped
    assert daemon.client().ping()["pong"] is True
    dealer.close()


def _hostile_frames(rng: random.Random, token: str, n: int):
    """`n` frames an attacker or a broken client might send, in every category the daemon must survive."""
    commands = ["submit", "cancel", "shutdown", "retry", "resume", "caption", "captions.set", "captions.edit",
                "plan", "validate", "status", "run.events"]
    wrong_types = [None, [], {}, 1.5, -1, True, "x" * 300, ["a"], {"a": 1}]
    for i in range(n):
        kind = i % 6
        if kind == 0:  # random bytes
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif kind == 1:  # deep nesting, arrays or objects, inside an envelope or bare
            depth = rng.choice([65, 200, 1000, 5000, 20000])
            if rng.random() < 0.5:
                yield b"[" * depth + b"]" * depth
            else:
                yield b'{"v":1,"command":"ping","args":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
        elif kind == 2:  # wrong types in every envelope field
            env = {"v": 1, "id": "x", "token": token, "command": "ping", "args": {}}
            env[rng.choice(list(env))] = rng.choice(wrong_types)
            yield json.dumps(env).encode()
        elif kind == 3:  # no token
            yield json.dumps({"v": 1, "id": str(i), "command": rng.choice(commands),
                              "args": {"run": "x", "config": {"model": {}}, "folder": "/"}}).encode()
        elif kind == 4:  # a wrong token
            yield encode(make_request(rng.choice(commands), {"run": "x", "folder": "/etc"},
                                      token=token[:-1] + ("A" if token[-1] != "A" else "B")))
        else:  # huge (now and then) or merely odd
            if i % 600 == 5:
                yield b'{"v":1,"pad":"' + b"x" * (MAX_MESSAGE_BYTES + 100) + b'"}'
            else:
                yield rng.choice([b"", b"{}", b"null", b"[]", b'"str"', b"1e999", b'{"v":1}', b"\xff\xfe"])


def test_ten_thousand_hostile_frames_leave_status_answering_the_log_bounded_and_nothing_done(daemon):
    info = read_info(daemon.home)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(info["endpoint"])
    log_before = len(daemon.log_text().encode())
    rng = random.Random(11)
    sent = answered = 0
    frames = list(_hostile_frames(rng, info["token"], 12_000))
    for i, frame in enumerate(frames):
        dealer.send_multipart([b"", frame])
        sent += 1
        if i % 200 == 199 or i == len(frames) - 1:
            want = sent
            while answered < want and dealer.poll(5000):
                reply = json.loads(dealer.recv_multipart()[-1])
                assert reply["ok"] is False or reply["result"].get("pid") == daemon.proc.pid, reply
                answered += 1
    assert sent >= 10_000 and answered == sent
    # afterwards: status answers within a second, nothing was done, and the log grew by a few lines at most
    assert daemon.client(timeout=1.0, retries=0).status()["pid"] == daemon.proc.pid
    assert daemon.client().list_runs(all=True) == []
    assert not (daemon.home / "runs").exists() or not any((daemon.home / "runs").iterdir())
    grown = len(daemon.log_text().encode()) - log_before
    print(f"fuzz: {sent} frames sent, {answered} answered, daemon log grew {grown} bytes")
    assert grown < 20_000, daemon.log_text()[-3000:]
    dealer.close()
