"""checkpoints_list: title -> CheckpointInfo, from <models>/Stable-diffusion like the WebUI's list_models()."""
import os

from modules import paths


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.title = f"{self.name} [0000000000]"


checkpoints_list = {}
folder = os.path.join(paths.models_path, "Stable-diffusion")
for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    info = CheckpointInfo(os.path.join(folder, entry))
    checkpoints_list[info.title] = info
