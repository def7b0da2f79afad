"""checkpoints_list: title -> CheckpointInfo, from <models>/Stable-diffusion, rebuilt by list_models() as the
WebUI's own checkpoint refresh does (A1111 and Forge both clear and refill the same dict)."""
import os

from modules import paths


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.title = f"{self.name} [0000000000]"


checkpoints_list = {}


def list_models():
    checkpoints_list.clear()
    folder = os.path.join(paths.models_path, "Stable-diffusion")
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        info = CheckpointInfo(os.path.join(folder, entry))
        checkpoints_list[info.title] = info


list_models()  # the WebUI lists its models once at start
