"""The GPU hand-off's "ask" setting in a WebUI-like process, answered through the tab's REST routes (JSON report).

Run with a WebUI-like Python: ``python ask_like_webui.py EXT_DIR KEEP_RUN FREE_RUN [--forge]`` with
``WEBUI_STUB_ROOT``, ``LORA_DAEMON_HOME`` (a real daemon with KEEP_RUN training and FREE_RUN queued behind it on
slot ``WEBUI_STUB_DEVICE_ID``) set. Steps:

1. load scripts/ as A1111 does, register the settings, set ``lora_scripts_gpu_handoff`` to "ask" as a user does in
   Settings, build the tab (``ui_tabs``), fire app_started on a FastAPI app served over real HTTP (uvicorn);
2. KEEP_RUN starts: the live poll carries the question; "Keep" (``POST handoff/keep``) leaves the model where it is;
3. KEEP_RUN is cancelled, FREE_RUN starts: asked again; "Free" moves the model off the GPU under the generation lock;
4. "Reload the WebUI's model now": the REST route, then the tab's own button handler; FREE_RUN finishes.
"""
import argparse
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stub `modules`, `networks`, `launch`
if "--forge" in sys.argv:  # play Forge: its `backend.memory_management` importable as well
    sys.path.insert(0, str(Path(__file__).resolve().parent / "forge"))

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from generate_like_webui import load_scripts, wait_for  # noqa: E402
from modules import script_callbacks, sd_models, shared  # noqa: E402

API = "/lora-scripts/v1"


def serve(app) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_for(lambda: server.started, 60, "the HTTP server")
    return f"http://127.0.0.1:{port}{API}"


def call(url: str, method: str = "GET") -> dict:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=120) as res:
        return json.loads(res.read())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ext_dir")
    parser.add_argument("keep_run")
    parser.add_argument("free_run")
    parser.add_argument("--forge", action="store_true")
    args = parser.parse_args()
    load_scripts(Path(args.ext_dir).resolve())
    script_callbacks.ui_settings_callback()
    shared.opts.data["lora_scripts_gpu_handoff"] = "ask"  # as the user sets it in Settings → LoRA Training
    tabs = script_callbacks.ui_tabs_callback()
    demo = tabs[0][0]
    app = FastAPI()
    script_callbacks.app_started_callback(demo, app)
    base = serve(app)

    from lora_daemon.client import DaemonClient
    from lora_daemon.ui import webui

    client = DaemonClient(timeout=30)
    handoff = webui.RUNTIME.handoff
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    reload_button = [f.fn for f in fns if getattr(f.fn, "__name__", "") == "reload_webui_model"]
    ids = sorted(getattr(b, "elem_id", None) or "" for b in demo.blocks.values())
    report = {"host": handoff.host.name, "reload_handlers": len(reload_button),
              "reload_visible": [getattr(b, "visible", None) for b in demo.blocks.values()
                                 if getattr(b, "elem_id", None) == "lora_scripts_handoff_reload"],
              "hosts": [i for i in ids if "handoff" in i]}

    wait_for(lambda: handoff.asked == args.keep_run, 600, "the question for the first run")
    report["calls_before_answer"] = list(sd_models.calls)
    report["asked"] = call(f"{base}/live")["handoff"]
    report["keep"] = call(f"{base}/handoff/keep", "POST")
    report["after_keep"] = call(f"{base}/live")["handoff"]
    report["calls_after_keep"] = list(sd_models.calls)

    client.cancel(args.keep_run)
    wait_for(lambda: handoff.asked == args.free_run, 600, "the question for the second run")
    report["asked_again"] = call(f"{base}/live")["handoff"]
    report["free"] = call(f"{base}/handoff/free", "POST")
    report["calls_after_free"] = list(sd_models.calls)
    report["reload"] = call(f"{base}/handoff/reload", "POST")
    report["calls_after_reload"] = list(sd_models.calls)
    report["button"] = reload_button[0]() if reload_button else None
    report["calls_after_button"] = list(sd_models.calls)
    try:
        call(f"{base}/handoff/nonsense", "POST")
        report["nonsense"] = "accepted"
    except urllib.error.HTTPError as e:
        report["nonsense"] = e.code
    wait_for(lambda: client.get(args.free_run)["status"] in ("finished", "failed"), 900, "the second run to end")
    report["final"] = {k: client.get(args.free_run).get(k) for k in ("status", "step", "error")}
    report["after_end"] = call(f"{base}/live")["handoff"]
    script_callbacks.script_unloaded_callback()
    print("REPORT " + json.dumps(report, default=str))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
