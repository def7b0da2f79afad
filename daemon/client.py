"""The one daemon client: the CLI, the WebUI tab and its REST routes all talk to the daemon through `DaemonClient`.

Standard library + pyzmq only, because it runs inside the WebUI process. It never hangs: every request has a
timeout, a dead daemon is recognised in well under two seconds (a refused TCP connect on its port, or no daemon.json
at all), and a daemon that stops answering is retried on a fresh socket (the zguide's Lazy Pirate pattern) for
read-only commands; a command that changes something is never sent twice behind the user's back.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import zmq

from .home import default_home, read_info, resolve_home
from .protocol import (E_AUTH, E_TOO_LARGE, EVENTS_USER, MAX_MESSAGE_BYTES, ProtocolError, decode, encode,
                       make_request)

__all__ = ["DaemonBusy", "DaemonClient", "DaemonError", "DaemonNotRunning", "EventSubscription", "default_home"]

NOT_RUNNING = "daemon not running — start it with `lora-daemon start`"
BUSY = ("daemon busy — it is running but did not accept the connection in time (too many connections at once?); "
        "try again in a moment")
READ_ONLY = frozenset({"ping", "status", "validate", "list", "get", "logs", "metrics", "check", "captions.get",
                       "plan", "run.events", "tools.inspect", "queue", "whoami"})
LIVENESS_SLICE_S = 0.4  # a daemon killed mid-request is noticed after this long, not after the whole timeout
SLOW_TIMEOUT_S = 300.0  # dataset checks and plans run a child process; they get minutes, not 1.5 s
# Config work (YAML, schema, preflight file reads; the first one imports the schema) runs in the daemon's pool: on a
# loaded machine it can take seconds, and a submit is never retried, so it gets longer than a status. A dead daemon
# is still noticed within LIVENESS_SLICE_S (its port closes).
CONFIG_TIMEOUT_S = 30.0


class DaemonNotRunning(ConnectionError):
    def __init__(self, message: str = NOT_RUNNING):
        super().__init__(message)


class DaemonBusy(DaemonNotRunning):
    """The daemon's port is there but did not take the connection in time. A `DaemonNotRunning` for callers that
    only ask "can I talk to it now?", with a message that does not send the user to start a second daemon."""

    def __init__(self, message: str = BUSY):
        super().__init__(message)


# The daemon answered with an error: one class on both sides of the socket (see `ProtocolError`).
DaemonError = ProtocolError


def _port_state(endpoint: str, timeout: float = 0.5) -> str:
    """"open", "refused" (nobody listens: "not running" at once instead of after a timeout) or "busy" (the connect
    timed out: a listener whose accept queue is full)."""
    url = urlparse(endpoint)
    if url.scheme != "tcp" or not url.port:
        return "open"
    try:
        with socket.create_connection((url.hostname, url.port), timeout=timeout):
            return "open"
    except socket.timeout:
        return "busy"
    except OSError:
        return "refused"


def _port_open(endpoint: str, timeout: float = 0.5) -> bool:
    """True when the daemon's port takes connections; raises `DaemonBusy` when it exists but is swamped."""
    state = _port_state(endpoint, timeout)
    if state == "busy":
        raise DaemonBusy()
    return state == "open"


def _curve_keys(info: dict) -> Optional[tuple[bytes, bytes, bytes]]:
    """(server public, client public, client secret) when the daemon requires CURVE (see `lora-daemon keys`)."""
    curve_dir = info.get("curve_dir")
    if not curve_dir:
        return None
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(str(Path(curve_dir) / "server.key"))
    client_public, client_secret = zmq.auth.load_certificate(str(Path(curve_dir) / "client.key_secret"))
    return server_public, client_public, client_secret


def _apply_curve(sock: zmq.Socket, keys: Optional[tuple[bytes, bytes, bytes]]) -> None:
    if keys:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys


class EventSubscription:
    """Live daemon events filtered by topic prefix. ``next(timeout)`` → event dict or None; iterate to follow."""

    def __init__(self, ctx: zmq.Context, endpoint: str, prefixes: tuple[str, ...], curve=None, token: str = ""):
        self._sock = ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve:
            _apply_curve(self._sock, curve)
        else:  # the daemon's PUB socket admits only subscribers that know the token (ZeroMQ PLAIN, checked by ZAP)
            self._sock.plain_username = EVENTS_USER.encode("utf-8")
            self._sock.plain_password = token.encode("utf-8")
        for prefix in prefixes:
            self._sock.setsockopt(zmq.SUBSCRIBE, prefix.encode("utf-8"))
        self._sock.connect(endpoint)

    def next(self, timeout: Optional[float] = None) -> Optional[dict]:
        if self._sock.closed:
            return None
        if not self._sock.poll(None if timeout is None else int(timeout * 1000)):
            return None
        frames = self._sock.recv_multipart()
        return decode(frames[-1], limit=1 << 30, max_depth=None)

    def __iter__(self) -> Iterator[dict]:
        while not self._sock.closed:
            event = self.next(0.5)
            if event is not None:
                yield event

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "EventSubscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DaemonClient:
    def __init__(self, home: Optional[str | os.PathLike] = None, endpoint: Optional[str] = None,
                 token: Optional[str] = None, timeout: float = 1.5, retries: int = 1, user: Optional[str] = None):
        """``user``: who this client asks for (the WebUI's signed-in user, the CLI's OS user or --user), sent with
        every request; it matters only to a daemon whose home holds a users.yaml (`lora_daemon.users`)."""
        self.home = resolve_home(home)
        self.user = user
        self._fixed_endpoint = endpoint
        self._fixed_token = token
        self.timeout = timeout
        self.retries = retries
        self._ctx = zmq.Context.instance()
        self._sock: Optional[zmq.Socket] = None
        self._info: dict = {}

    # --- connection -----------------------------------------------------------------------------------------
    def _load_info(self) -> dict:
        info = read_info(self.home) or {}
        if self._fixed_endpoint:
            info["endpoint"] = self._fixed_endpoint
        if self._fixed_token:
            info["token"] = self._fixed_token
        if not info.get("endpoint"):
            raise DaemonNotRunning()
        self._info = info
        return info

    def _connect(self) -> zmq.Socket:
        info = self._load_info()
        if not _port_open(info["endpoint"]):
            raise DaemonNotRunning()
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        _apply_curve(sock, _curve_keys(info))
        sock.connect(info["endpoint"])
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _wait_reply(self, timeout: float) -> bool:
        """Wait for the reply in slices, checking between them that the daemon's port is still open."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._sock.poll(int(min(left, LIVENESS_SLICE_S) * 1000)):
                return True
            if _port_state(self._info.get("endpoint", ""), timeout=0.2) == "refused":  # busy: keep waiting
                self._drop()
                raise DaemonNotRunning()

    def _call(self, command: str, args: dict, timeout: float) -> dict:
        attempts = 1 + (self.retries if command in READ_ONLY else 0)
        reauthed = False
        attempt = 0
        while attempt < attempts:
            attempt += 1
            if self._sock is None:
                self._sock = self._connect()
            request = make_request(command, args, token=self._info.get("token", ""), user=self.user)
            frame = encode(request)
            if len(frame) > MAX_MESSAGE_BYTES:  # the daemon would refuse it; say so without sending a megabyte
                raise DaemonError(E_TOO_LARGE, f"{command}: the request is {len(frame)} bytes; the daemon takes at "
                                               f"most {MAX_MESSAGE_BYTES}")
            self._sock.send(frame)
            if not self._wait_reply(timeout):
                self._drop()  # Lazy Pirate: a REQ socket without a reply is stuck; throw it away
                continue
            reply = decode(self._sock.recv(), limit=1 << 30, max_depth=None)  # our daemon's reply
            if reply.get("id") != request["id"]:
                self._drop()
                continue
            if reply.get("ok"):
                return reply.get("result")
            error = reply.get("error") or {}
            if error.get("code") == E_AUTH and not reauthed and not self._fixed_token:
                reauthed = True  # the daemon restarted with a new token: read daemon.json again, once
                attempt -= 1
                self._drop()
                continue
            raise DaemonError(error.get("code", "unknown"), error.get("message", "unknown error"),
                              error.get("details"))
        if not _port_open(self._info.get("endpoint", "")):
            raise DaemonNotRunning()
        if command in READ_ONLY:
            raise DaemonBusy(f"the daemon at {self._info.get('endpoint')} did not answer within "
                             f"{timeout:g} s; it may be busy or hung (see daemon.log in {self.home})")
        raise DaemonError("timeout", f"no answer to {command} within {timeout:g} s; it may still have been "
                                     f"applied — check with `lora-daemon list`")

    def request(self, command: str, **args: Any) -> Any:
        """Send one command and return the reply's ``result``; raises DaemonError or DaemonNotRunning."""
        return self._call(command, args, self.timeout)

    # --- commands -------------------------------------------------------------------------------------------
    def ping(self) -> dict:
        return self.request("ping")

    def status(self) -> dict:
        return self.request("status")

    def submit(self, config: dict | str, priority: int = 0, name: Optional[str] = None, **extra: Any) -> dict:
        """Queue a run. ``extra``: config_dir, lora_dir, adapters_dir, preferred_weight."""
        return self._call("submit", {"config": config, "priority": priority, "name": name, "cwd": os.getcwd(), **extra},
                          max(self.timeout, CONFIG_TIMEOUT_S))

    def validate(self, config: dict | str, **extra: Any) -> dict:
        return self._call("validate", {"config": config, "cwd": os.getcwd(), **extra},
                          max(self.timeout, CONFIG_TIMEOUT_S))

    def list_runs(self, all: bool = False) -> list[dict]:
        return self.request("list", all=all)["runs"]

    def get(self, run_id: str) -> dict:
        return self.request("get", run=run_id)

    def logs(self, run_id: str, tail: int = 200) -> list[str]:
        return self.request("logs", run=run_id, tail=tail)["lines"]

    def metrics(self, run_id: str, since_step: int = 0) -> list[dict]:
        return self.request("metrics", run=run_id, since_step=since_step)["metrics"]

    def cancel(self, run_id: str) -> dict:
        return self.request("cancel", run=run_id)

    def retry(self, run_id: str) -> dict:
        return self.request("retry", run=run_id)

    def resume(self, run_id: str) -> dict:
        return self.request("resume", run=run_id)

    def pause(self, run_id: str, reason: str = "user") -> dict:
        """Ask a running run to save a checkpoint and wait (``paused``) until `resume`; returns at once (pausing)."""
        return self.request("pause", run=run_id, reason=reason)

    def caption(self, folder: str, **options: Any) -> dict:
        """Queue an auto-label job (``python -m lora_core.dataset.auto_label``); ``priority``/``name`` go to the job."""
        job = {k: options.pop(k) for k in ("priority", "name") if k in options}
        return self._call("caption", {"folder": folder, "cwd": os.getcwd(), "options": options, **job},
                          max(self.timeout, CONFIG_TIMEOUT_S))

    def check(self, folder: str, timeout: float = SLOW_TIMEOUT_S, **options: Any) -> dict:
        return self._call("check", {"folder": folder, "cwd": os.getcwd(), **options}, timeout)

    def captions_get(self, folder: str, timeout: float = SLOW_TIMEOUT_S, **options: Any) -> dict:
        return self._call("captions.get", {"folder": folder, "cwd": os.getcwd(), **options}, timeout)

    def captions_set(self, folder: str, file: str, caption: str, timeout: float = SLOW_TIMEOUT_S,
                     **options: Any) -> dict:
        return self._call("captions.set", {"folder": folder, "file": file, "caption": caption, "cwd": os.getcwd(),
                                           **options}, timeout)

    def captions_edit(self, folder: str, op: str, params: Optional[dict] = None, timeout: float = SLOW_TIMEOUT_S,
                      **options: Any) -> dict:
        return self._call("captions.edit", {"folder": folder, "op": op, "params": params or {},
                                            "cwd": os.getcwd(), **options}, timeout)

    def plan(self, config: dict | str, timeout: float = SLOW_TIMEOUT_S, **extra: Any) -> dict:
        return self._call("plan", {"config": config, "cwd": os.getcwd(), **extra}, timeout)

    def recommend(self, folder: str, base_model: Optional[str] = None, kind: Optional[str] = None,
                  optimizer: Optional[str] = None, timeout: float = SLOW_TIMEOUT_S) -> dict:
        """Recommended settings for a dataset (`lora_core.recommend`), adjusted for this user's rated runs."""
        args = {"folder": folder, "cwd": os.getcwd(), "base_model": base_model, "kind": kind, "optimizer": optimizer}
        return self._call("recommend", {k: v for k, v in args.items() if v is not None}, timeout)

    def rate(self, run_id: str, rating: Optional[str]) -> dict:
        """👍 ``up`` / 👎 ``down`` on a run (None clears it); recommend learns from it."""
        return self.request("rate", run=run_id, rating=rating)

    def tools(self, command: str, **args: Any) -> dict:
        """Queue a LoRA-toolbox job: ``merge`` (loras=[{path, weight}], out, rank), ``bake`` (base, loras, out,
        precision), ``resize`` (file, out, rank | dynamic+param), ``extract`` (tuned, base, out, rank, conv_rank).
        Bare file names mean the daemon's Lora folder (LoRAs) or checkpoint folder (models); it runs like a run."""
        return self._call("tools", {"command": command, **args}, SLOW_TIMEOUT_S)

    def tools_inspect(self, path: str, timeout: float = SLOW_TIMEOUT_S) -> dict:
        """`lora-tools inspect` of a file in the daemon's folders: family, adapter, rank/alpha, training metadata."""
        return self._call("tools.inspect", {"path": path}, timeout)

    def run_events(self, run_id: str, last: int = 50, types: Optional[list[str]] = None) -> list[dict]:
        """The run's stored events (queued, started, checkpoints, samples, published, finished …), the last `last`."""
        return self.request("run.events", run=run_id, last=last, types=types)["events"]

    def shutdown(self) -> dict:
        return self.request("shutdown")

    def queue(self) -> dict:
        """The queue in the order it will run, each waiting run with why (fair share, a limit, memory)."""
        return self.request("queue")

    def whoami(self) -> dict:
        """Who the daemon takes this client for: user, role and the role's limits (users.yaml), and its GPU time."""
        return self.request("whoami")

    def subscribe(self, prefixes: tuple[str, ...] = ("run.", "lora.")) -> EventSubscription:
        info = self._load_info()
        if not info.get("events") or not _port_open(info["events"]):
            raise DaemonNotRunning()
        return EventSubscription(self._ctx, info["events"], tuple(prefixes), _curve_keys(info),
                                 token=info.get("token", ""))

