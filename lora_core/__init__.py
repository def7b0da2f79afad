"""lora-scripts training engine: YAML config → dataset → base model → peft LoRA → accelerate loop → safetensors.

Importable without gradio or zmq. Entry points: `lora_core.train` (CLI `lora-train`), `lora_core.tiny`,
`lora_core.dataset`, `lora_core.dataset.auto_label`, `lora_core.text.generate`.
"""
__version__ = "0.1.0"
