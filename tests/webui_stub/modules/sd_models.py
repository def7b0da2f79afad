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


# The checkpoint on or off the GPU, as A1111's unload_model_weights (to RAM) / reload_model_weights (back) do; each
# call is recorded with whether the generation lock was held, for the GPU hand-off tests.
calls = []
on_gpu = True


def _record(name):
    from modules import call_queue

    calls.append({"call": name, "locked": call_queue.queue_lock.locked()})


def unload_model_weights(sd_model=None, info=None):
    global on_gpu
    _record("unload")
    on_gpu = False


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    global on_gpu
    _record("reload")
    on_gpu = True
