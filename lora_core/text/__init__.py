"""Text LoRAs for causal language models (LLaMA, Qwen, ...): data, model, the `TextTask` the one loop drives, export.

Selected by ``model.task_type: text-generation``; see `lora_core.text.task`.
"""
