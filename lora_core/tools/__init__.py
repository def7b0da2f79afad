"""The LoRA toolbox: inspect, merge, bake, resize and extract (``lora-tools …`` / ``python -m lora_core.tools``).

One module per command; `lora_file` reads every supported file format into one per-module structure, `ckpt_keys`
maps LoRA modules onto checkpoint tensors, `stream` reads/writes safetensors tensor by tensor, `lowrank` holds the
SVD maths. Nothing here imports the daemon; the daemon runs these commands as child processes (``--events``).
"""
