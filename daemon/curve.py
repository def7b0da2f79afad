"""CURVE keys for a daemon reachable from other machines: encryption plus a list of allowed client keys.

Loopback binds need none (the token in the owner-only daemon.json is enough); anything else is refused without
them, because the token would otherwise cross the network in clear text.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import zmq.auth


def create_keys(folder: Path) -> Path:
    """``server.key(_secret)``, ``client.key(_secret)`` and ``authorized/client.key`` (the allowed clients)."""
    folder = folder.resolve()
    authorized = folder / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(folder), "server")
    client_public, _ = zmq.auth.create_certificates(str(folder), "client")
    shutil.copy(client_public, authorized / "client.key")
    for secret in folder.glob("*.key_secret"):
        secret.chmod(0o600)
    return folder
