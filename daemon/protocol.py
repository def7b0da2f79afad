"""The one message schema between the daemon and its clients (CLI, WebUI tab, REST routes).

Why a module of its own: the WebUI process imports it with nothing but the standard library and pyzmq, so it holds
only plain data helpers. Every message is one UTF-8 JSON object in one ZeroMQ frame — never pickle.

Request (client → daemon, over REQ/DEALER → ROUTER)::

    {"v": 1, "id": "<request id>", "token": "<daemon.json token>", "command": "submit", "args": {...}}

Reply (daemon → client)::

    {"v": 1, "id": "<same id>", "ok": true, "result": {...}}
    {"v": 1, "id": "<same id>", "ok": false, "error": {"code": "config_invalid", "message": "...", "details": {...}}}

Event (daemon → subscribers, over PUB/SUB): two frames, ``[topic, json]`` where topic is the event type
(``run.progress``) so a subscriber filters by prefix, and the JSON carries ``type``, ``time``, ``run_id`` and fields.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: a config snapshot is a few KiB; anything near this is garbage or an attack

EVENT_TYPES = (
    "run.queued", "run.started", "run.progress", "run.checkpoint", "run.sample", "run.log", "run.finished",
    "run.failed", "run.cancelled", "run.requeued", "lora.published", "daemon.stopping",
)

# Error codes a client can branch on; the message is for people.
E_BAD_JSON = "bad_json"
E_BAD_REQUEST = "bad_request"
E_TOO_LARGE = "too_large"
E_VERSION = "bad_version"
E_AUTH = "unauthorized"
E_UNKNOWN_COMMAND = "unknown_command"
E_NOT_FOUND = "not_found"
E_CONFIG = "config_invalid"
E_STATE = "invalid_state"
E_INTERNAL = "internal"


class ProtocolError(ValueError):
    """A message that cannot be accepted; carries the error code the reply will hold."""

    def __init__(self, code: str, message: str, details: Optional[dict] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


@dataclass
class Request:
    command: str
    args: dict = field(default_factory=dict)
    id: str = ""
    token: str = ""
    v: int = PROTOCOL_VERSION


def new_request_id() -> str:
    return secrets.token_hex(8)


def encode(obj: dict) -> bytes:
    """JSON, compact, UTF-8; NaN/inf are refused so every frame is valid JSON for any reader."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode(frame: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict:
    """Parse one frame into a JSON object, refusing oversized, non-UTF-8, non-JSON and non-object frames."""
    if len(frame) > limit:
        raise ProtocolError(E_TOO_LARGE, f"message is {len(frame)} bytes; the limit is {limit}")
    try:
        obj = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(E_BAD_JSON, f"message is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_BAD_JSON, f"message must be a JSON object, got {type(obj).__name__}")
    return obj


def make_request(command: str, args: Optional[dict] = None, token: str = "", request_id: Optional[str] = None) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id or new_request_id(), "token": token, "command": command,
            "args": args or {}}


def parse_request(frame: bytes, limit: int = MAX_MESSAGE_BYTES) -> Request:
    """Validate the envelope of a request (not its token or arguments' meaning): version, id, command, args."""
    obj = decode(frame, limit)
    rid = obj.get("id", "")
    if not isinstance(rid, str) or len(rid) > 128:
        raise ProtocolError(E_BAD_REQUEST, "id: must be a string of at most 128 characters")
    v = obj.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(E_VERSION, f"v: protocol version {v!r} is not supported; this daemon speaks "
                                       f"{PROTOCOL_VERSION}")
    command = obj.get("command")
    if not isinstance(command, str):
        raise ProtocolError(E_BAD_REQUEST, "command: must be a string")
    token = obj.get("token", "")
    if not isinstance(token, str):
        raise ProtocolError(E_AUTH, "token: must be a string")
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(E_BAD_REQUEST, "args: must be a JSON object")
    return Request(command=command, args=args, id=rid, token=token, v=v)


def request_id_of(frame: bytes) -> str:
    """Best effort: the id of a request that failed validation, so the error reply can still be matched."""
    try:
        rid = json.loads(frame.decode("utf-8")).get("id", "")
        return rid if isinstance(rid, str) and len(rid) <= 128 else ""
    except Exception:  # any garbage: there is no id to echo
        return ""


def ok_reply(request_id: str, result: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: str, code: str, message: str, details: Optional[dict] = None) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False,
            "error": {"code": code, "message": message, "details": details or {}}}


def make_event(type: str, run_id: Optional[str], time: float, **fields: Any) -> dict:
    return {"type": type, "time": round(time, 3), "run_id": run_id, **fields}


def event_frames(event: dict) -> list[bytes]:
    return [event["type"].encode("utf-8"), encode(event)]
