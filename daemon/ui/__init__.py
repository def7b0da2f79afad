"""The WebUI side of lora-scripts: the LoRA Training tab, its REST routes, the Lora-folder watcher, standalone mode.

Everything here runs inside the WebUI's Python (gradio 3.41 + pydantic 1 in A1111, gradio 4.40 + pydantic 2 in
Forge), where torch belongs to the WebUI and the trainer must never be imported. So this package may import only:

* the standard library and what the WebUI itself has: gradio, fastapi/starlette, PyYAML (a gradio dependency),
  Pillow, and the WebUI's own modules (``modules``, ``modules_forge``, ``networks``, imported lazily);
* pyzmq and watchdog (the two packages ``install.py`` adds to the WebUI's environment);
* from the daemon: `lora_daemon.client`, `lora_daemon.protocol`, `lora_daemon.home` and `lora_daemon.procs` (the
  standard-library process helper used to start the daemon).

Never `lora_daemon.server`, `.queue`, `.worker`, `.store` (they run in the daemon, with sqlite-utils and the
engine), never `lora_core`, torch, diffusers or transformers. The engine's config schema reaches the form as
``config_schema.json``, generated from `lora_core.config` (see `forms`). Training happens in the daemon.
tests/test_webui_boundary.py holds this list and checks it, in a clean interpreter and over the source.
"""
