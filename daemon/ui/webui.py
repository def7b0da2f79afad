"""The extension inside A1111/Forge: settings, checkpoints, Lora folder, auth and lifetime of its threads.

`scripts/lora_scripts_tab.py` only registers callbacks that land here. This module is imported once per WebUI
process and stays cached in ``sys.modules`` across "Reload UI" (which re-imports only the scripts), so the one
`Runtime` below survives reloads: `app_started` (re)starts the Lora-folder watcher and `unloaded` stops it, so a
reload never leaves two watchers behind. Everything WebUI-specific is imported lazily from ``modules``.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

from . import gpu_handoff
from .context import TabContext, UiSettings
from .lora_watch import LoraWatcher
from .presets import DEFAULT_PRESET, list_presets
from .routes import AuthPolicy, mount, parse_credentials
from .setup_env import SetupJob

log = logging.getLogger(__name__)

SECTION = ("lora_scripts", "LoRA Training")
OPTION_KEYS = {  # setting key -> UiSettings field
    "lora_scripts_home": "home",
    "lora_scripts_endpoint": "endpoint",
    "lora_scripts_autostart": "autostart",
    "lora_scripts_default_preset": "default_preset",
    "lora_scripts_lora_dir": "lora_dir",
    "lora_scripts_daemon_python": "daemon_python",
}


def settings() -> UiSettings:
    """The extension's settings as saved in the WebUI's config.json (defaults before the user changed any)."""
    from modules import shared

    data = getattr(shared.opts, "data", {}) or {}
    values = {field: data[key] for key, field in OPTION_KEYS.items() if key in data}
    return UiSettings(**values)


def register_settings() -> None:
    """on_ui_settings: one "LoRA Training" section in the WebUI's Settings."""
    from modules import shared

    defaults = UiSettings()
    presets = [p.name for p in list_presets()] or [DEFAULT_PRESET]
    options = {
        "lora_scripts_home": shared.OptionInfo(defaults.home, "Daemon state folder (empty: the default)"),
        "lora_scripts_endpoint": shared.OptionInfo(
            defaults.endpoint, "Daemon endpoint, for a daemon installed elsewhere (empty: from the state folder)"),
        "lora_scripts_autostart": shared.OptionInfo(defaults.autostart, "Start the training daemon with the WebUI"),
        "lora_scripts_default_preset": shared.OptionInfo(defaults.default_preset, "Default preset",
                                                         _dropdown(), {"choices": presets}),
        "lora_scripts_lora_dir": shared.OptionInfo(defaults.lora_dir,
                                                   "Lora folder override (empty: the WebUI's Lora folder)"),
        "lora_scripts_daemon_python": shared.OptionInfo(
            defaults.daemon_python, "Python of the training engine (empty: the venv made by Set up)"),
    }
    for key, info in options.items():
        info.section = SECTION
        shared.opts.add_option(key, info)
    gpu_handoff.register_settings(shared, SECTION)  # one GPU for both: free VRAM, generate while training


def _dropdown() -> Any:
    import gradio as gr

    return gr.Dropdown


def lora_dir() -> Path:
    """The override from settings, else the WebUI's ``--lora-dir``, else ``<models>/Lora`` (as the WebUI does)."""
    override = settings().lora_dir
    if override:
        return Path(override).expanduser().resolve()
    from modules import paths, shared

    return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")).resolve()


def checkpoint_dir() -> Path:
    """The WebUI's ``--ckpt-dir``, else ``<models>/Stable-diffusion``: where the Combine section bakes checkpoints."""
    from modules import paths, shared

    return Path(getattr(shared.cmd_opts, "ckpt_dir", None) or os.path.join(paths.models_path, "Stable-diffusion")
                ).resolve()


def checkpoints() -> dict[str, str]:
    """The WebUI's checkpoint list: title → file."""
    from modules import sd_models

    return {title: info.filename for title, info in sd_models.checkpoints_list.items()}


def rescan_checkpoints() -> None:
    """Rescan the checkpoint folders the way the WebUI's own refresh button does (``sd_models.list_models()``,
    A1111 and Forge alike), so a model added since the WebUI started shows without that other refresh."""
    from modules import sd_models

    try:
        sd_models.list_models()
    except Exception as e:  # the WebUI's scan failing must not break the tab; the old list stays
        log.warning("could not rescan the WebUI's checkpoints: %s", e)


def refresh_networks() -> None:
    """Rebuild the WebUI's LoRA list (the builtin Lora extension's module is cached as ``networks``)."""
    try:
        import networks
    except ImportError:
        log.info("the builtin Lora extension is not loaded; new LoRAs show after its own refresh")
        return
    networks.list_available_networks()


def interrogators() -> dict[str, Any]:
    """The WebUI's own captioners (CLIP interrogator, DeepBooru), run in the WebUI process on its models."""
    found: dict[str, Any] = {}
    try:
        from modules import deepbooru, shared
    except ImportError:
        return found

    def open_image(path: Path):
        from PIL import Image  # the WebUI's own Pillow; the interrogators take PIL images

        with Image.open(path) as im:
            return im.convert("RGB")

    if getattr(shared, "interrogator", None) is not None:
        found["WebUI CLIP interrogator"] = lambda path: shared.interrogator.interrogate(open_image(path))
    if getattr(deepbooru, "model", None) is not None:
        found["WebUI DeepBooru"] = lambda path: deepbooru.model.tag(open_image(path))
    return found


def host_name() -> str:
    try:
        import modules_forge  # noqa: F401
    except ImportError:
        return "a1111"
    return "forge"


def auth_policy(app: Any) -> AuthPolicy:
    """Protect the routes like the WebUI's API: ``--api-auth`` users, plus the gradio login cookie if any."""
    from modules import shared

    users = parse_credentials(getattr(shared.cmd_opts, "api_auth", None))
    gradio_login = bool(getattr(shared.cmd_opts, "gradio_auth", None) or getattr(shared.cmd_opts,
                                                                                 "gradio_auth_path", None))
    tokens = (lambda: getattr(app, "tokens", {})) if gradio_login else None
    return AuthPolicy(users=users, gradio_tokens=tokens)


class Runtime:
    """The extension's state in the WebUI process: the tab context and the one Lora-folder watcher."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ctx = TabContext(settings=settings, checkpoints=checkpoints, lora_dir=lora_dir,
                              interrogators={}, host=host_name(), rescan_checkpoints=rescan_checkpoints,
                              checkpoint_dir=checkpoint_dir)
        self.watcher: Optional[LoraWatcher] = None
        # the WebUI and the daemon hand the GPU to each other (scripts/lora_scripts_handoff.py calls it per generation)
        self.handoff = gpu_handoff.GpuHandoff(client=lambda **kw: self.ctx.client(**kw),
                                              host=gpu_handoff.detect_host())
        self.ctx.handoff = self.handoff  # the tab shows its setting and question, and offers "reload now"

    def tab_context(self) -> TabContext:
        self.ctx.interrogators = interrogators()
        if self.ctx.setup is None:
            self.ctx.setup = SetupJob(self.ctx.home() / "venv")
        return self.ctx

    def _on_new_lora(self, path: Path) -> None:
        refresh_networks()
        self.ctx.feed.add(path)

    def app_started(self, app: Any) -> None:
        """on_app_started: routes on this app, a fresh watcher, and the daemon if asked to autostart."""
        mount(app, self.tab_context(), auth_policy(app))
        with self._lock:
            if self.watcher is not None:
                self.watcher.stop()
            self.watcher = LoraWatcher(lora_dir(), self._on_new_lora)
            self.watcher.start()
            self.handoff.stop()
            self.handoff.start()
        if settings().autostart:
            self._autostart()

    def _autostart(self) -> None:
        from ..client import DaemonError, DaemonNotRunning

        try:
            self.ctx.client(timeout=1.0).ping()
        except (DaemonNotRunning, DaemonError):
            if self.ctx.daemon_python() is not None:
                log.info(self.ctx.start_daemon())

    def unloaded(self) -> None:
        """on_script_unloaded: stop the watcher; the next app_started starts a new one."""
        with self._lock:
            if self.watcher is not None:
                self.watcher.stop()
                self.watcher = None
            self.handoff.stop()


RUNTIME = Runtime()


def ui_tabs() -> list:
    """on_ui_tabs: the tab, built against the WebUI's checkpoints and settings."""
    from .tab import ELEM_ID, TITLE, build_tab

    return [(build_tab(RUNTIME.tab_context()), TITLE, ELEM_ID)]
