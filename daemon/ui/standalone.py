"""``lora-daemon ui``: the LoRA Training tab in a plain gradio app on 127.0.0.1, for people without a WebUI.

Serves exactly the tab the WebUI shows, with the same REST routes and the same JavaScript and CSS (injected into
the page the way A1111 injects extension scripts), so the browser tests exercise the real thing. Checkpoints come
from a folder; finished LoRAs are published to ``--lora-dir`` (default ``<state folder>/Lora``, the daemon's own
default) and announced by the same folder watcher the WebUI uses.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
from pathlib import Path
from typing import Optional

from ..home import resolve_home

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_EXTS = (".safetensors", ".ckpt")
GRADIO_HINT = ("the standalone tab needs gradio, which cannot share the engine's environment: run "
               "`lora-daemon setup --ui` once (it makes <state folder>/ui-venv), then `lora-daemon ui` again — or use "
               "the WebUI extension instead")


def list_checkpoints(folder: Optional[Path]) -> dict[str, str]:
    """Model files and diffusers folders (with model_index.json) directly in ``folder``, by name."""
    if folder is None or not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in MODEL_EXTS:
            found[path.name] = str(path.resolve())
        elif path.is_dir() and (path / "model_index.json").is_file():
            found[path.name] = str(path.resolve())
    return found


def page_assets() -> tuple[str, str]:
    """The extension's JavaScript and CSS as inline tags, what the WebUI would link from javascript/ and style.css."""
    scripts = "".join(f"<script>{p.read_text(encoding='utf-8')}</script>"
                      for p in sorted((REPO_ROOT / "javascript").glob("*.js")))
    css = f"<style>{(REPO_ROOT / 'style.css').read_text(encoding='utf-8')}</style>"
    return scripts, css


def inject_assets() -> None:
    """Add our JS/CSS to every page gradio renders (the same patch A1111 and Forge apply for extensions)."""
    import gradio.routes

    original = gradio.routes.templates.TemplateResponse
    if getattr(original, "lora_scripts", False):
        return
    scripts, css = page_assets()

    def template_response(*args, **kwargs):
        response = original(*args, **kwargs)
        response.body = response.body.replace(b"</head>", f"{scripts}</head>".encode("utf-8"))
        response.body = response.body.replace(b"</body>", f"{css}</body>".encode("utf-8"))
        response.init_headers()
        return response

    template_response.lora_scripts = True
    gradio.routes.templates.TemplateResponse = template_response


def _queue(blocks) -> None:
    """Let several handlers run at once (auto-caption waits for its job) under either gradio major."""
    params = inspect.signature(blocks.queue).parameters
    if "default_concurrency_limit" in params:
        blocks.queue(default_concurrency_limit=8)
    else:
        blocks.queue(concurrency_count=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=7870)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer)")
    parser.add_argument("--checkpoints", help="folder of base models (.safetensors files or diffusers folders)")
    parser.add_argument("--lora-dir", help="where finished LoRAs go (default: <state folder>/Lora)")
    parser.add_argument("--endpoint", help="a daemon at this endpoint instead of the one in the state folder")
    parser.add_argument("--auth", help="user:password to require a login (like the WebUI's --gradio-auth)")


def _run_in_ui_venv(args: argparse.Namespace) -> int:
    """This Python has no gradio (the engine's never has): serve the tab from the venv `lora-daemon setup --ui`
    made, with the same arguments; without that venv, say how to make it."""
    import subprocess

    from .setup_env import ui_command, ui_python

    home = resolve_home(getattr(args, "home", None))
    python = ui_python(home)
    if not python.exists():
        log.error(GRADIO_HINT)
        print(f"lora-daemon ui: {GRADIO_HINT}")
        return 2
    command = ui_command(home, python) + ["--port", str(args.port), "--host", args.host]
    for flag, value in (("--checkpoints", args.checkpoints), ("--lora-dir", args.lora_dir),
                        ("--endpoint", args.endpoint), ("--auth", args.auth)):
        if value:
            command += [flag, value]
    if os.name == "posix":  # become the UI process, so a service manager's stop signal reaches gradio itself
        os.execv(command[0], command)
    try:  # Windows-only: execv would start a second process and leave this one's console behind
        return subprocess.run(command).returncode
    except KeyboardInterrupt:
        return 0


def run(args: argparse.Namespace) -> int:
    """``lora-daemon ui``: serve the tab until Ctrl+C."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401  (only to report a missing install clearly)
    except ImportError:
        return _run_in_ui_venv(args)
    from .context import TabContext, UiSettings
    from .lora_watch import LoraWatcher
    from .routes import AuthPolicy, mount, parse_credentials
    from .setup_env import SetupJob
    from .tab import build_tab

    home = resolve_home(getattr(args, "home", None))
    settings = UiSettings(home=str(home), endpoint=args.endpoint or "", lora_dir=args.lora_dir or "")
    lora_dir = Path(args.lora_dir).expanduser().resolve() if args.lora_dir else home / "Lora"
    checkpoints = Path(args.checkpoints).expanduser().resolve() if args.checkpoints else None
    ctx = TabContext(settings=lambda: settings, checkpoints=lambda: list_checkpoints(checkpoints),
                     lora_dir=lambda: lora_dir, setup=SetupJob(home / "venv"), host="standalone",
                     checkpoint_dir=(lambda: checkpoints) if checkpoints else None)
    watcher = LoraWatcher(lora_dir, ctx.feed.add)
    inject_assets()
    blocks = build_tab(ctx)
    _queue(blocks)
    users = parse_credentials(args.auth)
    app, url, _ = blocks.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                                show_api=False, inbrowser=False, auth=list(users.items()) or None)
    tokens = (lambda: getattr(app, "tokens", {})) if users else None
    mount(app, ctx, AuthPolicy(users=users, gradio_tokens=tokens))
    watcher.start()
    print(f"lora-scripts tab on {url} (state folder {home}, Lora folder {lora_dir})", flush=True)
    try:
        blocks.block_thread()
    finally:
        watcher.stop()
    return 0

