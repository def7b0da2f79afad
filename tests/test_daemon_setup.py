"""``lora-daemon setup``: the engine's own venv, with the WebUI's torch build, created and filled without internet."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_daemon.ui.context import TabContext, UiSettings
from lora_daemon.ui.setup_env import TORCH_INDEX, SetupJob, SetupPlan, venv_python

ROOT = Path(__file__).resolve().parent.parent


def setup_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "setup", *args],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("webui_torch, requirement, index", [
    ("2.1.2+cu121", "torch==2.1.2", f"{TORCH_INDEX}/cu121"),   # A1111 1.10's default on NVIDIA
    ("2.3.1+cu118", "torch==2.3.1", f"{TORCH_INDEX}/cu118"),
    ("2.3.1+rocm6.0", "torch==2.3.1", f"{TORCH_INDEX}/rocm6.0"),
    ("2.4.0", "torch==2.4.0", None),                          # a plain build comes from the default index
])
def test_the_engine_gets_the_same_torch_version_and_flavour_as_the_webui(webui_torch, requirement, index, tmp_path):
    torch_install, engine_install = SetupPlan(tmp_path / "venv", webui_torch).commands()
    assert torch_install[:4] == [str(venv_python(tmp_path / "venv")), "-m", "pip", "install"]
    assert torch_install[4:] == [requirement] + (["--index-url", index] if index else [])
    assert engine_install[4:] == [str(ROOT)]


def test_setup_print_shows_this_pythons_torch_build_and_creates_nothing(tmp_path):
    done = setup_cli("--print", "--venv", str(tmp_path / "engine venv"), home=tmp_path / "home")
    assert done.returncode == 0, done.stderr
    version, _, flavour = importlib.metadata.version("torch").partition("+")
    python = str(venv_python(tmp_path / "engine venv"))
    torch_line = f"'{python}' -m pip install torch=={version}" + (f" --index-url {TORCH_INDEX}/{flavour}" if flavour
                                                                  else "")
    assert done.stdout.splitlines() == [torch_line, f"'{python}' -m pip install {ROOT}"]
    assert not (tmp_path / "engine venv").exists()


@pytest.mark.slow
def test_setup_makes_a_venv_the_tab_finds_with_the_engine_and_the_same_torch_offline(tmp_path):
    source = tmp_path / "source"  # a copy, so pip's in-tree build leaves the checkout alone
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("lora_core", "daemon"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    done = setup_cli("--system-site-packages", "--source", str(source), "--pip-arg=--no-index",
                     "--pip-arg=--no-build-isolation", home=home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("the training engine is installed")

    ctx = TabContext(settings=lambda: UiSettings(home=str(home)), checkpoints=dict, lora_dir=lambda: tmp_path,
                     setup=SetupJob(home / "venv"))
    python = ctx.daemon_python()
    assert python == venv_python(home / "venv")
    probe = subprocess.run([str(python), "-c", "import lora_daemon, lora_core, importlib.metadata as m; "
                            "print(lora_daemon.__file__); print(m.version('torch'))"], capture_output=True, text=True,
                           cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                           timeout=120)
    where, torch_version = probe.stdout.split()
    assert Path(where).is_relative_to(home / "venv") and torch_version == importlib.metadata.version("torch")
