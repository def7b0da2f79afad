"""Daemon latency: request round trips under 20 concurrent clients, and child → subscriber event delay.

    python benchmarks/daemon_latency.py [--clients 20] [--requests 200] [--steps 30]

Baseline in the same run: a bare ZeroMQ ROUTER echo server in its own process, driven by the same clients, so the
daemon's own cost (JSON, token check, SQLite, config validation) is the difference between the two rows.
Event latency is the child's event timestamp (`lora_core.train --events`) to its arrival as `run.progress` at a
subscriber, on a real tiny-model training run.

Every client thread opens its own client and socket (the JSON line counts them), and the last line is one JSON object
with every row's p50/p99, the load average at start and end and the core count; a load above the core count prints a
warning (latency figures from a busy machine are not results).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from lora_daemon.client import DaemonClient  # noqa: E402
from lora_daemon.home import read_info  # noqa: E402
from lora_daemon.protocol import encode, make_request  # noqa: E402

from bench_common import LoadWatch, emit  # noqa: E402

ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context(); sock = ctx.socket(zmq.ROUTER); port = sock.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    frames = sock.recv_multipart()
    if frames[-1] == b"quit":
        break
    sock.send_multipart(frames)
"""


def summary(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
            "n": len(ms)}


def percentiles(row: dict) -> str:
    return f"p50 {row['p50_ms']:7.2f} ms   p99 {row['p99_ms']:7.2f} ms   n={row['n']}"


def hammer(call, clients: int, requests: int) -> tuple[list[float], int]:
    """`clients` threads, each opening its own client (and so its own socket) in its own thread, each timing
    `requests` sequential round trips. ``call(i)`` returns (request function, the socket it uses after one request
    or the object owning it); returns the samples and the number of distinct sockets used."""
    samples: list[float] = []
    sockets: list = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def one(index: int) -> None:
        fn, owner = call(index)
        fn()  # connect outside the timing: the first request opens the socket
        barrier.wait()
        mine = []
        for _ in range(requests):
            t0 = time.perf_counter()
            fn()
            mine.append(time.perf_counter() - t0)
        with lock:
            samples.extend(mine)
            sockets.append(getattr(owner, "_sock", owner))  # DaemonClient keeps its REQ socket in _sock

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    distinct = len({id(s) for s in sockets if s is not None})  # all alive until here, so ids are unique
    return samples, distinct


def echo_baseline(clients: int, requests: int, payload: bytes) -> tuple[list[float], int]:
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    ctx = zmq.Context.instance()

    def call(_: int):
        sock = ctx.socket(zmq.REQ)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return (lambda: (sock.send(payload), sock.recv())), sock

    try:
        return hammer(call, clients, requests)
    finally:
        quit_sock = ctx.socket(zmq.REQ)
        quit_sock.connect(f"tcp://127.0.0.1:{port}")
        quit_sock.send(b"quit")
        server.wait(10)


def event_latency(home: Path, work: Path, steps: int) -> list[float]:
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    model = build_tiny_sd(work / "model")
    data = make_tiny_dataset(work / "data", n=4, size=64)
    client = DaemonClient(home=home)
    sub = client.subscribe(("run.progress", "run.finished", "run.failed"))
    config = {"base_model": str(model), "train_data_dir": str(data), "resolution": 64, "max_train_steps": steps,
              "lora_rank": 4, "output_name": "bench"}
    run = client.submit(config)
    delays = []
    while True:
        event = sub.next(300)
        if event is None:
            raise SystemExit(f"run {run['id']}: no event for 300 s; see its train.log under {home / 'runs'}")
        if event["run_id"] != run["id"]:
            continue
        if event["type"] != "run.progress":
            print(f"run {event['type']}")
            break
        delays.append(time.time() - event["child_time"])
    sub.close()
    client.close()
    return delays


def daemon_client(home: Path, method: str, *args):
    """A client of its own (own socket) calling one method: what one WebUI tab or CLI process does."""
    def call(_: int):
        client = DaemonClient(home=home, timeout=10)
        return (lambda: getattr(client, method)(*args)), client
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30, help="training steps for the event-latency run (0: skip)")
    args = parser.parse_args()
    watch = LoadWatch()
    result: dict = {"bench": "daemon_latency", "clients": args.clients, "requests": args.requests}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = work / "home"
        daemon = subprocess.Popen([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "start", "--foreground",
                                   "--gpus", "cpu", "--log-level", "WARNING"], cwd=str(ROOT))
        try:
            while not (read_info(home) or {}).get("endpoint"):
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with code {daemon.returncode} before it listened")
                time.sleep(0.05)
            DaemonClient(home=home, timeout=10).ping()
            (work / "base").mkdir()
            (work / "images").mkdir()
            config = {"base_model": str(work / "base"), "train_data_dir": str(work / "images"), "resolution": 64}
            token = read_info(home)["token"]
            status_payload = encode(make_request("status", token=token))
            print(f"{args.clients} concurrent clients × {args.requests} sequential requests each")
            rows = [("echo", "baseline zmq echo", lambda: echo_baseline(args.clients, args.requests, status_payload),
                     ""),
                    ("status", "daemon status", lambda: hammer(daemon_client(home, "status"), args.clients,
                                                                 args.requests), ""),
                    ("validate", "daemon validate", lambda: hammer(daemon_client(home, "validate", config),
                                                                     args.clients, args.requests),
                     "  (submit's validation path, nothing queued)")]
            for key, label, measure, note in rows:
                samples, sockets = measure()
                result[key] = {**summary(samples), "sockets": sockets}
                print(f"  {label:<20} {percentiles(result[key])}  {sockets} sockets{note}")
            if args.steps:
                result["event"] = summary(event_latency(home, work, args.steps))
                print(f"  event child→sub      {percentiles(result['event'])}  (run.progress, tiny model training)")
            DaemonClient(home=home).shutdown()
            daemon.wait(60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
    emit(result, watch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
