"""The daemon process: a ROUTER socket for requests, a PUB socket for live events, workers, and the store.

One thread (this one) owns both sockets and answers every request; anything slow (config validation, submits,
dataset checks, plans) runs in a thread pool and its reply comes back over an inproc pipe, so no request can block
another and `status` always answers at once. Every frame is checked
before it is trusted: size, JSON, version, token, command, arguments. A bad frame gets an error reply when it can be
answered at all and never raises out of the loop.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import queue as queue_module
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import zmq

from . import __version__, core_bridge, procs, states, tools_job
from .bus import Bus
from .gpus import detect_slots
from .home import INFO_FILE, make_private_dir, private_file, read_info, write_private_json
from . import fair
from .gpus import device_memory
from .users import Caller, Refused, Role, UsersFile, UsersFileError, check_submit, limits_text
from .protocol import (E_AUTH, E_BAD_JSON, E_BAD_REQUEST, E_CONFIG, E_FORBIDDEN, E_INTERNAL, E_NOT_FOUND, E_STATE, E_TOO_LARGE,
                       E_UNKNOWN_COMMAND, E_VERSION, EVENTS_USER, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError, encode,
                       error_reply, ok_reply, parse_request, request_id_of)
from .queue import (CAPTION_EXTENSIONS, caption_job, inside, new_record, new_run_id, package_versions,
                    parse_priority, parse_submission, resolve_config, write_snapshot)
from .store import EVERYONE, NotFound, Store
from .worker import Settings, Worker, prepare_retry, reconcile, tail_lines

log = logging.getLogger(__name__)

EVENTS_INPROC = "inproc://lora-daemon-events"
REPLIES_INPROC = "inproc://lora-daemon-replies"
# Anything that may take longer than a database read runs in a pool: config work (YAML parsing, validation, file
# headers: tens of ms) in its own, so a submit never waits behind a minutes-long child of the other (dataset tools,
# plans, the captioner list).
CONFIG_COMMANDS = ("validate", "submit", "caption", "tools")
SLOW_COMMANDS = CONFIG_COMMANDS + ("check", "captions.get", "captions.set", "captions.edit", "plan", "tools.inspect",
                                   "recommend")
RATINGS = ("up", "down")  # 👍 / 👎 on a run (`rate`), which `recommend` learns from
CAPTIONERS_MAX_AGE_S = 60.0  # `status` re-asks the engine after this long, so weights put in place later show up
HANDSHAKE_IVL_MS = 5000  # a TCP connection that has not finished the ZeroMQ handshake by then is closed
LISTEN_BACKLOG = 1024  # pending TCP connections the OS keeps for us while the loop is busy (libzmq's default: 100)
LOG_EVERY_S = 60.0  # refused frames are logged at most once a minute per peer address, with a count
MAX_LOGGED_PEERS = 1024


# Refusals an honest client never causes: logged (rate-limited) as a sign of a bad or hostile peer.
REFUSALS = (E_AUTH, E_BAD_JSON, E_TOO_LARGE, E_VERSION, E_UNKNOWN_COMMAND)


def _peer(frame: zmq.Frame) -> str:
    try:
        return frame.get("Peer-Address") or "?"
    except zmq.ZMQError:
        return "?"


def raise_open_files_limit() -> None:
    """POSIX: lift the soft open-files limit to the hard one, so a flood of connections cannot use up our file
    descriptors (each pending TCP connection holds one) before the handshake interval drops them."""
    if sys.platform == "win32":  # Windows: no such per-process limit on sockets
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.info("could not raise the open-files limit from %d: %s", soft, e)


class PeerLog:
    """Rate-limited logging of refused frames: at most one line per peer per `every` seconds, however many frames.

    Why: an unauthenticated client can send thousands of bad frames a second; one traceback each would fill the
    disk. The line says how many were refused since the last one, so nothing is hidden.
    """

    def __init__(self, every: float = LOG_EVERY_S, max_peers: int = MAX_LOGGED_PEERS):
        self.every = every
        self.max_peers = max_peers
        self._peers: dict[str, tuple[float, int]] = {}  # peer -> (time of its last logged line, refused since)

    def refused(self, peer: str, what: str, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, count = self._peers.get(peer, (-self.every, 0))
        if now - last < self.every:
            self._peers[peer] = (last, count + 1)
            return
        if len(self._peers) >= self.max_peers:
            self._peers.clear()  # bounded memory: forgetting peers only means one more line each
        self._peers[peer] = (now, 0)
        more = f" (and {count} more since the last line)" if count else ""
        log.warning("refused a request from %s: %s%s", peer, what[:300], more, exc_info=exc_info)


class Deferred:
    """A slow command's answer that must be finished on the server thread (e.g. queueing, so `run.queued` is
    published before any worker's `run.started`)."""

    def __init__(self, finish: Callable[[], Any]):
        self.finish = finish


class DaemonStartError(RuntimeError):
    """The daemon refuses to start: unsafe bind, already running, unusable state folder."""


@dataclass
class DaemonOptions:
    home: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port, published in daemon.json
    events_port: int = 0
    lora_dir: Optional[Path] = None
    adapters_dir: Optional[Path] = None
    checkpoint_dir: Optional[Path] = None  # where `tools` bake/extract read and write checkpoints
    gpus: Optional[str] = None
    grace_s: float = 60.0
    max_attempts: int = 3
    curve_dir: Optional[Path] = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    slow_timeout_s: float = 300.0
    allow_pickle: bool = False  # --allow-pickle: configs over the protocol may set model.allow_pickle
    max_per_device: int = 1  # --max-per-device: runs one device may run at once when their memory plans fit
    device_memory_mb: Optional[str] = None  # --device-memory-mb: '24000' or '0=80000,1=24000' (else nvidia-smi)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Daemon:
    def __init__(self, options: DaemonOptions):
        self.options = options
        self.home = options.home
        make_private_dir(self.home)
        if not is_loopback(options.host) and options.curve_dir is None:
            raise DaemonStartError(f"--host {options.host}: binding beyond this machine needs CURVE keys "
                                   f"(`lora-daemon keys DIR`, then --curve-dir DIR); the token alone travels in "
                                   f"clear text")
        self.settings = Settings(home=self.home,
                                 lora_dir=Path(options.lora_dir or self.home / "Lora").resolve(),
                                 adapters_dir=Path(options.adapters_dir or self.home / "adapters").resolve(),
                                 grace_s=options.grace_s, max_attempts=options.max_attempts)
        self.runs_dir = self.home / "runs"
        self.token = secrets.token_urlsafe(32)
        self.started_at = time.time()
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.workers: list[Worker] = []
        self.store: Optional[Store] = None
        self.bus: Optional[Bus] = None
        self.ctx: Optional[zmq.Context] = None
        self._reply_local = threading.local()
        self._reply_socks: list[zmq.Socket] = []
        self._reply_lock = threading.Lock()
        self._finished: queue_module.SimpleQueue = queue_module.SimpleQueue()  # (envelope, id, Deferred) to finish
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="slow")
        self._config_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="config")
        self._peer_log = PeerLog()
        self._auth = None
        self.captioners: Optional[list[dict]] = None  # asked of the engine in a child: the daemon never imports it
        self.users_file: Optional[UsersFile] = None  # users.yaml in the home: a daemon a team shares
        self._caller = threading.local()  # who the request being handled in this thread is from
        self.devices: list[fair.Device] = []
        self._captioners_asked = 0.0
        self.handlers: dict[str, Callable[[dict], Any]] = {
            "ping": self.cmd_ping, "status": self.cmd_status, "submit": self.cmd_submit,
            "validate": self.cmd_validate, "list": self.cmd_list, "get": self.cmd_get, "logs": self.cmd_logs,
            "metrics": self.cmd_metrics, "cancel": self.cmd_cancel, "retry": self.cmd_retry,
            "resume": self.cmd_resume, "pause": self.cmd_pause, "caption": self.cmd_caption,
            "shutdown": self.cmd_shutdown,
            "check": self._dataset_tool("check"), "captions.get": self._dataset_tool("captions.get"),
            "captions.set": self._dataset_tool("captions.set"), "captions.edit": self._dataset_tool("captions.edit"),
            "plan": self.cmd_plan, "run.events": self.cmd_run_events,
            "recommend": self.cmd_recommend, "rate": self.cmd_rate,
            "tools": self.cmd_tools, "tools.inspect": self.cmd_tools_inspect,
            "queue": self.cmd_queue, "whoami": self.cmd_whoami,
        }

    # --- start / stop ---------------------------------------------------------------------------------------
    def _refuse_second_instance(self) -> None:
        info = read_info(self.home)
        if info and procs.same_process(info.get("pid"), info.get("create_time")) and info.get("pid") != os.getpid():
            raise DaemonStartError(f"a daemon is already running for {self.home} (pid {info['pid']}, "
                                   f"{info.get('endpoint')}); `lora-daemon stop` it first")

    def _secure(self, sock: zmq.Socket) -> None:
        if self.options.curve_dir is None:
            return
        import zmq.auth

        public, secret = zmq.auth.load_certificate(str(Path(self.options.curve_dir) / "server.key_secret"))
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    def _start_auth(self) -> None:
        """ZAP: with CURVE, only authorised client keys; without, the event socket takes only the token (PLAIN)."""
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("lora_daemon.zap"))
        self._auth.start()
        if self.options.curve_dir is not None:
            self._auth.configure_curve(domain="*", location=str(Path(self.options.curve_dir) / "authorized"))
        else:
            self._auth.configure_plain(domain="*", passwords={EVENTS_USER: self.token})

    def _limit(self, sock: zmq.Socket) -> None:
        """Bound what a flood of half-open connections costs: each is dropped after the handshake interval."""
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)

    def _bind(self, sock: zmq.Socket, port: int) -> int:
        host = self.options.host
        if port:
            sock.bind(f"tcp://{host}:{port}")
            return port
        return sock.bind_to_random_port(f"tcp://{host}")

    def start(self) -> dict:
        """Bind, write daemon.json, settle what a dead daemon left behind, start the workers."""
        self._refuse_second_instance()
        if not 1 <= self.options.max_per_device <= 8:
            raise DaemonStartError(f"--max-per-device: 1 to 8 runs per device, got {self.options.max_per_device}")
        try:
            self.users_file = UsersFile(self.home)
        except UsersFileError as e:
            raise DaemonStartError(f"users.yaml is not valid:\n{e}") from None
        raise_open_files_limit()
        self.store = Store(private_file(self.home / "runs.db"))
        self.ctx = zmq.Context()
        self._start_auth()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # A hard cap in libzmq too: a peer sending far more than the limit is dropped before we buffer it.
        self.router.setsockopt(zmq.MAXMSGSIZE, self.options.max_message_bytes * 4)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._limit(self.router)
        self._secure(self.router)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 500)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self._limit(self.pub)
        if self.options.curve_dir is None:
            self.pub.plain_server = True  # subscribers log in with the token; ZAP (`_start_auth`) checks it
        self._secure(self.pub)
        port = self._bind(self.router, self.options.port)
        events_port = self._bind(self.pub, self.options.events_port)
        self.events_pull = self.ctx.socket(zmq.PULL)
        self.events_pull.bind(EVENTS_INPROC)
        self.replies_pull = self.ctx.socket(zmq.PULL)
        self.replies_pull.bind(REPLIES_INPROC)
        self.bus = Bus(self.ctx, EVENTS_INPROC, self.store)
        self.bus.attach(lambda frames: self.pub.send_multipart(frames))
        self.slots = detect_slots(self.options.gpus)
        try:
            memory = device_memory(self.slots, self.options.device_memory_mb)
        except ValueError as e:
            raise DaemonStartError(str(e)) from None
        self.devices = [fair.Device(slot, self.options.max_per_device, memory.get(slot)) for slot in self.slots]
        self.settings.requeue_oom_solo = self.options.max_per_device > 1
        shown_host = "127.0.0.1" if self.options.host in ("0.0.0.0", "localhost") else self.options.host
        self.info = {
            "endpoint": f"tcp://{shown_host}:{port}", "events": f"tcp://{shown_host}:{events_port}",
            "token": self.token, "pid": os.getpid(), "create_time": procs.create_time(os.getpid()),
            "version": __version__, "protocol": PROTOCOL_VERSION, "started_at": self.started_at,
            "home": str(self.home), "curve_dir": str(self.options.curve_dir) if self.options.curve_dir else None,
        }
        write_private_json(self.home / INFO_FILE, self.info)
        self.workers = [Worker(device.slot, self.store, self.bus, self.settings, self.wake, self.stopping,
                               device=device, role_of=self._role_of, index=i)
                        for device in self.devices for i in range(device.max_jobs)]
        # Settling runs a dead daemon left behind may wait for an orphaned child to checkpoint: do it beside the
        # request loop, so clients get answers meanwhile, and start the workers only after it.
        self._reconciler = threading.Thread(target=self._reconcile_then_work, name="reconcile", daemon=True)
        self._reconciler.start()
        self._ask_captioners()
        log.info("lora-daemon %s listening on %s (events %s), home %s, slots %s", __version__,
                 self.info["endpoint"], self.info["events"], self.home, ",".join(self.slots))
        return self.info

    def _reconcile_then_work(self) -> None:
        try:
            settled = reconcile(self.store, self.bus, self.settings)
            if settled:
                log.info("settled %d runs left by a previous daemon", len(settled))
        except Exception:
            log.exception("could not settle the runs of the previous daemon; they stay as they are")
        for worker in self.workers:
            if not self.stopping.is_set():
                worker.start()

    def _ask_captioners(self) -> None:
        """Refresh `captioners` in the background: one short child (`core_bridge`), never in the request loop."""
        self._captioners_asked = time.monotonic()
        self._pool.submit(self._learn_captioners)

    def _learn_captioners(self) -> None:
        try:
            self.captioners = core_bridge.run_op("captioners", {}, self.home, timeout=60.0)
        except core_bridge.BridgeError as e:
            log.warning("could not list the engine's captioners: %s", e)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.events_pull, zmq.POLLIN)
        poller.register(self.replies_pull, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                for sock, _ in poller.poll(200):
                    if sock is self.router:
                        self._serve_one()
                    else:
                        self._drain()
        finally:
            self._shutdown()

    def request_stop(self, *_: Any) -> None:
        """Signal handler and `shutdown` command: running children save a checkpoint, then everything exits."""
        self.stopping.set()
        self.wake.set()

    def _shutdown(self) -> None:
        log.info("stopping: asking running jobs to save a checkpoint")
        self.bus.emit("daemon.stopping", None)
        for worker in [self._reconciler, *self.workers]:
            while worker.is_alive():
                worker.join(0.1)
                self._drain()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._config_pool.shutdown(wait=True, cancel_futures=True)
        self._drain()
        info = read_info(self.home)
        if info and info.get("pid") == os.getpid():
            (self.home / INFO_FILE).unlink(missing_ok=True)
        self.bus.close()
        with self._reply_lock:
            for sock in self._reply_socks:
                sock.close()
        for sock in (self.router, self.pub, self.events_pull, self.replies_pull):
            sock.close(linger=500)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()
        self.store.close()
        log.info("stopped")

    # --- the request loop -----------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Forward what other threads queued for this one: events to the PUB socket, slow replies to their clients
        (a `Deferred` reply is finished here first)."""
        for sock, forward in ((self.events_pull, self.pub.send_multipart), (self.replies_pull, self._send)):
            # (a one-frame message on the replies pipe is a doorbell for `_finished`, not a reply)
            while True:
                try:
                    forward(sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        while True:
            try:
                envelope, request_id, deferred = self._finished.get_nowait()
            except queue_module.Empty:
                return
            try:
                reply = self._answer(request_id, lambda _: deferred.finish(), {})
            except Exception as e:  # e.g. the database is locked: answer, and keep the loop alive
                log.exception("finishing a request failed")
                reply = error_reply(request_id, E_INTERNAL, f"internal error: {type(e).__name__}: {e}")
            self._send(envelope + [encode(reply)])

    def _send(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        try:
            self.router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the peer left, or its queue is full: the reply is dropped, the daemon goes on
            log.debug("reply not delivered: %s", e)

    def _serve_one(self) -> None:
        try:
            zframes = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        frames = [f.bytes for f in zframes]
        if len(frames) < 2:
            return  # no payload after the identity: nothing to answer
        envelope, payload = frames[:-1], frames[-1]
        if len(envelope) > 2 or any(len(f) > 256 for f in envelope[1:]):
            return  # not a REQ/DEALER envelope we produced; a reply could not be routed back meaningfully
        try:
            reply = self._dispatch(envelope, payload)
        except Exception as e:  # last line of defence: a bug answers with an error, the loop keeps going
            self._peer_log.refused(_peer(zframes[-1]), f"internal error {type(e).__name__}", exc_info=True)
            reply = error_reply(request_id_of(payload), E_INTERNAL, f"internal error: {type(e).__name__}: {e}")
        if reply is not None:
            if not reply.get("ok") and reply["error"]["code"] in REFUSALS:
                self._peer_log.refused(_peer(zframes[-1]), f"{reply['error']['code']}: {reply['error']['message']}")
            self._send(envelope + [encode(reply)])

    def _dispatch(self, envelope: list[bytes], payload: bytes) -> Optional[dict]:
        if len(payload) > self.options.max_message_bytes:
            return error_reply("", E_TOO_LARGE, f"message is {len(payload)} bytes; the limit is "
                                                f"{self.options.max_message_bytes}")
        try:
            req = parse_request(payload, self.options.max_message_bytes)
        except ProtocolError as e:
            return error_reply(request_id_of(payload), e.code, e.message, e.details)
        if not hmac.compare_digest(req.token.encode("utf-8"), self.token.encode("utf-8")):
            return error_reply(req.id, E_AUTH, "wrong or missing token: read it from daemon.json in the daemon's "
                                               "home folder")
        handler = self.handlers.get(req.command)
        if handler is None:
            return error_reply(req.id, E_UNKNOWN_COMMAND, f"command: unknown command {req.command[:64]!r}; "
                                                          f"one of {', '.join(self.handlers)}")
        try:
            caller = self._caller_of(req.user)
        except Refused as e:
            if req.command not in ("ping", "status"):
                return error_reply(req.id, E_FORBIDDEN, str(e))
            caller = Caller(req.user, Role("unknown"))
        handler = self._as(caller, handler)
        if req.command in SLOW_COMMANDS:
            pool = self._config_pool if req.command in CONFIG_COMMANDS else self._pool
            pool.submit(self._run_slow, envelope, req.id, handler, req.args)
            return None
        return self._answer(req.id, handler, req.args)

    def _answer(self, request_id: str, handler: Callable[[dict], Any], args: dict) -> dict:
        try:
            return ok_reply(request_id, handler(args))
        except ProtocolError as e:
            return error_reply(request_id, e.code, e.message, e.details)
        except NotFound as e:
            return error_reply(request_id, E_NOT_FOUND, str(e))
        except states.TransitionError as e:
            return error_reply(request_id, E_STATE, str(e))
        except core_bridge.BridgeError as e:
            return error_reply(request_id, E_BAD_REQUEST, str(e))

    def _run_slow(self, envelope: list[bytes], request_id: str, handler: Callable[[dict], Any], args: dict) -> None:
        try:
            reply = self._answer(request_id, handler, args)
        except Exception as e:
            log.exception("slow request failed")
            reply = error_reply(request_id, E_INTERNAL, f"internal error: {type(e).__name__}: {e}")
        if reply.get("ok") and isinstance(reply["result"], Deferred):
            self._finished.put((envelope, request_id, reply["result"]))
            envelope, reply = [], None  # only a doorbell: the server thread finishes and answers
        sock = getattr(self._reply_local, "sock", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.connect(REPLIES_INPROC)
            self._reply_local.sock = sock
            with self._reply_lock:
                self._reply_socks.append(sock)
        sock.send_multipart(envelope + [encode(reply)] if reply is not None else [b""])

    # --- users (users.yaml: a daemon a team shares) ---------------------------------------------------------
    def _caller_of(self, user: Optional[str]) -> Caller:
        """Who a request is from. Without users.yaml everyone is the one owner (no filters, no limits); with it,
        the user's role, refusing a user the file does not know (`users.Users.role_of`)."""
        users = self.users_file.users if self.users_file is not None else None
        if users is None:
            return Caller(user)
        return Caller(user, users.role_of(user))

    def _as(self, caller: Caller, handler: Callable[[dict], Any]) -> Callable[[dict], Any]:
        """The handler run as `caller` (kept per thread: slow commands run in pool threads)."""
        def run(args: dict) -> Any:
            self._caller.value = caller
            try:
                return handler(args)
            finally:
                self._caller.value = None
        return run

    @property
    def caller(self) -> Caller:
        return getattr(self._caller, "value", None) or Caller(None)

    def _scope(self) -> Any:
        """Whose runs the caller sees: everyone's (admin, or no users.yaml), else only their own."""
        return EVERYONE if self.caller.sees_all else self.caller.user

    def _role_of(self, user: Optional[str]) -> Optional[Role]:
        """A user's role for the scheduler's limits (None: no users.yaml, or a user it no longer lists)."""
        users = self.users_file.users if self.users_file is not None else None
        if users is None:
            return None
        try:
            return users.role_of(user)
        except Refused:
            return None

    def _user_dir(self, root: Path, user: Optional[str]) -> Path:
        """Per-user folders on a shared daemon (``runs/<user>/``); one person's daemon keeps today's layout."""
        users = self.users_file.users if self.users_file is not None else None
        return root / user if users is not None and user else root

    def _admit(self, record: dict) -> None:
        """On the server thread, just before queueing (so two submits cannot both pass a limit): the caller's
        name on the run, and the role's limits checked (`users.check_submit`), the refusal naming the limit."""
        caller = record.pop("_caller", None) or Caller(None)
        record["user"] = caller.user
        if self.users_file is None or self.users_file.users is None:
            return
        queued = self.store.count_user(caller.user, states.QUEUED)
        used = self.store.queue_state().used_s.get(caller.user or "", 0.0)
        cfg = record["config"] if record["kind"] in ("image", "text") else None
        try:
            check_submit(caller.role, caller.user, cfg, record["priority"], queued, used)
        except Refused as e:
            shutil.rmtree(record["run_dir"], ignore_errors=True)
            raise ProtocolError(E_FORBIDDEN, str(e)) from None

    def _user_publish(self, publish: dict, cfg: dict) -> None:
        """Published LoRAs of a shared daemon's users kept apart: ``<Lora>/<user>/`` (A1111 and Forge show
        subfolders in the Lora tab) or, with ``publish: prefix``, ``<user>_<name>``."""
        users = self.users_file.users if self.users_file is not None else None
        user = self.caller.user
        if users is None or not user:
            return
        if users.publish == "prefix":
            name = cfg["output"]["output_name"]
            if not name.startswith(f"{user}_"):
                cfg["output"]["output_name"] = f"{user}_{name}"
            return
        for key in ("lora_dir", "adapters_dir"):
            base = Path(publish.get(key) or getattr(self.settings, key))
            publish[key] = str(base / user)

    def cmd_whoami(self, args: dict) -> dict:
        caller = self.caller
        users = self.users_file.users if self.users_file is not None else None
        used = self.store.queue_state().used_s.get(caller.user or "", 0.0)
        return {"user": caller.user, "shared": users is not None, "role": caller.role.name if users else None,
                "admin": caller.sees_all, "limits": limits_text(caller.role) if users else "no users.yaml: no limits",
                "gpu_hours_today": round(used / 3600, 4),
                "queued": self.store.count_user(caller.user, states.QUEUED) if users else self.store.count(states.QUEUED)}

    def cmd_queue(self, args: dict) -> dict:
        """The queue in the order the scheduler takes it (`fair.explain`), each run with why it waits; on a
        shared daemon a non-admin sees others' runs only as their user, priority and position."""
        queued = self.store.runs_in((states.QUEUED,))
        state = self.store.queue_state(self._role_of)
        rows = fair.explain(queued, state, self.devices)
        if not self.caller.sees_all:
            for row in rows:
                if row["user"] != self.caller.user:
                    row.update(id=None, name="(another user's run)")
        running = [{"id": r["id"] if self.caller.may_see(r) else None, "user": r.get("user"),
                    "device": r.get("device"), "status": r["status"], "memory_mb": fair.memory_of(r),
                    "name": r["name"] if self.caller.may_see(r) else "(another user's run)"} for r in state.active]
        return {"queue": rows, "running": running, "policy": "fair share by device time within a priority",
                "devices": [{"slot": d.slot, "max_jobs": d.max_jobs, "memory_mb": d.memory_mb} for d in self.devices],
                "gpu_hours_today": {u or "(owner)": round(s / 3600, 4) for u, s in state.used_s.items()}
                if self.caller.sees_all else {}}

    # --- commands -------------------------------------------------------------------------------------------
    def _run_ref(self, args: dict) -> dict:
        ref = args.get("run")
        if not isinstance(ref, str) or not ref or len(ref) > 128:
            raise ProtocolError(E_BAD_REQUEST, "run: give a run id")
        return self.store.find_run(ref, user=self._scope())

    def cmd_ping(self, args: dict) -> dict:
        return {"pong": True, "version": __version__, "pid": os.getpid(), "time": time.time()}

    def cmd_status(self, args: dict) -> dict:
        """Daemon, devices, queue, and the engine's captioners (null for the moment after start, until known)."""
        busy: dict[str, list[str]] = {}
        for w in self.workers:
            if w.current:
                busy.setdefault(w.slot, []).append(w.current)
        if not self.caller.sees_all:  # another user's run is only "busy"
            mine = {r["id"] for r in self.store.runs_in(states.ACTIVE) if self.caller.may_see(r)}
            busy = {slot: [r if r in mine else "(another user's run)" for r in ids] for slot, ids in busy.items()}
        if time.monotonic() - self._captioners_asked > CAPTIONERS_MAX_AGE_S and not self.stopping.is_set():
            self._ask_captioners()
        return {
            "version": __version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1), "started_at": self.started_at,
            "endpoint": self.info["endpoint"], "events": self.info["events"], "home": str(self.home),
            "lora_dir": str(self.settings.lora_dir), "adapters_dir": str(self.settings.adapters_dir),
            "checkpoint_dir": str(self._tool_folders().checkpoint_dir),
            "gpus": [{"slot": d.slot, "run_id": (busy.get(d.slot) or [None])[0],
                      **({"run_ids": busy.get(d.slot, []), "max_jobs": d.max_jobs, "memory_mb": d.memory_mb}
                         if d.max_jobs > 1 or d.memory_mb is not None else {})} for d in self.devices],
            "user": self.caller.user, "shared": bool(self.users_file and self.users_file.users),
            "queue_length": self.store.count(states.QUEUED),
            "running": len(self.store.runs_in(states.ACTIVE)), "host": socket.gethostname(),
            "captioners": self.captioners,
        }

    def _publish_targets(self, args: dict) -> dict:
        """Per-submit publish folders, each confined to the folder the daemon was started with for that kind."""
        targets = {}
        for key in ("lora_dir", "adapters_dir"):
            value = args.get(key)
            if value is not None:
                if not isinstance(value, str) or not value or "\0" in value:
                    raise ProtocolError(E_BAD_REQUEST, f"{key}: must be a folder path")
                folder = Path(value).expanduser().resolve()
                allowed = getattr(self.settings, key)
                if not inside(folder, allowed):
                    raise ProtocolError(E_BAD_REQUEST, f"{key}: {folder} is outside the folder this daemon publishes "
                                                       f"to ({allowed}); start the daemon with --{key.replace('_', '-')} "
                                                       f"{folder} to publish there")
                targets[key] = str(folder)
        weight = args.get("preferred_weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -10 <= weight <= 10:
                raise ProtocolError(E_BAD_REQUEST, f"preferred_weight: must be a number, got {weight!r}")
            targets["preferred_weight"] = float(weight)
        return targets

    def _resolve(self, args: dict, output_dir: Path):
        """The submission checked and its config validated (schema, then the engine's preflight), in a pool thread."""
        sub = parse_submission(args)
        return sub, resolve_config(sub.config, sub.base_dir, output_dir, sub.name,
                                   allow_pickle=self.options.allow_pickle)

    def cmd_validate(self, args: dict) -> dict:
        try:
            _, cfg = self._resolve(args, self.runs_dir / "(new run)" / "output")
        except ProtocolError as e:
            if e.code != E_CONFIG:
                raise
            return {"ok": False, "problems": e.details["problems"], "config": None}
        return {"ok": True, "problems": [], "config": cfg}

    def cmd_submit(self, args: dict) -> Deferred:
        run_id = new_run_id()
        publish = self._publish_targets(args)
        runs_dir = self._user_dir(self.runs_dir, self.caller.user)
        sub, cfg = self._resolve(args, runs_dir / run_id / "output")
        kind = "text" if cfg["model"]["task_type"] == "text-generation" else "image"
        self._user_publish(publish, cfg)
        record = new_record(run_id, runs_dir, kind, sub.name or cfg["output"]["output_name"], cfg,
                            sub.priority, publish, package_versions())
        record["_caller"] = self.caller
        write_snapshot(record)
        if args.get("dedupe"):
            return Deferred(lambda: self._enqueue_once(record))
        return Deferred(lambda: self._enqueue(record))

    def _enqueue_once(self, record: dict) -> dict:
        """Submit with ``dedupe`` (the tab's Start): a queued or running run with the same settings, name and
        publish target is answered (``duplicate: true``) instead of queueing its twin — a double click, or a click
        again while the first is pending. Runs on the server thread, so two such submits cannot both queue."""
        for run in self.store.runs_in((states.QUEUED, states.RUNNING)):
            if (run["kind"], run["config_hash"], run["name"], run.get("publish") or {}) == \
                    (record["kind"], record["config_hash"], record["name"], record["publish"]) and \
                    run["config"]["output"].get("output_name") == record["config"]["output"].get("output_name"):
                shutil.rmtree(record["run_dir"], ignore_errors=True)
                return {**run, "duplicate": True}
        return self._enqueue(record)

    def _enqueue(self, record: dict) -> dict:
        self._admit(record)
        run = self.store.insert_run(record)
        self.bus.emit("run.queued", run["id"], name=run["name"], kind=run["kind"], priority=run["priority"],
                      user=run.get("user"))
        if self.options.max_per_device > 1 and run["kind"] in ("image", "text") and not run.get("plan"):
            self._pool.submit(self._plan_ahead, run["id"])
        self.wake.set()
        return run

    def _plan_ahead(self, run_id: str) -> None:
        """Packing several runs on a device needs each one's memory plan before it starts: work it out in a child
        while the run waits (the run then skips its own plan-first phase). A failed plan only means the run starts
        on an idle device."""
        try:
            run = self.store.get_run(run_id)
            if run["status"] != states.QUEUED or run.get("plan"):
                return
            plan = core_bridge.run_plan(Path(run["run_dir"]) / "config.yaml", self.home, self.options.slow_timeout_s)
        except (core_bridge.BridgeError, NotFound, OSError) as e:
            log.warning("run %s: no memory plan ahead of its start: %s", run_id, e)
            return
        if isinstance(plan, dict) and self.store.get_run(run_id)["status"] == states.QUEUED:
            self.store.update_run(run_id, plan=plan)
            self.bus.emit("run.plan", run_id, plan=plan)
            self.wake.set()

    def cmd_caption(self, args: dict) -> Deferred:
        options = {k: v for k, v in args.items() if k not in ("folder", "priority", "name", "cwd", "options")}
        extra = args.get("options") or {}
        if not isinstance(extra, dict):
            raise ProtocolError(E_BAD_REQUEST, "options: must be a mapping")
        options.update(extra)
        job = caption_job(args.get("folder"), options, args.get("cwd"))
        priority = parse_priority(args)
        run_id = new_run_id()
        name = args.get("name") if isinstance(args.get("name"), str) else f"caption {Path(job['folder']).name}"
        record = new_record(run_id, self._user_dir(self.runs_dir, self.caller.user), "caption", name[:200], job,
                            priority)
        record["_caller"] = self.caller
        Path(record["run_dir"]).mkdir(parents=True, exist_ok=True)
        return Deferred(lambda: self._enqueue(record))

    def _tool_folders(self) -> tools_job.Folders:
        checkpoint_dir = Path(self.options.checkpoint_dir or self.home / "Stable-diffusion").resolve()
        return tools_job.Folders(self.settings.lora_dir, checkpoint_dir, self.home)

    def cmd_tools(self, args: dict) -> Deferred:
        """A LoRA-toolbox job (merge, bake, resize, extract), queued and run like a training run: its paths are
        confined to the Lora, checkpoint and home folders and its command line built from checked values."""
        job = tools_job.tool_job(args, self._tool_folders())
        Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
        name = args.get("name") if isinstance(args.get("name"), str) else \
            f"{job['command']} {Path(job['output']).name}"
        record = new_record(new_run_id(), self._user_dir(self.runs_dir, self.caller.user), "tools", name[:200], job,
                            parse_priority(args))
        record["_caller"] = self.caller
        Path(record["run_dir"]).mkdir(parents=True, exist_ok=True)
        return Deferred(lambda: self._enqueue(record))

    def cmd_tools_inspect(self, args: dict) -> Any:
        """`lora-tools inspect` of one file in the daemon's folders, in a child (the daemon never loads torch)."""
        path = tools_job.inspect_path(args, self._tool_folders())
        return core_bridge.run_op("tools.inspect", {"path": path}, self.home, self.options.slow_timeout_s)

    def cmd_list(self, args: dict) -> dict:
        return {"runs": self.store.list_runs(include_all=bool(args.get("all")), user=self._scope())}

    def cmd_get(self, args: dict) -> dict:
        return self._run_ref(args)

    def cmd_logs(self, args: dict) -> dict:
        run = self._run_ref(args)
        tail = args.get("tail", 200)
        if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail <= 100_000:
            raise ProtocolError(E_BAD_REQUEST, f"tail: must be a whole number between 0 and 100000, got {tail!r}")
        return {"run_id": run["id"], "lines": tail_lines(Path(run["run_dir"]) / "train.log", tail)}

    def cmd_run_events(self, args: dict) -> dict:
        """A run's stored events, oldest first: the last `last` of them (optionally only some `types`)."""
        run = self._run_ref(args)
        last = args.get("last", 50)
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= 10_000:
            raise ProtocolError(E_BAD_REQUEST, f"last: must be a whole number between 1 and 10000, got {last!r}")
        types = args.get("types")
        if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
            raise ProtocolError(E_BAD_REQUEST, "types: must be a list of event types, e.g. [\"run.checkpoint\"]")
        return {"run_id": run["id"], "events": self.store.events(run["id"], types, last=last)}

    def cmd_metrics(self, args: dict) -> dict:
        run = self._run_ref(args)
        since = args.get("since_step", 0)
        if isinstance(since, bool) or not isinstance(since, int):
            raise ProtocolError(E_BAD_REQUEST, f"since_step: must be a whole number, got {since!r}")
        return {"run_id": run["id"], "metrics": self.store.metrics(run["id"], since)}

    def cmd_cancel(self, args: dict) -> dict:
        """Queued: cancelled on the spot, never started. Running or pausing: asked to save and stop (the worker does
        it). Paused (no child): cancelled on the spot, its checkpoint kept. Decided on the run's state at the moment
        of the change, not when the request arrived: a worker may claim a queued run in between."""
        run = self._run_ref(args)
        was, run = self.store.move(run["id"], states.CANCEL, {states.CANCELLED: {"finished_at": time.time()}})
        if run["status"] == states.CANCELLED:
            self.bus.emit("run.cancelled", run["id"], checkpoint=run.get("checkpoint"), step=run.get("step"))
        if was == states.PAUSED:
            self.wake.set()  # its device slot is free again
        return run

    def cmd_pause(self, args: dict) -> dict:
        """Running: asked to finish its step, save a checkpoint and exit (the worker does it); it then waits in
        ``paused``, holding its device slot, until `resume`. Why (``reason``: ``generation`` when the WebUI wants
        the card, else ``user``) is stored and shown ("paused for generation")."""
        run = self._run_ref(args)
        reason = args.get("reason", "user")
        if not isinstance(reason, str) or not reason.isidentifier() or len(reason) > 40:
            raise ProtocolError(E_BAD_REQUEST, f"reason: a short word such as 'user' or 'generation', got {reason!r}")
        if run["status"] in (states.PAUSING, states.PAUSED):
            return run
        if run["kind"] in ("caption", "tools"):
            raise states.TransitionError(f"run {run['id']} is a {run['kind']} job; only training runs pause "
                                         f"(cancel it instead)")
        if run["status"] != states.RUNNING:
            raise states.TransitionError(f"run {run['id']} is {run['status']}; only a running run pauses")
        run = self.store.transition(run["id"], states.PAUSING, expect=(states.RUNNING,), pause_reason=reason)
        self.bus.emit("run.pausing", run["id"], reason=reason, step=run.get("step"), device=run.get("device"))
        return run

    def _requeue(self, args: dict, resume: bool) -> dict:
        run = self._run_ref(args)
        if resume and not run.get("checkpoint"):
            raise states.TransitionError(f"run {run['id']} has no checkpoint to resume from; `retry` starts it over")
        run = prepare_retry(self.store, run, resume)
        self.bus.emit("run.queued", run["id"], name=run["name"], kind=run["kind"], priority=run["priority"],
                      resume=resume)
        self.wake.set()
        return run

    def cmd_retry(self, args: dict) -> dict:
        return self._requeue(args, resume=False)

    def cmd_resume(self, args: dict) -> dict:
        """A paused run goes first in the queue (it held the card), from its checkpoint; a failed or cancelled one
        back in the queue from its checkpoint. Resuming a run that is still pausing is refused: wait for paused."""
        run = self._run_ref(args)
        if run["status"] == states.PAUSED:
            run = self.store.transition(run["id"], states.QUEUED, expect=(states.PAUSED,), first=1, resume=1,
                                        attempts=0, pause_reason=None, paused_at=None)
            self.bus.emit("run.queued", run["id"], name=run["name"], kind=run["kind"], priority=run["priority"],
                          resume=True)
            self.wake.set()
            return run
        if run["status"] == states.PAUSING:
            raise states.TransitionError(f"run {run['id']} is still pausing (saving its checkpoint); resume it once "
                                         f"it is paused")
        return self._requeue(args, resume=True)

    def cmd_shutdown(self, args: dict) -> dict:
        if not self.caller.sees_all:  # a shared daemon: stopping it stops everyone's runs
            raise ProtocolError(E_FORBIDDEN, f"role {self.caller.role.name!r}: only an admin stops the daemon")
        self.request_stop()
        return {"stopping": True, "running": [w.current for w in self.workers if w.current]}

    def _dataset_tool(self, op: str) -> Callable[[dict], Any]:
        """`check` and `captions.*`: the engine's dataset tools, run in a child by `core_bridge`."""
        return lambda args: core_bridge.run_op(op, self._folder_args(args), self.home, self.options.slow_timeout_s)

    def _folder_args(self, args: dict) -> dict:
        """Dataset-tool arguments with the folder made absolute (against the client's cwd) and every other path
        they name confined to it: the tools write caption files and metadata.csv there, and nowhere else."""
        folder = args.get("folder")
        if not isinstance(folder, str) or not folder or "\0" in folder:
            raise ProtocolError(E_BAD_REQUEST, "folder: give the dataset folder")
        base = args.get("cwd") if isinstance(args.get("cwd"), str) else None
        out = {k: v for k, v in args.items() if k != "cwd"}
        root = (Path(base or ".") / Path(folder).expanduser()).resolve()
        out["folder"] = str(root)
        ext = args.get("caption_extension")
        if ext is not None and ext not in CAPTION_EXTENSIONS:
            raise ProtocolError(E_BAD_REQUEST, f"caption_extension: must be one of {', '.join(CAPTION_EXTENSIONS)}, "
                                               f"got {str(ext)[:40]!r}")
        meta = args.get("metadata_path")
        if meta is not None:
            if not isinstance(meta, str) or "\0" in meta:
                raise ProtocolError(E_BAD_REQUEST, "metadata_path: must be a file path")
            path = (root / Path(meta).expanduser()).resolve()
            if not inside(path, root) or path.suffix.lower() != ".csv":
                raise ProtocolError(E_BAD_REQUEST, f"metadata_path: must be a .csv file inside the dataset folder "
                                                   f"{root}, got {meta[:200]!r}")
            out["metadata_path"] = str(path)
        return out

    def cmd_rate(self, args: dict) -> dict:
        """👍 (``up``) or 👎 (``down``) on one of the caller's runs; ``null`` clears it. `recommend` reads it."""
        run = self._run_ref(args)
        rating = args.get("rating")
        if rating is not None and rating not in RATINGS:
            raise ProtocolError(E_BAD_REQUEST, f"rating: must be up, down or null, got {str(rating)[:20]!r}")
        self.store.update_run(run["id"], rating=rating)
        self.bus.emit("run.rated", run["id"], rating=rating)
        return self.store.get_run(run["id"])

    def _recommend_history(self) -> list[dict]:
        """The caller's finished image runs, newest first, as the plain dicts `lora_core.recommend` reads: settings,
        status, final loss, health warnings (their stored ``run.health`` events) and rating. Only the caller's own
        runs, admin or not: a recommendation learns from its user's taste."""
        user = self.caller.user if self.users_file is not None else EVERYONE
        runs = [r for r in self.store.list_runs(include_all=True, user=user)
                if r.get("kind") == "image" and r.get("status") in ("finished", "failed", "cancelled")]
        runs.sort(key=lambda r: r.get("created_at") or 0, reverse=True)
        history = []
        for run in runs[:20]:
            kinds = sorted({e.get("kind") for e in self.store.events(run["id"], types=["run.health"])
                            if e.get("kind")})
            history.append({"id": run["id"], "name": run.get("name"), "status": run.get("status"),
                            "rating": run.get("rating"), "config": run.get("config") or {}, "health": kinds,
                            "loss": run.get("loss"), "error": run.get("error")})
        return history

    def cmd_recommend(self, args: dict) -> Any:
        """Recommended settings for a dataset folder (`lora_core.recommend`, in a child like `check`), adjusted for
        the caller's earlier runs."""
        folder = self._folder_args({"folder": args.get("folder"), **({"cwd": args["cwd"]} if "cwd" in args
                                                                     else {})})["folder"]
        request: dict = {"data_dir": folder, "history": self._recommend_history()}
        base = args.get("base_model")
        if base is not None:
            if not isinstance(base, str) or "\0" in base:
                raise ProtocolError(E_BAD_REQUEST, "base_model: must be a file or folder path")
            cwd = args.get("cwd") if isinstance(args.get("cwd"), str) else "."
            request["base_model"] = str((Path(cwd) / Path(base).expanduser()).resolve())
        for key in ("kind", "optimizer"):
            value = args.get(key)
            if value is not None:
                if not isinstance(value, str) or len(value) > 40:
                    raise ProtocolError(E_BAD_REQUEST, f"{key}: must be a name, got {str(value)[:40]!r}")
                request[key] = value
        return core_bridge.run_op("recommend", request, self.home, self.options.slow_timeout_s)

    def cmd_plan(self, args: dict) -> Any:
        plan_dir = self.home / "plans" / secrets.token_hex(6)
        _, cfg = self._resolve(args, plan_dir / "output")
        record = {"run_dir": str(plan_dir), "config": cfg}
        try:
            return core_bridge.run_plan(write_snapshot(record), self.home, self.options.slow_timeout_s)
        finally:
            shutil.rmtree(plan_dir, ignore_errors=True)


def run_daemon(options: DaemonOptions, on_started: Optional[Callable[[dict], None]] = None) -> int:
    """Start, serve until `shutdown`/SIGTERM/Ctrl+C, stop cleanly. Returns the process exit code."""
    daemon = Daemon(options)
    info = daemon.start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, daemon.request_stop)
        signal.signal(signal.SIGINT, daemon.request_stop)
        if hasattr(signal, "SIGBREAK"):  # Windows: CTRL_BREAK_EVENT from `lora-daemon stop` fallbacks
            signal.signal(signal.SIGBREAK, daemon.request_stop)
    if on_started:
        on_started(info)
    daemon.serve_forever()
    return 0
