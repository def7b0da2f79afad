"""Text LoRAs trained by the one training loop: the loss falls, outputs load, resume is exact, the CLI runs it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_core.events import EXIT_OK, EventWriter, read_events
from lora_core.text.tiny import write_tiny_instruction_set
from lora_core.train import run_training
from text_fixtures import text_config, tiny_llama  # noqa: F401  (tiny_llama: fixture)

REPO = Path(__file__).resolve().parents[1]
PROBE = torch.arange(5, 45).reshape(2, 20)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.mark.slow
def test_instruction_run_learns_and_its_adapter_and_merged_model_load(tmp_path, tiny_llama):
    cfg = text_config(tmp_path, tiny_llama, batch_size=4, epochs=8, validation_split=0.2, save_merged_model=True,
                      sample_prompts=["What colour is the sky?"], sample_every_n_epochs=4, sample_max_new_tokens=8)
    events_file = tmp_path / "events.jsonl"
    result = run_training(cfg, EventWriter(events_file), show_progress=False)

    assert result.status == "finished" and result.output == cfg.output_path
    first, last = sum(result.losses[:6]) / 6, sum(result.losses[-6:]) / 6
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"

    events = read_events(events_file)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[-1]["status"] == "finished"
    assert events[0]["task_type"] == "text-generation"
    samples = [e for e in events if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [24, 48] and Path(samples[-1]["path"]).read_text(encoding="utf-8")
    (evaluation,) = [e for e in events if e["type"] == "eval"]
    assert evaluation["eval_loss"] > 0 and evaluation["perplexity"] > 1

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), local_files_only=True)
    base_logits = logits(base)
    adapted = PeftModel.from_pretrained(base, str(result.output))
    adapted_logits = logits(adapted)
    assert (adapted_logits - base_logits).abs().max() > 1e-2
    merged = AutoModelForCausalLM.from_pretrained(str(result.output) + "-merged", local_files_only=True)
    assert (logits(merged) - adapted_logits).abs().max() < 1e-4


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tmp_path, tiny_llama):
    settings = dict(batch_size=4, max_train_steps=10, save_steps=4, dropout=0.1, lr_scheduler="cosine",
                    gradient_accumulation_steps=2, keep_last_checkpoints=5)
    whole = run_training(text_config(tmp_path / "whole", tiny_llama, **settings), show_progress=False)
    assert whole.status == "finished"
    # step 4 is the middle of epoch 1 (24 examples / batch 4 / accumulation 2 = 3 steps per epoch)
    checkpoint = Path(whole.output).parent / "checkpoints" / "step-00000004"
    resumed_cfg = text_config(tmp_path / "resumed", tiny_llama, resume_from_checkpoint=str(checkpoint), **settings)
    resumed = run_training(resumed_cfg, show_progress=False)

    assert resumed.status == "finished" and resumed.step == whole.step == 10
    a, b = adapter_weights(whole.output), adapter_weights(resumed.output)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert resumed.losses == pytest.approx(whole.losses[4:], abs=1e-6)


@pytest.mark.slow
def test_train_cli_runs_a_text_yaml_config(tmp_path, tiny_llama):
    template = yaml.safe_load((REPO / "configs" / "llm_lora.yaml").read_text(encoding="utf-8"))
    write_tiny_instruction_set(tmp_path / "train.jsonl")
    template["data"].update(train_data_file="train.jsonl", max_seq_length=64)
    template["model"].update(base_model=str(tiny_llama))
    template["training"].update(epochs=1, batch_size=4, gradient_accumulation_steps=1, mixed_precision="no",
                                lr_warmup_steps=0)
    template["output"].update(output_dir="out", save_steps=0)
    template["sample"].update(sample_max_new_tokens=4)
    config = tmp_path / "llm.yaml"
    config.write_text(yaml.safe_dump(template), encoding="utf-8")

    result = subprocess.run([sys.executable, "-m", "lora_core.train", "--config", str(config), "--no-progress",
                             "--events", str(tmp_path / "events.jsonl")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_OK, result.stderr[-3000:]
    adapter = Path(result.stdout.strip().splitlines()[-1])
    assert adapter == tmp_path / "out" / "my-llm-lora"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert any(e["type"] == "eval" for e in read_events(tmp_path / "events.jsonl"))
