"""Registers the LoRA Training tab with the WebUI; the work is done in `lora_daemon.ui.webui`.

The WebUI loads this file by path at startup and again at every "Reload UI". Nothing starts here: threads start in
``on_app_started`` and stop in ``on_script_unloaded``. If the extension cannot be
imported (a missing package), the tab still appears and says what is wrong and how to fix it.
"""
import importlib.util
import logging
from pathlib import Path

from modules import script_callbacks

EXT_DIR = Path(__file__).resolve().parent.parent
TITLE, ELEM_ID = "LoRA Training", "lora_scripts"
log = logging.getLogger("lora_scripts")


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_extension():
    """Our ``daemon/`` folder as ``lora_daemon`` (never ``daemon``, which PyPI's python-daemon owns)."""
    _load_by_path("lora_daemon_bootstrap", EXT_DIR / "daemon" / "bootstrap.py").import_lora_daemon()
    from lora_daemon.ui import webui

    return webui


def _error_tabs(error):
    """The fallback tab, loaded by file path because the package itself may be what failed to import."""
    fallback = _load_by_path("lora_scripts_fallback", EXT_DIR / "daemon" / "ui" / "fallback.py")
    return [(fallback.error_tab(error), TITLE, ELEM_ID)]


try:
    webui = _import_extension()
    load_error = None
except ImportError as e:
    webui, load_error = None, e
    log.error("lora-scripts: the LoRA Training tab cannot load: %s", e)


def on_ui_tabs():
    if webui is None:
        return _error_tabs(load_error)
    try:
        return webui.ui_tabs()
    except Exception as e:  # show the error in the tab instead of losing the tab
        log.exception("lora-scripts: building the LoRA Training tab failed")
        return _error_tabs(e)


def on_ui_settings():
    if webui is not None:
        webui.register_settings()


def on_app_started(demo, app):
    if webui is not None:
        webui.RUNTIME.app_started(app)


def on_script_unloaded():
    if webui is not None:
        webui.RUNTIME.unloaded()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(on_script_unloaded)
