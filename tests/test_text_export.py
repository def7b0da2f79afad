"""Text LoRA outputs: the adapter folder loads with peft and answers like the trained model; merged equals base+LoRA;
samples, validation metrics, the generate CLI and refusals that name the field."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lora_core.config import ConfigError
from lora_core.text.task import TextTask
from text_fixtures import perturb_lora, text_config, tiny_llama, write_jsonl  # noqa: F401  (tiny_llama: fixture)

REPO = Path(__file__).resolve().parents[1]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def ready_task(cfg) -> TextTask:
    task = TextTask(cfg)
    task.setup(Accelerator(cpu=True))
    perturb_lora(task.model)
    return task


@pytest.fixture
def probe_ids() -> torch.Tensor:
    return torch.arange(5, 45).reshape(2, 20)


def test_adapter_folder_loads_with_peft_and_gives_the_same_logits(tmp_path, tiny_llama, probe_ids):
    cfg = text_config(tmp_path, tiny_llama)
    task = ready_task(cfg)
    folder = task.export(cfg.output_path, step=10, epoch=1)
    assert folder == cfg.output_path
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == cfg.model.lora_rank

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), local_files_only=True)
    base_logits = logits(base, probe_ids)
    loaded = PeftModel.from_pretrained(base, str(folder))
    trained_logits = logits(task.model, probe_ids)
    assert (trained_logits - base_logits).abs().max() > 1e-3, "the adapter must change the model for this to test"
    assert (logits(loaded, probe_ids) - trained_logits).abs().max() < 1e-4


def test_merged_model_equals_base_plus_adapter(tmp_path, tiny_llama, probe_ids):
    cfg = text_config(tmp_path, tiny_llama, save_merged_model=True)
    task = ready_task(cfg)
    folder = task.export(cfg.output_path, step=10, epoch=1)
    merged_dir = folder.with_name(folder.name + "-merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer_config.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), local_files_only=True)
    adapted = PeftModel.from_pretrained(base, str(folder))
    assert (logits(merged, probe_ids) - logits(adapted, probe_ids)).abs().max() < 1e-4


def test_checkpoint_exports_write_no_merged_copy(tmp_path, tiny_llama):
    cfg = text_config(tmp_path, tiny_llama, save_merged_model=True)
    task = ready_task(cfg)
    step_stem = Path(cfg.output.output_dir) / "checkpoints" / "tiny-adapter-step00000005"
    task.export(step_stem, step=5, epoch=0)
    assert (step_stem / "adapter_model.safetensors").is_file()
    assert not step_stem.with_name(step_stem.name + "-merged").exists()


def test_exporting_again_replaces_the_folder_whole(tmp_path, tiny_llama, probe_ids):
    cfg = text_config(tmp_path, tiny_llama)
    task = ready_task(cfg)
    task.export(cfg.output_path, step=1, epoch=0)
    (cfg.output_path / "stale.txt").write_text("from an older export")
    perturb_lora(task.model, seed=1)
    task.export(cfg.output_path, step=2, epoch=0)
    assert not (cfg.output_path / "stale.txt").exists()
    assert sorted(p.name for p in cfg.output_path.parent.iterdir() if p.name.startswith(".")) == []
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), local_files_only=True)
    loaded = PeftModel.from_pretrained(base, str(cfg.output_path))
    assert (logits(loaded, probe_ids) - logits(task.model, probe_ids)).abs().max() < 1e-4


def test_lora_state_round_trips_through_a_checkpoint_dict(tmp_path, tiny_llama, probe_ids):
    cfg = text_config(tmp_path, tiny_llama)
    trained = ready_task(cfg)
    state = {k: v.clone() for k, v in trained.lora_state_dict().items()}
    assert state and all("lora_" in k for k in state)
    fresh = TextTask(cfg)
    fresh.setup(Accelerator(cpu=True))
    fresh.load_lora_state_dict(state)
    assert torch.equal(logits(fresh.model, probe_ids), logits(trained.model, probe_ids))
    with pytest.raises(ValueError, match="does not have"):
        fresh.load_lora_state_dict({"base_model.model.no_such_layer.lora_A.weight": torch.zeros(1)})


def test_validation_split_gives_eval_loss_and_perplexity(tmp_path, tiny_llama):
    task = ready_task(text_config(tmp_path, tiny_llama, validation_split=0.2, batch_size=4))
    metrics = task.evaluate(step=0)
    assert set(metrics) == {"eval_loss", "perplexity"}
    assert metrics["eval_loss"] > 0
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-6)
    assert task.evaluate(step=0) == metrics
    assert ready_task(text_config(tmp_path / "nosplit", tiny_llama)).evaluate(step=0) is None


def test_epoch_order_depends_only_on_seed_and_epoch(tmp_path, tiny_llama):
    task = TextTask(text_config(tmp_path, tiny_llama, seed=3))
    task.setup(Accelerator(cpu=True))
    again = TextTask(text_config(tmp_path, tiny_llama, seed=3))
    again.setup(Accelerator(cpu=True))
    assert task.epoch_batches(1, 4) == again.epoch_batches(1, 4)
    assert task.epoch_batches(0, 4) != task.epoch_batches(1, 4)
    assert sorted(i for b in task.epoch_batches(2, 4) for i in b) == list(range(task.num_examples()))


def test_samples_write_one_completion_file_per_prompt(tmp_path, tiny_llama):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What colour is the sky?\n\nWhat colour is the sea?\n", encoding="utf-8")
    task = ready_task(text_config(tmp_path, tiny_llama, sample_prompts=str(prompts), sample_max_new_tokens=8))
    written = task.sample(step=7, out_dir=tmp_path / "samples")
    assert [prompt for _, prompt in written] == ["What colour is the sky?", "What colour is the sea?"]
    assert [path.name for path, _ in written] == ["step-00000007-00.txt", "step-00000007-01.txt"]
    first = written[0][0].read_text(encoding="utf-8")
    assert task.sample(step=7, out_dir=tmp_path / "again")[0][0].read_text(encoding="utf-8") == first
    assert task.model.training, "sampling must hand the model back in training mode"


def test_dropout_masks_come_from_the_generator(tmp_path, tiny_llama):
    task = ready_task(text_config(tmp_path, tiny_llama, dropout=0.5))
    batch = task.collate([0, 1], epoch=0)
    same = [task.loss(batch, torch.Generator().manual_seed(5)).item() for _ in range(2)]
    other = task.loss(batch, torch.Generator().manual_seed(6)).item()
    assert same[0] == same[1] and other != same[0]


def test_quantized_loading_without_cuda_names_the_field(tmp_path, tiny_llama):
    task = TextTask(text_config(tmp_path, tiny_llama, load_in_4bit=True))
    with pytest.raises(ConfigError, match="model.load_in_4bit: quantized loading needs a CUDA GPU"):
        task.setup(Accelerator(cpu=True))


def test_target_modules_that_match_nothing_name_the_field(tmp_path, tiny_llama):
    task = TextTask(text_config(tmp_path, tiny_llama, target_modules="to_q"))
    with pytest.raises(ConfigError, match="model.target_modules"):
        task.setup(Accelerator(cpu=True))


def test_bad_dataset_line_stops_setup_with_its_number(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "bad.jsonl", ['{"instruction": "a", "output": "b"}', "{oops"])
    with pytest.raises(ValueError, match="bad.jsonl line 2: not valid JSON"):
        TextTask(text_config(tmp_path, tiny_llama, data=data)).setup(Accelerator(cpu=True))


def test_generate_cli_compares_base_and_adapter(tmp_path, tiny_llama):
    cfg = text_config(tmp_path, tiny_llama)
    folder = ready_task(cfg).export(cfg.output_path, step=1, epoch=0)
    cmd = [sys.executable, "-m", "lora_core.text.generate", "--base", str(tiny_llama), "--adapter", str(folder),
           "--prompt", "What colour is the sky?", "--max-new-tokens", "6"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.index("### prompt\nWhat colour is the sky?") < out.index("### base") < out.index("### adapter")


def test_generate_cli_refuses_a_folder_that_is_not_an_adapter(tmp_path, tiny_llama):
    cmd = [sys.executable, "-m", "lora_core.text.generate", "--base", str(tiny_llama), "--adapter", str(tiny_llama),
           "--prompt", "hi"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "is not a LoRA adapter folder (missing adapter_config.json" in result.stderr


def test_a_folder_without_a_tokenizer_names_the_base_model_field(tmp_path, tiny_llama):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_llama / name).read_bytes())
    with pytest.raises(ConfigError, match="model.base_model: no usable tokenizer in"):
        TextTask(text_config(tmp_path, bare)).setup(Accelerator(cpu=True))


def test_gradient_checkpointing_changes_memory_use_not_gradients(tmp_path, tiny_llama):
    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)  # LoRA A matrices are initialised from the global RNG, as the loop seeds it
        task = ready_task(text_config(tmp_path, tiny_llama, gradient_checkpointing=checkpointing))
        task.loss(task.collate([0, 1, 2], epoch=0), torch.Generator().manual_seed(0)).backward()
        return [p.grad for p in task.model.parameters() if p.requires_grad]

    plain, checkpointed = gradients(False), gradients(True)
    assert len(plain) == len(checkpointed) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
