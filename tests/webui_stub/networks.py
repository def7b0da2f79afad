"""The builtin Lora extension's `networks` module: list_available_networks() rescans the Lora folder."""
import os

from modules import paths, shared

available_networks = {}
refresh_count = 0


def list_available_networks():
    global refresh_count
    refresh_count += 1
    folder = shared.cmd_opts.lora_dir or os.path.join(paths.models_path, "Lora")
    available_networks.clear()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.endswith(".safetensors"):
            available_networks[name[: -len(".safetensors")]] = os.path.join(folder, name)
