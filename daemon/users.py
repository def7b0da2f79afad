"""Who may do what on a daemon a team shares: ``users.yaml`` in the daemon home maps users to roles with limits.

Why here and not in the WebUI: the WebUI (``--gradio-auth``/``--api-auth``) and the CLI (the OS user, ``--user``)
know who is asking and say so in each request's ``user`` field; the daemon trusts that field only because the
request carries the token (whoever can read daemon.json is a client the daemon's owner let in). So the daemon,
which sees every client, is the one place that can count a user's queued runs, GPU time and visibility.

Without a ``users.yaml`` nothing here applies: one person, today's behaviour. With one, a request that names no user
is the daemon's owner acting through the token itself (the WebUI's GPU hand-off, a script run by whoever started the
daemon) and is treated as an admin — the token already lets such a client claim any name, so this grants nothing new.

The file::

    roles:
      admin: {admin: true}
      member: {max_priority: 5, concurrent_runs: 1, queued_runs: 5, max_steps: 5000, gpu_hours_per_day: 8}
      guest: {max_priority: 0, queued_runs: 1, max_resolution: 512, max_rank: 16,
              base_model_folders: [/models/Stable-diffusion/shared],
              dataset_folders: ["/srv/lora-daemon/datasets/{user}"]}   # {user}: the user's own folder
    users:
      alice: admin
      bob: member
    default_role: guest     # users not listed (leave out: they are refused)
    publish: subfolder      # LoRAs go to <Lora>/<user>/; `prefix`: <Lora>/<user>_<name>.safetensors
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .protocol import USER_RE

USERS_FILE = "users.yaml"
NAME_RE = USER_RE  # also a folder name: no separators, no '..'
PUBLISH_MODES = ("subfolder", "prefix")
DAY_S = 24 * 3600.0


class UsersFileError(ValueError):
    """users.yaml is not valid; the message names the file, line and field."""


class Refused(ValueError):
    """A request over a role's limit, or from a user the file does not know; the message names the limit."""


def command_line_user(explicit: Optional[str] = None) -> Optional[str]:
    """Who a command-line client is for: ``--user``, else the OS user (what a shared daemon's users.yaml names);
    None where the system has no login name (a container without a passwd entry): the token holder itself."""
    if explicit:
        return explicit
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


def check_user_name(name: Any, where: str = "user") -> str:
    """A user name as the daemon stores it and uses it as a folder name (``datasets/<user>``, ``Lora/<user>``)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ValueError(f"{where}: a user name is 1-64 letters, digits, '_', '.', '@' or '-' (not starting with "
                         f"one of the last four), got {str(name)[:80]!r}")
    return name


@dataclass(frozen=True)
class Role:
    """A role's limits; None (or an empty folder list) means no limit."""

    name: str
    admin: bool = False  # sees and may act on every user's runs; no limits apply
    max_priority: Optional[int] = None
    concurrent_runs: Optional[int] = None  # at once, across every device
    queued_runs: Optional[int] = None  # waiting in the queue at once
    max_steps: Optional[int] = None
    max_resolution: Optional[int] = None
    max_rank: Optional[int] = None
    gpu_hours_per_day: Optional[float] = None  # device time of the last 24 hours, running runs counted up to now
    base_model_folders: tuple[str, ...] = ()
    # where this role's training data must live; "{user}" is the user's name (the tab uploads to
    # <home>/datasets/<user>), so one line keeps everyone to their own datasets
    dataset_folders: tuple[str, ...] = ()

    def refuse(self, text: str) -> Refused:
        return Refused(f"role {self.name!r}: {text}")


# Each limit's type and the smallest value it takes (what the file is checked against)
LIMITS: dict[str, tuple[type, float]] = {
    "max_priority": (int, -1_000_000), "concurrent_runs": (int, 1), "queued_runs": (int, 0), "max_steps": (int, 1),
    "max_resolution": (int, 64), "max_rank": (int, 1), "gpu_hours_per_day": (float, 0),
}
ROLE_KEYS = ("admin", "base_model_folders", "dataset_folders", *LIMITS)
DATA_PATHS = ("train_data_dir", "reg_data_dir", "metadata_path", "train_data_file")  # what dataset_folders confines
TOP_KEYS = ("roles", "users", "default_role", "publish")


def _lines(node: yaml.Node, path: str = "", out: Optional[dict] = None) -> dict[str, int]:
    """Every key path in the YAML (``roles.guest.queued_runs``) → its 1-based line, for errors that point there."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            out[sub] = key.start_mark.line + 1
            _lines(value, sub, out)
    return out


@dataclass
class Users:
    """The parsed users.yaml: roles, who has which, and how published LoRAs are kept apart."""

    path: Path
    roles: dict[str, Role]
    users: dict[str, str]
    default_role: Optional[str] = None
    publish: str = "subfolder"
    mtime_ns: int = 0

    def role_of(self, user: Optional[str]) -> Role:
        """The role of `user`; no user is the token holder itself (see the module's docstring): an admin."""
        if user is None:
            return Role("owner", admin=True)
        role = self.users.get(user, self.default_role)
        if role is None:
            raise Refused(f"user {user!r}: not in {self.path} and it sets no default_role; ask the admin to add you")
        return self.roles[role]


def parse_users(text: str, path: Path) -> Users:
    """Parse and validate users.yaml, every error naming its line and field."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UsersFileError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    lines = _lines(root) if root is not None else {}
    problems: list[str] = []

    def bad(key: str, text: str) -> None:
        line = lines.get(key)
        problems.append(f"{path}{f' line {line}' if line else ''}: {key}: {text}")

    if not isinstance(data, dict):
        raise UsersFileError(f"{path}: must be a mapping with roles: and users:")
    for key in data:
        if key not in TOP_KEYS:
            bad(str(key), f"unknown key; one of {', '.join(TOP_KEYS)}")
    roles: dict[str, Role] = {}
    raw_roles = data.get("roles")
    if not isinstance(raw_roles, dict) or not raw_roles:
        bad("roles", "give at least one role, e.g. roles: {member: {queued_runs: 3}}")
        raw_roles = {}
    for name, spec in raw_roles.items():
        where = f"roles.{name}"
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            bad(where, "must be a mapping of limits, e.g. {queued_runs: 1}")
            continue
        values: dict[str, Any] = {}
        for key, value in spec.items():
            if key not in ROLE_KEYS:
                bad(f"{where}.{key}", f"unknown limit; one of {', '.join(ROLE_KEYS)}")
            elif key == "admin":
                if not isinstance(value, bool):
                    bad(f"{where}.admin", f"must be true or false, got {value!r}")
                values["admin"] = value is True
            elif key == "base_model_folders":
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    bad(f"{where}.base_model_folders", "must be a list of folders")
                else:
                    values[key] = tuple(str(Path(v).expanduser().resolve()) for v in value)
            elif key == "dataset_folders":
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    bad(f"{where}.dataset_folders", "must be a list of folders ({user} stands for the user's name)")
                else:
                    values[key] = tuple(value)  # resolved per user when a run is submitted
            elif value is not None:
                kind, low = LIMITS[key]
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not number or (kind is int and value != int(value)) or value < low:
                    bad(f"{where}.{key}", f"must be a {'whole ' if kind is int else ''}number ≥ {low:g}, "
                                          f"got {value!r}")
                else:
                    values[key] = kind(value)
        roles[str(name)] = Role(str(name), **values)
    users: dict[str, str] = {}
    raw_users = data.get("users") or {}
    if not isinstance(raw_users, dict):
        bad("users", "must map user names to role names, e.g. users: {alice: admin}")
        raw_users = {}
    for name, role in raw_users.items():
        where = f"users.{name}"
        if isinstance(role, dict):
            role = role.get("role")
        try:
            check_user_name(str(name), where)
        except ValueError as e:
            bad(where, str(e).split(": ", 1)[1])
            continue
        if role not in roles:
            bad(where, f"role {role!r} is not under roles: (one of {', '.join(roles) or 'none'})")
            continue
        users[str(name)] = role
    default = data.get("default_role")
    if default is not None and default not in roles:
        bad("default_role", f"role {default!r} is not under roles: (one of {', '.join(roles) or 'none'})")
    publish = data.get("publish", "subfolder")
    if publish not in PUBLISH_MODES:
        bad("publish", f"one of {', '.join(PUBLISH_MODES)}, got {publish!r}")
    if problems:
        raise UsersFileError("\n".join(problems))
    return Users(path, roles, users, default, publish)


class UsersFile:
    """users.yaml in the daemon home, read again whenever it changes (an admin edits it while the daemon runs).

    A file made invalid by an edit keeps the last valid one in force and says why in every refusal's log line,
    rather than opening the daemon to everyone or locking everyone out."""

    def __init__(self, home: Path):
        self.path = Path(home) / USERS_FILE
        self._users: Optional[Users] = None
        self._seen: Optional[int] = None
        self.error: Optional[str] = None
        self.reload()

    def reload(self) -> Optional[Users]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._users, self._seen, self.error = None, None, None
            return None
        if mtime != self._seen:
            self._seen = mtime
            try:
                users = parse_users(self.path.read_text(encoding="utf-8"), self.path)
                users.mtime_ns = mtime
                self._users, self.error = users, None
            except (UsersFileError, OSError, UnicodeDecodeError) as e:
                self.error = str(e)
                if self._users is None:
                    raise UsersFileError(str(e)) from None
        return self._users

    @property
    def users(self) -> Optional[Users]:
        return self.reload()


def limits_text(role: Role) -> str:
    """A role's limits in one line, for `lora-daemon whoami`."""
    if role.admin:
        return "admin: sees every run, no limits"
    parts = [f"{f.name}={getattr(role, f.name)}" for f in fields(role)
             if f.name not in ("name", "admin") and getattr(role, f.name) not in (None, ())]
    return ", ".join(parts) or "no limits"


def check_submit(role: Role, user: Optional[str], cfg: Optional[dict], priority: int, queued: int,
                 gpu_seconds: float) -> None:
    """Refuse a submit over one of `role`'s limits, naming it. `cfg` is the resolved training config (None for
    caption and toolbox jobs, which only count against the queue, priority and GPU-time limits)."""
    if role.admin:
        return
    if role.max_priority is not None and priority > role.max_priority:
        raise role.refuse(f"priority at most {role.max_priority}, got {priority}")
    if role.queued_runs is not None and queued >= role.queued_runs:
        raise role.refuse(f"at most {role.queued_runs} queued run{'s' if role.queued_runs != 1 else ''} "
                          f"({user} has {queued} waiting)")
    if role.gpu_hours_per_day is not None and gpu_seconds >= role.gpu_hours_per_day * 3600:
        raise role.refuse(f"at most {role.gpu_hours_per_day:g} GPU-hours per day ({user} used "
                          f"{gpu_seconds / 3600:.2f} in the last 24 h)")
    if cfg is None:
        return
    training, data, model = cfg.get("training") or {}, cfg.get("data") or {}, cfg.get("model") or {}
    if role.max_steps is not None:
        steps = training.get("max_train_steps")
        if steps is None:
            raise role.refuse(f"at most {role.max_steps} steps: set training.max_train_steps (epochs alone give no "
                              f"step count before the run starts)")
        if steps > role.max_steps:
            raise role.refuse(f"at most {role.max_steps} steps, got training.max_train_steps={steps}")
    if role.max_resolution is not None and (data.get("resolution") or 0) > role.max_resolution:
        raise role.refuse(f"resolution at most {role.max_resolution}, got data.resolution={data.get('resolution')}")
    if role.max_rank is not None and (model.get("lora_rank") or 0) > role.max_rank:
        raise role.refuse(f"rank at most {role.max_rank}, got model.lora_rank={model.get('lora_rank')}")
    if role.dataset_folders:
        allowed = [Path(f.replace("{user}", user or "")).expanduser().resolve() for f in role.dataset_folders]
        for key in DATA_PATHS:
            if not data.get(key):
                continue
            path = Path(data[key]).expanduser().resolve()
            if not any(path == f or f in path.parents for f in allowed):
                raise role.refuse(f"datasets only from {', '.join(map(str, allowed))}, got data.{key}={path}")
    if role.base_model_folders and model.get("base_model"):
        base = Path(model["base_model"]).expanduser().resolve()
        if not any(base == Path(f) or Path(f) in base.parents for f in role.base_model_folders):
            raise role.refuse(f"base models only from {', '.join(role.base_model_folders)}, got "
                              f"model.base_model={base}")


def gpu_seconds(runs: list[dict], now: Optional[float] = None, window_s: float = DAY_S) -> dict[str, float]:
    """Device time per user over the last `window_s`: each run from its start to its end (running runs to now,
    paused ones to their pause). Fair share and ``gpu_hours_per_day`` read the same numbers."""
    now = time.time() if now is None else now
    since = now - window_s
    used: dict[str, float] = {}
    for run in runs:
        start = run.get("started_at")
        if not start:
            continue
        if run["status"] in ("running", "cancelling", "pausing"):
            end = now
        else:
            end = run.get("paused_at") if run["status"] == "paused" else run.get("finished_at")
        if not end or end <= since:
            continue
        used[run.get("user") or ""] = used.get(run.get("user") or "", 0.0) + max(0.0, end - max(start, since))
    return used


@dataclass
class Caller:
    """Who a request is from, as the handlers need it: the name (None: the token holder itself) and the role."""

    user: Optional[str]
    role: Role = field(default_factory=lambda: Role("owner", admin=True))

    @property
    def sees_all(self) -> bool:
        return self.role.admin

    def may_see(self, run: dict) -> bool:
        return self.sees_all or run.get("user") == self.user
