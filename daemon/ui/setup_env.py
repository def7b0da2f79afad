"""``lora-daemon setup``: give the training engine its own venv, with the same torch build the WebUI uses.

Installing training libraries into the WebUI's environment is how training extensions break WebUI installs, so
the engine lives in ``<state folder>/venv``. Its torch matches the WebUI's (same version and CUDA flavour, read
from the WebUI's package metadata without importing torch), so one driver serves both and nothing is downloaded
twice in a different flavour. The tab's "Set up" button runs the same steps in a thread and shows the live log.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import shlex
import site
import subprocess
import sys
import threading
import venv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..home import resolve_home

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
TORCH_INDEX = "https://download.pytorch.org/whl"


def venv_python(venv_dir: Path) -> Path:
    if os.name == "nt":  # Windows-only: venvs keep the interpreter in Scripts\
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


def shown(command: list[str]) -> str:
    """A command as the user would type it in their shell (quoted: venv paths often hold spaces)."""
    if os.name == "nt":  # Windows-only: cmd.exe quoting
        return subprocess.list2cmdline(command)
    return shlex.join(command)


def torch_requirement(version: str) -> tuple[str, Optional[str]]:
    """``"2.1.2+cu121"`` → (``"torch==2.1.2"``, the cu121 wheel index); a plain version uses the default index."""
    base, _, flavour = version.partition("+")
    return f"torch=={base}", (f"{TORCH_INDEX}/{flavour}" if flavour else None)


def installed_torch() -> Optional[str]:
    """The torch version of this Python (the WebUI's), from package metadata: importing torch here is not needed."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class SetupPlan:
    """What setup installs where: the venv, the torch build, the engine's source, and extra pip arguments.

    ``pip_args`` go to every ``pip install`` (e.g. ``--find-links DIR --no-index`` on a machine without internet);
    ``system_site_packages`` lets the venv see the packages of the Python that creates it, pip included, so a torch
    already installed there is used instead of downloaded again.
    """

    venv_dir: Path
    torch_version: Optional[str]
    source: Optional[Path] = REPO_ROOT  # None: install no engine (the standalone UI's venv)
    pip_args: tuple[str, ...] = ()
    system_site_packages: bool = False
    packages: tuple[str, ...] = ()  # requirements installed last, e.g. `UI_REQUIREMENTS`

    def commands(self) -> list[list[str]]:
        """The pip commands that fill the venv: torch first (pinned to the flavour), then the engine."""
        pip_install = [str(venv_python(self.venv_dir)), "-m", "pip", "install", *self.pip_args]
        commands = []
        if self.torch_version:
            requirement, index = torch_requirement(self.torch_version)
            commands.append(pip_install + [requirement] + (["--index-url", index] if index else []))
        if self.source is not None:
            commands.append(pip_install + [str(self.source)])
        if self.packages:
            commands.append(pip_install + list(self.packages))
        return commands


# The standalone UI's own venv (``lora-daemon setup --ui``): Forge's gradio stack, which cannot share the engine's
# environment (gradio 4.40 needs huggingface_hub < 1, transformers 5 needs >= 1; pydantic 2.8 / fastapi 0.104 as
# Forge pins them), plus what the tab itself imports (pyzmq for the client, watchdog for the Lora-folder watcher).
UI_REQUIREMENTS = ("gradio==4.40.0", "fastapi==0.104.1", "pydantic==2.8.2", "huggingface_hub<1", "pyzmq>=25",
                   "watchdog>=3", "psutil>=5.9")
UI_VENV = "ui-venv"


def ui_python(home: Path) -> Path:
    """The interpreter of the standalone UI's venv under the state folder (it may not exist yet)."""
    return venv_python(home / UI_VENV)


def ui_command(home: Path, python: Optional[Path] = None) -> list[str]:
    """How to start the standalone UI from its venv: the tab is loaded by path from this checkout, so that venv
    needs no copy of the engine."""
    return [str(python or ui_python(home)), str(REPO_ROOT / "daemon"), "--home", str(home), "ui"]


def own_site_packages() -> list[str]:
    """This interpreter's own site-packages when it is itself a venv, else nothing.

    Why: a venv made with ``system_site_packages`` sees the *base* interpreter's packages, not those of the venv it
    was created from — so run inside a venv that holds torch, setup would see no torch, download it again, and fail
    offline. Those folders are handed on with a ``.pth`` file instead (`inherit_packages`)."""
    if sys.prefix == sys.base_prefix:
        return []
    return [p for p in dict.fromkeys(site.getsitepackages()) if Path(p).is_dir()]


def inherit_packages(venv_dir: Path, folders: list[str]) -> Optional[Path]:
    """Let the venv see ``folders`` after its own packages (a ``.pth`` in its site-packages); None when none."""
    if not folders:
        return None
    done = subprocess.run([str(venv_python(venv_dir)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True)
    pth = Path(done.stdout.strip()) / "_lora_scripts_parent_env.pth"
    pth.write_text("".join(f"{folder}\n" for folder in folders), encoding="utf-8")
    return pth


def run_setup(plan: SetupPlan, say: Callable[[str], None] = print) -> int:
    """Create the venv and run the plan's commands, passing every output line to ``say``; returns pip's exit code."""
    if not venv_python(plan.venv_dir).exists():
        say(f"creating a virtual environment in {plan.venv_dir}")
        venv.EnvBuilder(with_pip=not plan.system_site_packages,
                        system_site_packages=plan.system_site_packages).create(plan.venv_dir)
        if plan.system_site_packages and inherit_packages(plan.venv_dir, own_site_packages()):
            say(f"it also sees the packages of {sys.prefix} (this Python is a venv; torch may live there)")
    for command in plan.commands():
        say("$ " + shown(command))
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace")
        for line in proc.stdout:
            say(line.rstrip())
        if proc.wait() != 0:
            say(f"failed with exit code {proc.returncode}")
            return proc.returncode
    say("the training engine is installed" if plan.source is not None else "the standalone UI is installed")
    return 0


@dataclass
class SetupJob:
    """One setup at a time, in a thread, with its log kept for the tab to poll."""

    venv_dir: Path
    lines: list[str] = field(default_factory=list)
    status: str = "idle"  # idle | running | done | failed
    _thread: Optional[threading.Thread] = None

    @property
    def python(self) -> Path:
        return venv_python(self.venv_dir)

    def start(self, torch_version: Optional[str]) -> bool:
        if self.status == "running":
            return False
        self.lines = []
        self.status = "running"
        self._thread = threading.Thread(target=self._run, args=(torch_version,), name="lora-scripts-setup",
                                        daemon=True)
        self._thread.start()
        return True

    def _run(self, torch_version: Optional[str]) -> None:
        try:
            code = run_setup(SetupPlan(self.venv_dir, torch_version), self.lines.append)
        except OSError as e:
            self.lines.append(f"setup failed: {e}")
            code = 1
        self.status = "done" if code == 0 else "failed"

    def snapshot(self, since: int = 0) -> dict:
        return {"status": self.status, "since": since, "lines": self.lines[since:], "next": len(self.lines)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--venv", help="where to create the engine's venv (default: <state folder>/venv)")
    parser.add_argument("--torch", help="torch version to install, e.g. 2.1.2+cu121 (default: this Python's torch)")
    parser.add_argument("--source", help="the engine to install: a folder or wheel (default: this checkout)")
    parser.add_argument("--pip-arg", action="append", default=[], dest="pip_args", metavar="ARG",
                        help="pass ARG to every pip install, e.g. --pip-arg=--find-links=DIR --pip-arg=--no-index")
    parser.add_argument("--system-site-packages", action="store_true",
                        help="let the venv see this Python's packages (pip and torch included) instead of its own")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the commands instead of running them")
    parser.add_argument("--ui", action="store_true",
                        help="set up the standalone UI (`lora-daemon ui`) in its own venv, <state folder>/ui-venv, "
                             "with gradio 4.40 and the packages it needs, instead of the engine")


def run(args: argparse.Namespace) -> int:
    """``lora-daemon setup``: create and fill the engine's venv, or print the commands with --print."""
    home = resolve_home(getattr(args, "home", None))
    if args.ui:
        venv_dir = Path(args.venv).expanduser().resolve() if args.venv else home / UI_VENV
        plan = SetupPlan(venv_dir, None, None, tuple(args.pip_args), args.system_site_packages, UI_REQUIREMENTS)
    else:
        venv_dir = Path(args.venv).expanduser().resolve() if args.venv else home / "venv"
        plan = SetupPlan(venv_dir, args.torch or installed_torch(),
                         Path(args.source).expanduser().resolve() if args.source else REPO_ROOT, tuple(args.pip_args),
                         args.system_site_packages)
    if args.print_only:
        for command in plan.commands():
            print(shown(command))
        return 0
    code = run_setup(plan)
    if code == 0 and args.ui:
        print("start the UI with `lora-daemon ui`, or directly: " + shown(ui_command(home, venv_python(venv_dir))))
    return code
