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


@pytest.mark.slow
def test_setup_run_from_inside_a_venv_sees_the_packages_of_that_venv_not_only_its_base(tmp_path):
    """Run from a venv, ``--system-site-packages`` alone would show the new venv the *base* Python's packages:
    torch installed in the venv would be downloaded again (and an offline install fails). A package that only the
    outer venv holds must be importable in the engine's venv."""
    import venv

    outer = tmp_path / "outer venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(outer)
    outer_python = venv_python(outer)
    purelib = subprocess.run([str(outer_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "only_in_the_outer_venv.py").write_text("WHERE = 'outer'\n", encoding="utf-8")
    project = tmp_path / "tiny project"  # what setup installs: a real pip install, offline, kept small
    (project / "tiny_engine").mkdir(parents=True)
    (project / "tiny_engine" / "__init__.py").write_text("", encoding="utf-8")
    (project / "pyproject.toml").write_text('[project]\nname = "tiny-engine"\nversion = "0.1"\n'
                                            '[build-system]\nrequires = ["setuptools"]\n'
                                            'build-backend = "setuptools.build_meta"\n', encoding="utf-8")
    engine = tmp_path / "engine venv"
    script = ("from pathlib import Path; from lora_daemon.ui.setup_env import SetupPlan, run_setup; "
              f"raise SystemExit(run_setup(SetupPlan(Path({str(engine)!r}), None, Path({str(project)!r}), "
              "('--no-index', '--no-build-isolation'), True)))")
    done = subprocess.run([str(outer_python), "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"it also sees the packages of {outer}" in done.stdout
    probe = subprocess.run([str(venv_python(engine)), "-c", "import only_in_the_outer_venv as o, tiny_engine, "
                            "importlib.metadata as m; print(o.WHERE, m.version('torch'))"],
                           capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["outer", importlib.metadata.version("torch")]


@pytest.mark.slow
def test_setup_ui_gives_the_standalone_ui_its_own_venv_and_lora_daemon_ui_runs_from_it(tmp_path):
    """`lora-daemon setup --ui` installs the UI's pinned gradio stack into <home>/ui-venv (here offline: pip finds
    every pin already in a Forge-like env the new venv inherits from, as a CI machine with a warm env would); then
    `lora-daemon ui` from the engine's Python — which has no gradio — serves the tab from that venv."""
    import json
    import socket
    import time
    import urllib.request

    from prepare_webui_envs import require

    forge_like = require(".venv-gradio4")
    home = tmp_path / "home"
    done = subprocess.run([str(forge_like), str(ROOT / "daemon"), "--home", str(home), "setup", "--ui",
                           "--system-site-packages", "--pip-arg=--no-index"], capture_output=True, text=True,
                          timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the standalone UI is installed" in done.stdout and "start the UI with `lora-daemon ui`" in done.stdout
    ui_python = venv_python(home / "ui-venv")
    versions = subprocess.run([str(ui_python), "-c", "import gradio, fastapi, pydantic, zmq, watchdog, huggingface_hub; "
                               "print(gradio.__version__, fastapi.__version__, pydantic.VERSION, "
                               "huggingface_hub.__version__.split('.')[0])"],
                              capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert versions.stdout.split() == ["4.40.0", "0.104.1", "2.8.2", "0"], versions.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "ui.log", "wb")
    ui = subprocess.Popen([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "ui", "--port", str(port)],
                          stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                live = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/lora-scripts/v1/live",
                                                         timeout=5).read())
                if "daemon" in live:
                    break
            except OSError:
                pass
            assert ui.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text(errors="replace")
            time.sleep(1)
        assert live["daemon"]["up"] is False and "Set up the training engine" in live["daemon"]["message"]
    finally:
        ui.terminate()
        ui.wait(timeout=30)
        log.close()
    engine_without_venv = subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(tmp_path / "other"),
                                          "ui"], capture_output=True, text=True, timeout=120,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert engine_without_venv.returncode == 2 and "lora-daemon setup --ui" in engine_without_venv.stdout
