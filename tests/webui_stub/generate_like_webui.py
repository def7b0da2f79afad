"""Generate the way A1111 does while the daemon trains, and print what the GPU hand-off did (JSON).

Run with a WebUI-like Python: ``python generate_like_webui.py EXT_DIR RUN_ID`` with ``WEBUI_STUB_ROOT``,
``LORA_DAEMON_HOME`` (a real daemon training RUN_ID on slot ``WEBUI_STUB_DEVICE_ID``) set. Steps:

1. load scripts/ as A1111 does, keeping every ``scripts.Script`` subclass (modules/scripts.py instantiates them),
   register the settings and fire app_started (which starts the extension's event thread);
2. wait for the WebUI's model to be moved off the GPU (the run started on our device);
3. one generation as ``wrap_gradio_gpu_call`` + ``process_images`` run it: under ``queue_lock``, every
   AlwaysVisible script's ``process(p)``, the model back (``reload_model_weights``), the "sampling", then
   ``postprocess(p, processed)``;
4. wait for the run to resume after the idle delay, and for it to finish.
"""
import argparse
import importlib.util
import inspect
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stub `modules`, `networks`, `launch`
if "--forge" in sys.argv:  # play Forge: its `backend.memory_management` importable as well
    sys.path.insert(0, str(Path(__file__).resolve().parent / "forge"))

from fastapi import FastAPI  # noqa: E402

from modules import call_queue, script_callbacks, scripts, sd_models, shared  # noqa: E402


def load_scripts(ext_dir: Path) -> list:
    """modules/scripts.py: load each file by path, instantiate the Script subclasses it defines."""
    found = []
    for path in sorted((ext_dir / "scripts").glob("*.py")):
        sys.path.insert(0, str(ext_dir))
        try:
            spec = importlib.util.spec_from_file_location(path.name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(ext_dir))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, scripts.Script) and cls is not scripts.Script:
                found.append(cls())
    return [s for s in found if s.show(False) is scripts.AlwaysVisible]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}; sd_models calls: {sd_models.calls}")


def generate(always_on: list, run_status) -> dict:
    """One txt2img job: what the run was while the WebUI sampled."""
    p = SimpleNamespace(prompt="a cat", steps=1)
    with call_queue.queue_lock:
        for script in always_on:
            script.process(p)
        sd_models.reload_model_weights()  # process_images: the model back on the GPU if it was moved to RAM
        during = run_status()
        processed = SimpleNamespace(images=[])
        for script in always_on:
            script.postprocess(p, processed)
    return during


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ext_dir")
    parser.add_argument("run_id")
    parser.add_argument("--idle", type=float, default=1.0)
    parser.add_argument("--forge", action="store_true")
    args = parser.parse_args()
    always_on = load_scripts(Path(args.ext_dir).resolve())
    script_callbacks.ui_settings_callback()
    shared.opts.data["lora_scripts_resume_idle_s"] = args.idle  # as the user sets it in Settings
    script_callbacks.app_started_callback(None, FastAPI())

    from lora_daemon.client import DaemonClient

    client = DaemonClient(timeout=30)
    get = lambda: client.get(args.run_id)  # noqa: E731
    from lora_daemon.ui import webui

    report = {"scripts": [s.title() for s in always_on], "host": webui.RUNTIME.handoff.host.name,
              "settings": {k: shared.opts.data[k] for k in shared.opts.data_labels if "gpu" in k or "idle" in k
                           or "while" in k}}
    wait_for(lambda: sd_models.calls, 600, "the WebUI's model to leave the GPU")
    report["on_gpu_while_training"] = sd_models.on_gpu
    wait_for(lambda: (get()["step"] or 0) >= 2 and get()["status"] == "running", 600, "training to reach step 2")
    report["step_before"] = get()["step"]
    run = generate(always_on, get)
    report["during"] = {k: run.get(k) for k in ("status", "pause_reason", "step", "pid")}
    wait_for(lambda: get()["status"] in ("queued", "running", "finished"), 600, "the run to resume after idling")
    wait_for(lambda: get()["status"] == "finished", 900, "the resumed run to finish")
    report["final"] = {k: get().get(k) for k in ("status", "step", "total_steps", "published_file")}
    report["on_gpu_after"] = sd_models.on_gpu
    report["calls"] = sd_models.calls
    script_callbacks.script_unloaded_callback()
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
