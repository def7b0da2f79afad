"""`pip install` beside PyPI's python-daemon: both import in one interpreter, installed or run from the folder.

python-daemon owns the top-level import name ``daemon``. Our folder is called ``daemon/`` too, but installs (and
loads from a plain folder) as ``lora_daemon``, so neither overwrites the other. These tests build real venvs with
the system's pip: editable and non-editable installs of a copy of this checkout (``--no-deps
--no-build-isolation``: the engine's dependencies come from the system site-packages, nothing is downloaded but
python-daemon), and a bare venv without the project, where ``python <checkout>/daemon --help`` must still work.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # three venvs and pip runs: about a minute on 2 cores

PROBE = r"""
import json, daemon, lora_daemon, lora_daemon.cli, lora_daemon.ui.forms
print("REPORT " + json.dumps({"daemon": daemon.__file__, "context": daemon.DaemonContext.__module__,
                              "lora_daemon": lora_daemon.__file__, "main": lora_daemon.cli.main.__module__,
                              "schema": str(lora_daemon.ui.forms.SCHEMA_FILE)}))
"""


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def pip(python: Path, *args) -> None:
    """The system pip installing into another interpreter (``--python``): no pip bootstrap in each venv."""
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", *args)


@pytest.fixture(scope="session")
def wheels(tmp_path_factory) -> Path:
    """python-daemon (and lockfile, its one dependency) and pyzmq, downloaded once from PyPI for every venv."""
    folder = tmp_path_factory.mktemp("wheels")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "-d",
                           str(folder), "python-daemon", "pyzmq"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        message = f"cannot download python-daemon from PyPI: {done.stderr[-500:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def checkout(tmp_path_factory) -> Path:
    """A copy of what pip builds from (so build/ and egg-info land there, not in the shared working tree)."""
    dest = tmp_path_factory.mktemp("checkout") / "lora-scripts"
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("lora_core", "daemon", "configs"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def venv(path: Path, system_site_packages: bool) -> Path:
    args = ["--without-pip"] + (["--system-site-packages"] if system_site_packages else [])
    run(sys.executable, "-m", "venv", *args, path)
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "wheel"])
def test_the_project_and_python_daemon_install_into_one_venv_and_both_import(editable, wheels, checkout, tmp_path):
    python = venv(tmp_path / "venv", system_site_packages=True)
    # one pip run (each costs seconds): ours, then python-daemon and its one dependency, from the wheel folder
    pip(python, "--no-deps", "--no-build-isolation", "--no-index", "--find-links", wheels,
        *(["-e"] if editable else []), checkout, "python-daemon", "lockfile")
    report = json.loads(run(python, "-c", PROBE, cwd=tmp_path).stdout.split("REPORT ", 1)[1])
    site = tmp_path / "venv"
    assert Path(report["daemon"]).resolve().is_relative_to(site) and report["context"] == "daemon.daemon"
    ours = Path(report["lora_daemon"]).resolve()
    assert ours == (checkout / "daemon" / "__init__.py" if editable else
                    next(site.glob("lib*/python*/site-packages")) / "lora_daemon" / "__init__.py")
    assert report["main"] == "lora_daemon.cli" and Path(report["schema"]).is_file()  # package data is shipped
    assert "submit" in run(python, "-m", "lora_daemon.cli", "--help", cwd=tmp_path).stdout
    script = python.parent / ("lora-daemon.exe" if os.name == "nt" else "lora-daemon")
    assert "submit" in run(script, "--help", cwd=tmp_path).stdout


def test_the_folder_runs_as_lora_daemon_in_a_venv_without_the_project(wheels, tmp_path):
    """What a WebUI extension folder gets: no install, pyzmq and python-daemon present, `python <ext>/daemon`."""
    python = venv(tmp_path / "venv", system_site_packages=False)
    pip(python, "--no-index", "--find-links", wheels, "python-daemon", "pyzmq")
    missing = subprocess.run([str(python), "-c", "import lora_daemon"], capture_output=True, text=True,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert missing.returncode != 0 and "No module named 'lora_daemon'" in missing.stderr
    # Python puts the folder itself first on sys.path, where daemon/queue.py would shadow the standard library's
    # `queue` for everything imported later (gradio's urllib3 does): an exit hook imports it after the CLI ran.
    site = next((tmp_path / "venv").glob("lib*/python*/site-packages"), None) or tmp_path / "venv/Lib/site-packages"
    (site / "sitecustomize.py").write_text("import atexit\n\n@atexit.register\ndef report():\n"
                                           "    import queue\n    print('QUEUE', queue.__file__)\n")
    out = run(python, ROOT / "daemon", "--help", cwd=tmp_path).stdout
    assert "submit" in out
    stdlib_queue = Path(out.split("QUEUE ", 1)[1].strip())
    assert stdlib_queue.name == "queue.py" and stdlib_queue.parent != ROOT / "daemon", out
    both = run(python, "-c", "import importlib.util, daemon\n"
               f"spec = importlib.util.spec_from_file_location('b', {str(ROOT / 'daemon' / 'bootstrap.py')!r})\n"
               "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
               "ours = b.import_lora_daemon(); import lora_daemon.client\n"
               "print(daemon.DaemonContext.__module__, ours.__file__)", cwd=tmp_path)
    context, ours = both.stdout.splitlines()[0].split()
    assert context == "daemon.daemon" and Path(ours).resolve() == ROOT / "daemon" / "__init__.py"
