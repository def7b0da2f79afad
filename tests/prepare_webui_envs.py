"""Build the two WebUI-like environments the extension tests run in, and make sure Chromium is there.

The WebUI side of lora-scripts runs inside someone else's Python: A1111 1.10 pins gradio 3.41.2 with pydantic 1 and
fastapi 0.94, Forge pins gradio 4.40.0 with pydantic 2 and fastapi 0.104.1. Neither can share the engine's
environment (gradio 3.41 breaks on starlette >= 1, gradio 4.40 on huggingface_hub >= 1), so the tests start the tab
in these venvs as subprocesses. Each venv is rebuilt only when its pin list changes (a stamp file holds the list),
so running this before every pytest costs a second once the venvs exist.

Run: ``python tests/prepare_webui_envs.py`` (the README's test command does).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")

# What the WebUI side may import, pinned the way each WebUI's requirements_versions.txt resolves.
COMMON = ["pyzmq>=25", "watchdog>=3", "numpy==1.26.4", "pillow==9.5.0"]
ENVS: dict[str, list[str]] = {
    ".venv-gradio3": ["gradio==3.41.2", "gradio_client==0.5.0", "fastapi==0.94.0", "starlette==0.26.1",
                      "pydantic==1.10.17", "httpx==0.24.1", "huggingface_hub==0.24.7", "altair==5.3.0", *COMMON],
    ".venv-gradio4": ["gradio==4.40.0", "fastapi==0.104.1", "pydantic==2.8.2", "huggingface_hub<1", *COMMON],
}
STAMP = "lora-scripts-pins.txt"


def venv_python(name: str) -> Path:
    """The interpreter of one of `ENVS` (it may not exist yet)."""
    bindir = "Scripts" if os.name == "nt" else "bin"  # Windows-only branch: venvs keep python.exe in Scripts/
    return ROOT / name / bindir / ("python.exe" if os.name == "nt" else "python")


def _ready(name: str) -> bool:
    stamp = ROOT / name / STAMP
    return venv_python(name).exists() and stamp.exists() and stamp.read_text() == "\n".join(ENVS[name])


def build_env(name: str) -> None:
    """Create (or re-create) one venv with exactly its pins; raise CalledProcessError if pip fails."""
    if _ready(name):
        print(f"{name}: up to date")
        return
    target = ROOT / name
    if target.exists():
        shutil.rmtree(target)
    print(f"{name}: creating with {' '.join(ENVS[name])}", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    subprocess.run([str(venv_python(name)), "-m", "pip", "install", "--quiet", "--prefer-binary", *ENVS[name]],
                   check=True)
    subprocess.run([str(venv_python(name)), "-c", "import gradio, fastapi, pydantic, zmq, watchdog; "
                    "print('  gradio', gradio.__version__, 'fastapi', fastapi.__version__, "
                    "'pydantic', pydantic.VERSION)"], check=True)
    (target / STAMP).write_text("\n".join(ENVS[name]))


def ensure_chromium() -> None:
    """Install Debian's Chromium for the browser tests when it is missing and we may (root with apt-get)."""
    if CHROMIUM.exists():
        print(f"chromium: {CHROMIUM}")
        return
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"chromium: {CHROMIUM} is missing; install it (apt-get install chromium) for the browser tests")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], check=True, env=env)


def main() -> int:
    for name in ENVS:
        build_env(name)
    ensure_chromium()
    return 0


def require(name: str) -> Path:
    """The interpreter of env ``name`` for a test: skip when it is missing, but fail under CI=true."""
    import pytest

    python = venv_python(name)
    if not _ready(name):
        message = f"{name} is missing or outdated: run `python tests/prepare_webui_envs.py`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


if __name__ == "__main__":
    sys.exit(main())
