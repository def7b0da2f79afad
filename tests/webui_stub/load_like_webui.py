"""Load the extension's scripts/ the way A1111 does, drive its callbacks, and print what registered (JSON).

Run with a WebUI-like Python (tests/prepare_webui_envs.py): ``python load_like_webui.py EXT_DIR`` with
``WEBUI_STUB_ROOT`` set. ``--block MODULE`` makes ``import MODULE`` fail, to see the missing-dependency tab.
Two loads with an unload in between mimic "Reload UI".
"""
import argparse
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stub `modules`, `networks`, `launch`

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from modules import script_callbacks, shared  # noqa: E402


class Block(importlib.abc.MetaPathFinder):
    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ImportError(f"No module named '{fullname}'", name=fullname)
        return None


def load_scripts(ext_dir: Path) -> None:
    """modules/scripts.py + script_loading.load_module: by file path, ext dir on sys.path only while importing."""
    for path in sorted((ext_dir / "scripts").glob("*.py")):
        sys.path.insert(0, str(ext_dir))
        try:
            spec = importlib.util.spec_from_file_location(path.name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(ext_dir))


def build_ui() -> tuple:
    """modules/ui.py create_ui: settings first, then every extension tab inside one Blocks."""
    script_callbacks.ui_settings_callback()
    tabs = script_callbacks.ui_tabs_callback()
    with gr.Blocks(analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in tabs:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    return demo, tabs


def refreshed_models(demo, n: int) -> dict:
    """Add a checkpoint file after the UI was built, then run the tab's own model refresh (what its Refresh button
    and the page load call) and report which titles it offers."""
    from modules import paths

    folder = Path(paths.models_path) / "Stable-diffusion"
    (folder / f"added_{n}.safetensors").write_bytes(b"")
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    refresh = [f.fn for f in fns if getattr(f.fn, "__name__", "") == "refresh_models"]
    if not refresh:  # the tab could not load (e.g. pyzmq missing): nothing to refresh
        return {"handlers": 0, "choices": [], "value": None}
    update = refresh[0](None)
    return {"handlers": len(refresh), "choices": [c if isinstance(c, str) else c[0] for c in update["choices"]],
            "value": update["value"]}


def watcher_threads() -> int:
    return [t.name for t in threading.enumerate()].count("lora-scripts-watch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ext_dir")
    parser.add_argument("--block")
    args = parser.parse_args()
    if args.block:
        sys.meta_path.insert(0, Block(args.block))
    ext_dir = Path(args.ext_dir).resolve()
    report = {"loads": []}
    for _ in range(2):
        load_scripts(ext_dir)
        demo, tabs = build_ui()
        app = FastAPI()
        script_callbacks.app_started_callback(demo, app)  # starts the watcher before it returns
        html = [c.value for c in demo.blocks.values() if isinstance(c, gr.HTML)]
        report["loads"].append({
            "tabs": [[label, ifid] for _, label, ifid in tabs],
            "settings": sorted(k for k in shared.opts.data_labels if k.startswith("lora_scripts")),
            "routes": sorted(r.path for r in app.routes if r.path.startswith("/lora-scripts")),
            "watchers": watcher_threads(),
            "refreshed_models": refreshed_models(demo, len(report["loads"])),
            "error_html": [h for h in html if "lora_scripts_load_error" in (h or "")],
            "run_kinds": [c if isinstance(c, str) else c[0] for b in demo.blocks.values()
                          if getattr(b, "elem_id", None) == "lora_scripts_run_kind" for c in b.choices],
            "text_fields": sorted(b.elem_id[len("lora_scripts_text_"):] for b in demo.blocks.values()
                                  if (getattr(b, "elem_id", None) or "").startswith("lora_scripts_text_")
                                  and "_err_" not in b.elem_id and "text_err" not in b.elem_id),
        })
        script_callbacks.before_reload_callback()
        script_callbacks.script_unloaded_callback()
        script_callbacks.clear_callbacks()
    report["watchers_after_unload"] = watcher_threads()
    report["heavy_modules"] = sorted(m for m in ("torch", "diffusers", "transformers", "lora_core", "sqlite_utils")
                                     if m in sys.modules)
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
