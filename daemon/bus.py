"""Live events: stored (when worth keeping) and republished on the daemon's PUB socket, from any thread.

ZeroMQ sockets are not thread-safe and the PUB socket belongs to the server's thread, so other threads push events
to it over an ``inproc://`` pipe (one PUSH socket per thread) and the server forwards them. Events from one thread
keep their order; the server thread publishes its own events directly, so `run.queued` always precedes the
worker's `run.started`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

import zmq

from .protocol import event_frames, make_event
from .store import Store

log = logging.getLogger(__name__)

# Chatty events live elsewhere already: progress in the metrics table, log lines in the run's train.log.
NOT_STORED = ("run.progress", "run.log")


class Bus:
    def __init__(self, ctx: zmq.Context, address: str, store: Store):
        self.ctx = ctx
        self.address = address
        self.store = store
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self._direct: Optional[Callable[[list[bytes]], None]] = None

    def attach(self, send: Callable[[list[bytes]], None]) -> None:
        """Called by the server thread: its own events go straight to the PUB socket."""
        self._owner = threading.get_ident()
        self._direct = send

    def emit(self, type: str, run_id: Optional[str], **fields: Any) -> dict:
        event = make_event(type, run_id, time.time(), **fields)
        if type not in NOT_STORED:
            self.store.add_event(event)
        frames = event_frames(event)
        if self._direct is not None and threading.get_ident() == self._owner:
            self._direct(frames)
        else:
            self._socket().send_multipart(frames)
        return event

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(self.address)
            self._local.sock = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
