"""Run by the WebUI at every launch: install the two small packages the extension needs in the WebUI's Python.

Only pyzmq (to talk to the training daemon) and watchdog (to notice new LoRA files) go into the WebUI environment;
the training engine (torch, diffusers, ...) gets its own venv through ``lora-daemon setup`` or the tab's Setup
button, because training libraries installed into a WebUI venv are the most common way extensions break it.
When both are present this does nothing and prints nothing, so it costs nothing at launch.
"""
import launch

REQUIREMENTS = (
    # (distribution name for launch.is_installed, pip requirement)
    ("pyzmq", "pyzmq>=25"),
    ("watchdog", "watchdog>=3"),
)

for dist, requirement in REQUIREMENTS:
    if not launch.is_installed(dist):
        launch.run_pip(f'install "{requirement}"', f"lora-scripts requirement: {requirement}")
