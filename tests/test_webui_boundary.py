"""The WebUI side is a room of its own: it never loads the trainer, the daemon's internals or torch.

`lora_daemon.ui` runs in the WebUI's Python. Its package docstring lists what it may import; these tests hold
the same list. One imports the tab, the REST routes and the WebUI glue in a clean WebUI-like interpreter (the
gradio 3.41 / 4.40 venvs of tests/prepare_webui_envs.py, the folder loaded through daemon/bootstrap.py as
scripts/lora_scripts_tab.py does, the repository on sys.path so a stray ``import lora_core`` would succeed) and
records every import of a forbidden name, even one that fails or is caught. The other reads the source.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prepare_webui_envs import ENVS, require, venv_python

ROOT = Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "daemon" / "ui"
STUB = ROOT / "tests" / "webui_stub"

FORBIDDEN_TOP = ("torch", "lora_core", "sqlite_utils", "diffusers", "transformers", "peft", "accelerate")
FORBIDDEN_DAEMON = ("lora_daemon.server", "lora_daemon.queue", "lora_daemon.worker", "lora_daemon.store")
ALLOWED_DAEMON = ("lora_daemon.client", "lora_daemon.protocol", "lora_daemon.home", "lora_daemon.procs")
ALLOWED_THIRD_PARTY = ("gradio", "fastapi", "starlette", "yaml", "PIL", "zmq", "watchdog",
                       "modules", "modules_forge", "networks")  # the WebUI's own, imported lazily in webui.py

PROBE = r"""
import importlib.abc, importlib.util, json, sys
FORBIDDEN = %(forbidden)r
tried = []

class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if any(fullname == f or fullname.startswith(f + ".") for f in FORBIDDEN):
            tried.append(fullname)
        return None

sys.meta_path.insert(0, Recorder())
sys.path.insert(0, %(stub)r)  # the WebUI's `modules`, as A1111/Forge provide it
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", %(bootstrap)r)
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
package = bootstrap.import_lora_daemon()
import lora_daemon.ui.tab, lora_daemon.ui.routes, lora_daemon.ui.webui
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
print("REPORT " + json.dumps({"package": package.__file__, "tried": sorted(set(tried)), "loaded": loaded,
                              "gradio": sys.modules["gradio"].__version__}))
try:  # the canary: the recorder must see an engine import, so an empty report above means something
    import lora_core.errors
except Exception:
    pass
print("CANARY " + json.dumps(sorted(set(tried))))
"""


def present_envs() -> list[str]:
    """.venv-gradio3 always (skipped, or failed under CI, when missing); .venv-gradio4 where it was built."""
    return [name for name in ENVS if name == ".venv-gradio3" or venv_python(name).exists()]


@pytest.mark.parametrize("env_name", present_envs())
def test_the_tab_routes_and_webui_glue_import_without_engine_or_daemon_internals(env_name, tmp_path):
    python = require(env_name)
    script = PROBE % {"forbidden": FORBIDDEN_TOP + FORBIDDEN_DAEMON, "stub": str(STUB),
                      "bootstrap": str(ROOT / "daemon" / "bootstrap.py")}
    env = {**os.environ, "PYTHONPATH": "", "WEBUI_STUB_ROOT": str(tmp_path / "webui"),
           "LORA_DAEMON_HOME": str(tmp_path / "home")}
    (tmp_path / "webui").mkdir()
    # cwd = the repository, so `lora_core` is importable here: a stray import would load it, not fail quietly
    done = subprocess.run([str(python), "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert Path(report["package"]).resolve() == ROOT / "daemon" / "__init__.py"
    assert report["loaded"] == [] and report["tried"] == [], report
    canary = [line for line in done.stdout.splitlines() if line.startswith("CANARY ")]
    assert "lora_core" in json.loads(canary[-1][len("CANARY "):])


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, anywhere in it (lazy imports too), as absolute names."""
    package = "lora_daemon.ui"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                if node.module:
                    found.append((node.lineno, f"{base}.{node.module}"))
                else:  # `from .. import procs`
                    found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            elif node.module != "__future__":
                found.append((node.lineno, node.module))
    return found


def _allowed(name: str) -> bool:
    top = name.split(".")[0]
    if name.startswith("lora_daemon."):
        return name.startswith("lora_daemon.ui") or name.split(".")[:2] in [a.split(".") for a in ALLOWED_DAEMON]
    return top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY


def test_no_webui_module_imports_anything_off_the_list():
    files = sorted(UI_DIR.glob("*.py"))
    assert len(files) >= 10
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in files for line, name in _imports(path)
           if not _allowed(name)]
    assert bad == [], "the WebUI side imports what its package docstring forbids:\n" + "\n".join(bad)


def test_the_checker_sees_relative_lazy_and_engine_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .. import procs\nfrom ..server import Daemon\n"
                     "def later():\n    import torch\n    from lora_core.config import config_from_dict\n")
    names = [name for _, name in _imports(probe)]
    assert names == ["lora_daemon.procs", "lora_daemon.server", "torch", "lora_core.config"]
    assert [_allowed(n) for n in names] == [True, False, False, False]


def test_the_package_docstring_states_the_same_list():
    import lora_daemon.ui as ui

    doc = ui.__doc__
    for name in ALLOWED_DAEMON + ("gradio", "fastapi", "pyzmq", "watchdog"):
        assert name in doc, name
    for name in ("server", "queue", "worker", "store", "lora_core", "torch"):
        assert name in doc, name
