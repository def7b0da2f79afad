"""install.py, run the way A1111 runs it at every launch: a subprocess with the WebUI's `launch` module importable."""
from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

from prepare_webui_envs import require

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "tests" / "webui_stub"


def run_installer(python: Path) -> subprocess.CompletedProcess:
    """modules/launch_utils.run_extension_installer: ``python install.py`` with the WebUI root on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(STUB), "PYTHONNOUSERSITE": "1"}
    return subprocess.run([str(python), "-X", "importtime", str(ROOT / "install.py")], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=120)


def imported_modules(importtime_log: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def test_a_webui_without_pyzmq_and_watchdog_gets_exactly_those_two_and_nothing_else(tmp_path):
    """A bare environment lacks everything: what install.py asks pip for here is all it ever asks for."""
    bare = tmp_path / "bare-webui-venv"
    venv.EnvBuilder(with_pip=False).create(bare)
    python = bare / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    done = run_installer(python)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ['run_pip: install "pyzmq>=25"', 'run_pip: install "watchdog>=3"']


def test_a_webui_that_has_both_hears_nothing_and_nothing_heavy_is_imported():
    python = require(".venv-gradio3")  # A1111's pins, pyzmq and watchdog included
    done = run_installer(python)
    assert done.returncode == 0 and done.stdout == ""
    modules = imported_modules(done.stderr)
    assert "launch" in modules
    heavy = {m.split(".")[0] for m in modules} & {"zmq", "watchdog", "gradio", "torch", "pip", "numpy", "daemon"}
    assert heavy == set(), f"install.py imported {heavy}; it runs at every WebUI launch and must stay instant"
    assert [line for line in done.stderr.splitlines() if not line.startswith("import time:")] == []

