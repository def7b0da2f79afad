"""The tab shown when the extension cannot load: it says what is missing and how to fix it.

Without this, an import error in a WebUI script only reaches the console and the tab silently disappears — the most
common complaint about training extensions. Imports nothing but gradio, so it works whatever else is broken.
"""
from __future__ import annotations

from html import escape

import gradio as gr

FIXES = {
    "zmq": "pyzmq is missing: restart the WebUI so the extension's install.py installs it, or run "
           "<code>python -m pip install pyzmq</code> with the WebUI's Python.",
    "watchdog": "watchdog is missing: restart the WebUI so the extension's install.py installs it, or run "
                "<code>python -m pip install watchdog</code> with the WebUI's Python.",
}


def error_tab(error: BaseException) -> gr.Blocks:
    missing = getattr(error, "name", None) or ""
    fix = FIXES.get(missing.split(".")[0], "Check the WebUI console for the full error, then restart the WebUI.")
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.HTML(f'<div class="lora-scripts-msg lora-scripts-error" id="lora_scripts_load_error">'
                f"<b>The LoRA Training extension could not load.</b><br>"
                f"{escape(type(error).__name__)}: {escape(str(error))}<br>{fix}</div>")
    return blocks
