"""Tells the LoRA Training extension when the WebUI generates, so a run on the same GPU can pause and resume.

An AlwaysVisible script with no UI: A1111 and Forge call ``process`` as every txt2img/img2img generation starts
(inside the generation lock) and ``postprocess`` when it ends. The policy lives in `lora_daemon.ui.gpu_handoff`;
the runtime it reaches is the one `lora_scripts_tab.py` loaded (cached in ``sys.modules`` across "Reload UI").
"""
import logging
import sys

from modules import scripts

log = logging.getLogger("lora_scripts")


def _handoff():
    webui = sys.modules.get("lora_daemon.ui.webui")  # imported by lora_scripts_tab.py; absent if it failed to load
    return getattr(getattr(webui, "RUNTIME", None), "handoff", None)


def _interrupted() -> bool:
    try:
        from modules import shared

        return bool(getattr(shared.state, "interrupted", False))
    except (ImportError, AttributeError):
        return False


class LoraTrainingHandoff(scripts.Script):
    def title(self):
        return "LoRA Training: GPU hand-off"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        handoff = _handoff()
        if handoff is None:
            return
        try:
            paused = handoff.before_generation(_interrupted)
        except Exception:  # the daemon gone, a network hiccup: generate anyway rather than fail the user's job
            log.exception("lora-scripts: could not hand the GPU over for this generation")
            return
        if paused:
            log.info("lora-scripts: generating while run(s) %s wait", ", ".join(paused))

    def postprocess(self, p, processed, *args):
        handoff = _handoff()
        if handoff is not None:
            try:
                handoff.after_generation()
            except Exception:
                log.exception("lora-scripts: could not schedule the run's resume")
