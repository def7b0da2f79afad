"""A text LoRA queued on the real daemon: trained in a real child process, published to the adapters folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from daemon_fixtures import daemon, daemon_factory, wait_until  # noqa: F401  (fixtures)
from lora_core.text.tiny import write_tiny_instruction_set
from text_fixtures import tiny_llama  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def text_run_config(base: Path, data: Path, name: str) -> dict:
    """A sectioned text-generation config, as the tab sends it."""
    return {
        "model": {"task_type": "text-generation", "base_model": str(base), "target_modules": ["all-linear"]},
        "data": {"train_data_file": str(data), "max_seq_length": 64, "validation_split": 0.2},
        "training": {"max_train_steps": 6, "batch_size": 4, "learning_rate": 1e-2},
        "output": {"output_name": name, "save_steps": 3},
        "sample": {"sample_prompts": ["What colour is the sky?"], "sample_every_n_steps": 3,
                   "sample_max_new_tokens": 6},
    }


def test_daemon_trains_a_text_lora_and_publishes_it_to_the_adapters_folder(daemon, tiny_llama, tmp_path):
    client = daemon.client()
    data = write_tiny_instruction_set(tmp_path / "clinic.jsonl")
    run = client.submit(text_run_config(tiny_llama, data, "clinic-terms"), name="clinic-terms")
    wait_until(lambda: client.get(run["id"])["status"] in ("finished", "failed", "cancelled"), 300, 0.5,
               "the text run to end")
    done = client.get(run["id"])
    assert done["status"] == "finished", (done.get("error"), client.logs(run["id"])[-20:])
    assert done["kind"] == "text"

    published = Path(done["published_file"])
    assert published == daemon.home / "adapters" / "clinic-terms"
    assert (published / "adapter_config.json").is_file() and (published / "adapter_model.safetensors").is_file()
    assert not daemon.lora_dir.exists() or not any(daemon.lora_dir.iterdir()), "text LoRAs stay out of the Lora folder"
    assert client.metrics(run["id"])[-1]["step"] == 6

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), local_files_only=True)
    probe = torch.arange(5, 25).reshape(1, 20)
    with torch.no_grad():
        before = base(input_ids=probe).logits
        after = PeftModel.from_pretrained(base, str(published)).eval()(input_ids=probe).logits
    assert (after - before).abs().max() > 1e-3
