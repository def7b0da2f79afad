"""Import this folder as the package ``lora_daemon`` when it is not installed (the WebUI extension folder, a checkout).

The folder is called ``daemon/`` (part of the extension's fixed layout) but its import name is ``lora_daemon``, so it
never collides with PyPI's ``python-daemon``, which owns the top-level name ``daemon``. Installed with pip, setuptools'
``package-dir`` does the mapping; run from a plain folder — A1111/Forge loading ``scripts/`` by path, or
``python <ext>/daemon ui`` in a WebUI-like venv — this module registers the folder under that name. It is loaded by
file path and uses only the standard library.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

NAME = "lora_daemon"
FOLDER = Path(__file__).resolve().parent


def import_lora_daemon(folder: Path = FOLDER) -> ModuleType:
    """The ``lora_daemon`` package: the one already imported if it lives in ``folder``, else ``folder`` registered."""
    loaded = sys.modules.get(NAME)
    if loaded is not None and Path(loaded.__file__).resolve().parent == folder.resolve():
        return loaded
    try:
        spec = importlib.util.find_spec(NAME)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == folder.resolve():
        return importlib.import_module(NAME)
    # Not installed, or installed from another copy: this folder wins, as the WebUI would expect of its extension.
    for key in [k for k in sys.modules if k == NAME or k.startswith(NAME + ".")]:
        del sys.modules[key]
    spec = importlib.util.spec_from_file_location(NAME, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return module
