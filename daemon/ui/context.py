"""What the tab and the REST routes need from their host (the WebUI, or standalone mode), in one object.

The same tab runs inside A1111/Forge and in ``lora-daemon ui``; only where settings, checkpoints and the Lora folder
come from differs. The host builds a `TabContext` with those callables, and nothing in the tab imports the WebUI.
"""
from __future__ import annotations

import logging
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import procs
from ..client import DaemonClient
from ..home import resolve_home
from ..protocol import USER_RE

from .lora_watch import LoraFeed
from .setup_env import SetupJob, shown

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

# The WebUI's signed-in user for the handler running in this thread (`signed_in`), so every daemon request the
# handler makes carries it without passing it through every helper; gradio runs each handler call in one thread.
_SIGNED_IN = threading.local()


@contextmanager
def signed_in(user: Optional[str]):
    """Daemon requests made in this block (through `TabContext.client`) are for `user` (None: nobody signed in,
    a WebUI without a login: the token holder itself)."""
    before = getattr(_SIGNED_IN, "user", None)
    _SIGNED_IN.user = user or None
    try:
        yield
    finally:
        _SIGNED_IN.user = before


def as_signed_in(fn: Callable) -> Callable:
    """`fn` run as the WebUI's signed-in user: gradio (3.41 and 4.40 alike) hands a handler whose first parameter
    is annotated ``gr.Request`` the request, whose ``username`` is the ``--gradio-auth`` login (None without one),
    and every daemon request `fn` makes then carries it (`context.signed_in`). The name is kept (not
    functools.wraps: gradio would read the wrapped signature and not pass the request)."""
    import gradio as gr  # here, not at the top: the routes and the standalone launcher import this module too

    def handler(request, *args):
        with signed_in(getattr(request, "username", None)):
            return fn(*args)
    handler.__annotations__ = {"request": gr.Request}  # a real class, not a string gradio would have to resolve
    handler.__name__, handler.__doc__ = getattr(fn, "__name__", "handler"), fn.__doc__
    return handler


def current_user() -> Optional[str]:
    return getattr(_SIGNED_IN, "user", None)


@dataclass
class UiSettings:
    """The extension's settings (WebUI Settings → LoRA Training, or standalone command-line flags)."""

    home: str = ""            # daemon state folder; empty: the daemon's default
    endpoint: str = ""        # a daemon elsewhere, e.g. tcp://127.0.0.1:5555; empty: read from the state folder
    autostart: bool = True    # start the daemon when the WebUI starts, if it is installed
    default_preset: str = "style"
    lora_dir: str = ""        # override of the WebUI's Lora folder
    daemon_python: str = ""   # the daemon's interpreter; empty: the venv `lora-daemon setup` made


@dataclass
class TabContext:
    settings: Callable[[], UiSettings]
    checkpoints: Callable[[], dict[str, str]]   # title shown in the dropdown -> model file or folder
    lora_dir: Callable[[], Path]
    interrogators: dict[str, Callable[[Path], str]] = field(default_factory=dict)  # WebUI captioners by label
    feed: LoraFeed = field(default_factory=LoraFeed)
    setup: Optional[SetupJob] = None
    host: str = "standalone"  # "a1111", "forge" or "standalone", shown in the Daemon section
    # Rescans the host's checkpoint folders before `checkpoints` is read (the WebUI caches its list); None when
    # `checkpoints` scans by itself every time (standalone mode).
    rescan_checkpoints: Optional[Callable[[], None]] = None
    # The host's checkpoint folder, given to the daemon it starts (`--checkpoint-dir`) for the Combine section's bake
    checkpoint_dir: Optional[Callable[[], Path]] = None
    # The WebUI's GPU hand-off (`gpu_handoff.GpuHandoff`): its setting and question in the tab, the reload button;
    # None in standalone mode, where no WebUI model shares the card
    handoff: Optional[Any] = None

    def home(self) -> Path:
        return resolve_home(self.settings().home or None)

    def client(self, timeout: float = 3.0, user: Optional[str] = None) -> DaemonClient:
        """A daemon client for `user`, else for the user signed in to this thread's handler (`signed_in`)."""
        s = self.settings()
        return DaemonClient(home=s.home or None, endpoint=s.endpoint or None, timeout=timeout,
                            user=user or current_user())

    def datasets_root(self) -> Path:
        """Where the Dataset section keeps uploads: ``datasets/<user>/`` for a signed-in user, so two people's
        datasets of the same name never mix; ``datasets/`` without a login."""
        user = current_user()
        if user and USER_RE.match(user) and ".." not in user:
            return self.home() / "datasets" / user
        return self.home() / "datasets"

    def daemon_python(self) -> Optional[Path]:
        """The interpreter the daemon runs in: the configured one, else the venv made by setup, else none."""
        configured = self.settings().daemon_python
        if configured:
            return Path(configured)
        venv_python = self.setup.python if self.setup else None
        return venv_python if venv_python and venv_python.exists() else None

    def start_command(self) -> Optional[list[str]]:
        """The command that starts this tab's daemon (what the Start button runs), or None before setup.
        --lora-dir: the daemon publishes only into folders it was started with, so give it the WebUI's."""
        python = self.daemon_python()
        if python is None:
            return None
        command = [str(python), "-m", "lora_daemon.cli", "--home", str(self.home()), "start",
                   "--lora-dir", str(self.lora_dir())]
        if self.checkpoint_dir is not None:  # the Combine section's bake reads and writes the WebUI's checkpoints
            command += ["--checkpoint-dir", str(self.checkpoint_dir())]
        return command

    def start_advice(self) -> str:
        """What to do while the daemon is down, as a command that works as printed: `lora-daemon` itself is on no
        PATH (it lives in the engine's venv), so the interpreter's full path is given."""
        command = self.start_command()
        if command is None:
            return ("The training engine is not installed yet: press “Set up the training engine” below, or set the "
                    "daemon's Python in Settings.")
        return f"Press “Start daemon” below, or run: {shown(command)}"

    def start_daemon(self) -> str:
        """Start the daemon as a detached process in its own environment; returns what happened, for the user."""
        command = self.start_command()
        if command is None:
            return "The training engine is not installed yet: press Set up, or set the daemon's Python in Settings."
        python = command[0]
        # procs.spawn: detached on every platform, and the checkout put in front of PYTHONPATH (not replacing it)
        procs.spawn(command, subprocess.DEVNULL, cwd=REPO_ROOT, detach=True)
        log.info("started the daemon: %s", " ".join(command))
        return f"Starting the daemon with {python} …"
