"""Child processes, portable: start detached from our console, ask to stop, kill, and recognise after a restart.

A pid alone is not an identity (the OS reuses them), so a run records pid + process create time (psutil) and a
restarted daemon only touches a process when both match.

Standard library at import time (psutil is imported by the functions that need it), because the WebUI side uses
`spawn` too, to start the daemon detached: one portable way to start a process, not two.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Optional, Union

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def python_env(env: Optional[dict] = None) -> dict:
    """Make `lora_core`/`daemon` importable in children even from an uninstalled checkout."""
    env = dict(os.environ if env is None else env)
    parts = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(cmd: list[str], log_file: Union[IO, int], env: Optional[dict] = None, cwd: Optional[Path] = None,
          detach: bool = False) -> subprocess.Popen:
    """Start `cmd` with stdout+stderr into `log_file` (a file, or subprocess.DEVNULL), in its own process group so
    stop signals reach only it; `detach` also frees it from our console (Windows), so closing that keeps it."""
    kwargs: dict = {}
    if sys.platform == "win32":
        # Windows: a new process group is what lets CTRL_BREAK_EVENT target the child alone; DETACHED_PROCESS
        # additionally frees a detached daemon from the console that started it.
        flags = subprocess.CREATE_NEW_PROCESS_GROUP
        if detach:
            flags |= subprocess.DETACHED_PROCESS
        kwargs["creationflags"] = flags
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            env=python_env(env), cwd=str(cwd) if cwd else None, **kwargs)


def create_time(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def same_process(pid: Optional[int], started: Optional[float]) -> bool:
    """True when `pid` is alive and is the very process that was started at `started` (not a reused pid)."""
    import psutil

    if not pid or started is None:
        return False
    now = create_time(pid)
    if now is None:
        return False
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    return abs(now - started) < 0.01


def request_stop(pid: int) -> None:
    """Ask a child to save and stop (the engine treats this like Ctrl+C: finish the step, checkpoint, exit 3)."""
    try:
        if sys.platform == "win32":
            # Windows: SIGTERM would be TerminateProcess (no checkpoint); CTRL_BREAK_EVENT reaches the child's
            # process group (created with CREATE_NEW_PROCESS_GROUP) and Python raises it as SIGBREAK there.
            os.kill(pid, signal.CTRL_BREAK_EVENT)
        else:
            os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError) as e:
        log.info("stop request to pid %d not delivered: %s", pid, e)


def kill(pid: int) -> None:
    import psutil

    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass


def wait_gone(pid: int, started: Optional[float], timeout: float) -> bool:
    """Wait for a process that is not our child (e.g. left by a dead daemon) to exit."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) >= 0.01:
            return True
        proc.wait(timeout)
        return True
    except psutil.TimeoutExpired:
        return False
    except psutil.Error:
        return True
