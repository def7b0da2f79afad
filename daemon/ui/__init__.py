"""The WebUI side of lora-scripts: the LoRA Training tab, its REST routes, the Lora-folder watcher, standalone mode.

Everything here runs inside the WebUI's Python (gradio 3.41 + pydantic 1 in A1111, gradio 4.40 + pydantic 2 in
Forge), so it imports only the standard library, gradio, fastapi, pyzmq, watchdog and `lora_daemon.client` /
`lora_daemon.protocol` — never torch, diffusers or `lora_core`. Training happens in the daemon.
"""
