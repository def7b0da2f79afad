"""Serve the extension the way A1111/Forge do under ``--api-auth``/``--gradio-auth``, for HTTP tests of its routes.

``python serve_like_webui.py EXT_DIR --port N [--api-auth u:p] [--gradio-auth u:p] [--opt KEY=VALUE]`` with
``WEBUI_STUB_ROOT`` set:
loads ``scripts/`` like `load_like_webui`, launches the Blocks with gradio's login when ``--gradio-auth`` is given
(as modules/ui + webui.py do), runs the app_started callbacks on the app gradio made, prints ``READY <url>`` and
serves until terminated.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stub `modules`, `networks`, `launch`

from load_like_webui import build_ui, load_scripts  # noqa: E402
from modules import script_callbacks, shared  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ext_dir")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-auth")
    parser.add_argument("--gradio-auth")
    parser.add_argument("--opt", action="append", default=[], help="KEY=VALUE: a setting as saved in Settings")
    args = parser.parse_args()
    shared.cmd_opts.api_auth = args.api_auth
    shared.cmd_opts.gradio_auth = args.gradio_auth
    load_scripts(Path(args.ext_dir).resolve())
    demo, _ = build_ui()
    for pair in args.opt:  # after the settings registered their defaults, as a saved config.json overrides them
        key, _, value = pair.partition("=")
        shared.opts.data[key] = value
    creds = [tuple(pair.split(":", 1)) for pair in (args.gradio_auth or "").split(",") if ":" in pair]
    app, url, _ = demo.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True,
                              auth=creds or None, show_api=False, inbrowser=False)
    script_callbacks.app_started_callback(demo, app)
    print(f"READY {url}", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    main()
