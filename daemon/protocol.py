"""The one message schema between the daemon and its clients (CLI, WebUI tab, REST routes).

Why a module of its own: the WebUI process imports it with nothing but the standard library and pyzmq, so it holds
only plain data helpers. Every message is one UTF-8 JSON object in one ZeroMQ frame — never pickle.

Request (client → daemon, over REQ/DEALER → ROUTER)::

    {"v": 1, "id": "<request id>", "token": "<daemon.json token>", "command": "submit", "args": {...},
     "user": "alice"}

``user`` (optional) is who asked: the WebUI's signed-in user, the REST routes' basic-auth user, the CLI's OS user or
``--user``. The daemon trusts it because the token came with it; it matters only when the daemon home holds a
``users.yaml`` (`lora_daemon.users`).

Reply (daemon → client)::

    {"v": 1, "id": "<same id>", "ok": true, "result": {...}}
    {"v": 1, "id": "<same id>", "ok": false, "error": {"code": "config_invalid", "message": "...", "details": {...}}}

Event (daemon → subscribers, over PUB/SUB): two frames, ``[topic, json]`` where topic is the event type
(``run.progress``) so a subscriber filters by prefix, and the JSON carries ``type``, ``time``, ``run_id`` and fields.
The PUB socket takes only subscribers that present the token (ZeroMQ PLAIN, user `EVENTS_USER`, password = token;
with CURVE, the authorised client key instead), so the event stream is as private as the request socket.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: a config snapshot is a few KiB; anything near this is garbage or an attack
MAX_DEPTH = 64  # JSON nesting: a config is 3 levels deep; thousands of brackets only exist to crash a parser
MAX_ERROR_CHARS = 4000  # an error message in a reply: enough for every problem of a bad config, never megabytes
MAX_PROBLEMS = 100
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")  # a request's user: also a folder name (datasets/<user>)
EVENTS_USER = "lora"  # the PLAIN user name subscribers present on the event socket (the password is the token)

EVENT_TYPES = (
    "run.queued", "run.started", "run.progress", "run.checkpoint", "run.sample", "run.log", "run.finished",
    "run.failed", "run.cancelled", "run.requeued", "lora.published", "daemon.stopping",
    "run.pausing", "run.paused",
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
E_FORBIDDEN = "forbidden"  # a shared daemon's users.yaml refuses this user or this request (a limit)


class ProtocolError(ValueError):
    """A refusal with an error code: raised by the daemon for a message it cannot accept, and by the client
    (`lora_daemon.client.DaemonError` is this same class) when the daemon answered with an error.

    ``code`` to branch on, ``message`` to show, ``details`` (e.g. a config's ``problems``).
    """

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
    user: Optional[str] = None


def new_request_id() -> str:
    return secrets.token_hex(8)


def encode(obj: dict) -> bytes:
    """JSON, compact, UTF-8; NaN/inf are refused so every frame is valid JSON for any reader."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def nesting_depth(obj: Any) -> int:
    """How deep lists and objects nest in a decoded value, walked without recursion (so any depth is safe)."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def decode(frame: bytes, limit: int = MAX_MESSAGE_BYTES, max_depth: Optional[int] = MAX_DEPTH) -> dict:
    """Parse one frame into a JSON object, refusing oversized, non-UTF-8, too deeply nested, non-JSON and
    non-object frames — each as a `ProtocolError`, never a RecursionError."""
    if len(frame) > limit:
        raise ProtocolError(E_TOO_LARGE, f"message is {len(frame)} bytes; the limit is {limit}")
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(E_BAD_JSON, f"message is not UTF-8 JSON: {e}") from None
    try:
        obj = json.loads(text)
    except RecursionError:  # thousands of nested brackets: the parser gives up before we could count them
        raise ProtocolError(E_BAD_JSON, f"message nests deeper than {max_depth} levels") from None
    except ValueError as e:
        raise ProtocolError(E_BAD_JSON, f"message is not UTF-8 JSON: {str(e)[:200]}") from None
    if max_depth is not None and nesting_depth(obj) > max_depth:
        raise ProtocolError(E_BAD_JSON, f"message nests deeper than {max_depth} levels")
    if not isinstance(obj, dict):
        raise ProtocolError(E_BAD_JSON, f"message must be a JSON object, got {type(obj).__name__}")
    return obj


def make_request(command: str, args: Optional[dict] = None, token: str = "", request_id: Optional[str] = None,
                 user: Optional[str] = None) -> dict:
    request = {"v": PROTOCOL_VERSION, "id": request_id or new_request_id(), "token": token, "command": command,
               "args": args or {}}
    if user is not None:
        request["user"] = user
    return request


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
    user = obj.get("user")
    if user is not None and (not isinstance(user, str) or not USER_RE.match(user) or ".." in user):
        raise ProtocolError(E_BAD_REQUEST, f"user: 1-64 letters, digits, '_', '.', '@' or '-', got {str(user)[:80]!r}")
    return Request(command=command, args=args, id=rid, token=token, v=v, user=user)


def request_id_of(frame: bytes) -> str:
    """Best effort: the id of a request that failed validation, so the error reply can still be matched."""
    try:
        rid = decode(frame).get("id", "")
        return rid if isinstance(rid, str) and len(rid) <= 128 else ""
    except Exception:  # any garbage: there is no id to echo
        return ""


def ok_reply(request_id: str, result: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def _cap(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def cap_problems(problems: list) -> list[str]:
    """At most `MAX_PROBLEMS` problems of at most 500 characters each (plus a line saying how many were left out)."""
    capped = [_cap(str(p), 500) for p in problems[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        capped.append(f"… and {len(problems) - MAX_PROBLEMS} more problems")
    return capped


def error_reply(request_id: str, code: str, message: str, details: Optional[dict] = None) -> dict:
    """An error reply; the message and a config's problems are capped so no request can make a huge reply."""
    details = dict(details or {})
    if isinstance(details.get("problems"), list):
        details["problems"] = cap_problems(details["problems"])
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False,
            "error": {"code": code, "message": _cap(str(message)), "details": details}}


def make_event(type: str, run_id: Optional[str], time: float, **fields: Any) -> dict:
    return {"type": type, "time": round(time, 3), "run_id": run_id, **fields}


def event_frames(event: dict) -> list[bytes]:
    return [event["type"].encode("utf-8"), encode(event)]
