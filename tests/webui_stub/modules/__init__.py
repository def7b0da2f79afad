"""A minimal stand-in for the WebUI's ``modules`` package: just the API lora-scripts' scripts use.

Mirrors A1111 v1.10.1 / Forge names and signatures (script_callbacks, shared.opts/OptionInfo/cmd_opts, paths,
sd_models.checkpoints_list) so `tests/webui_stub/load_like_webui.py` can load ``scripts/`` the way the WebUI does.
"""
