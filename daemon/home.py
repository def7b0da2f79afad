"""The daemon's state folder and its ``daemon.json`` (endpoint + token), shared by the daemon and every client.

Standard library only (platformdirs when present), because the WebUI side reads this file too.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

INFO_FILE = "daemon.json"


def default_home() -> Path:
    """``LORA_DAEMON_HOME`` if set, else the user's data folder (``~/.local/share/lora-scripts`` on Linux)."""
    env = os.environ.get("LORA_DAEMON_HOME")
    if env:
        return Path(env).expanduser().resolve()
    try:
        from platformdirs import user_data_dir
    except ImportError:  # the WebUI env may lack platformdirs; keep the same folder on Linux/macOS
        return Path.home() / ".local" / "share" / "lora-scripts"
    return Path(user_data_dir("lora-scripts", appauthor=False))


def resolve_home(home: Optional[str | os.PathLike]) -> Path:
    return Path(home).expanduser().resolve() if home else default_home()


def make_private_dir(path: Path) -> Path:
    """The daemon's home: created if needed and made owner-only (0700), since it holds the token, the database
    and every run's files. On Windows the mode bits are ignored; the folder inherits the profile folder's ACL."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sys.platform != "win32":
        os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty if missing and make it owner-only (0600) before anyone writes to it (SQLite gives its
    -wal/-shm files the database file's mode, so they follow)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    if sys.platform != "win32":
        os.chmod(path, 0o600)
    return path


def write_private_json(path: Path, data: dict) -> None:
    """Write JSON readable by the owner only, atomically (temp file + os.replace).

    The token in daemon.json is the only thing between another local user and the daemon, hence mode 0600.
    On Windows the mode bits are ignored; the file then inherits the ACL of the user's profile folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    if sys.platform != "win32":
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_info(home: Path) -> Optional[dict]:
    """The running daemon's endpoint/token record, or None when there is none (never started, or stopped)."""
    try:
        data = json.loads((home / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
