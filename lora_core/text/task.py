"""`TextTask`: a causal-LM LoRA as a `lora_core.task.TrainingTask`, driven by the one training loop.

The loop owns optimisation, checkpoints, resume, stop = save and events; this class owns what is particular to
language models: the tokenizer and chat template, the masked dataset, the causal-LM loss, the adapter folder, sample
completions and the validation loss / perplexity.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import ConfigError, TrainConfig
from . import data as text_data
from .completion import complete
from .export import save_adapter, save_merged
from .model import add_lora, base_dtype, load_base_model, load_tokenizer, quantization_config
from .templates import TemplateError, resolve_chat_template

log = logging.getLogger(__name__)

MERGED_SUFFIX = "-merged"


def read_sample_prompts(value: Any) -> list[str]:
    """``sample.sample_prompts`` as a list: a list in the config, or a .txt file with one prompt per line (blank
    lines and ``#`` comments skipped, as for image prompts)."""
    if not value:
        return []
    if isinstance(value, list):
        lines = [str(p) for p in value]
    elif Path(value).is_file():
        lines = Path(value).read_text(encoding="utf-8").splitlines()
    else:
        lines = [str(value)]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class TextTask:
    """LoRA fine-tuning of a local causal LM on a JSONL/CSV dataset (``model.task_type: text-generation``)."""

    kind = "text"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model: Any = None  # the peft model: saved, sampled, evaluated
        self.forward_model: Any = None  # the same model as prepared by accelerate (DDP-wrapped on several GPUs)
        self.tokenizer: Any = None
        self.dataset: Optional[text_data.TextDataset] = None
        self.device = torch.device("cpu")
        self.started_at = 0.0  # set by the loop before the first step (TrainingTask)
        self.total_steps = 0

    # -- setup -----------------------------------------------------------------------------------------------------
    def setup(self, accelerator: Any) -> None:
        self.device = accelerator.device
        self._load_data()
        self._load_model(accelerator)

    def _load_data(self) -> None:
        """The tokenizer (and its chat template), then the tokenized, masked dataset and its validation split."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.base_model)
        try:
            resolve_chat_template(self.tokenizer, cfg.data.chat_template)
            self.dataset = text_data.load_text_dataset(
                cfg.data.train_data_file, self.tokenizer, cfg.data.text_format, cfg.data.max_seq_length,
                cfg.data.packing, cfg.data.validation_split, cfg.training.seed)
        except TemplateError as e:
            raise ConfigError([str(e)]) from None

    def _load_model(self, accelerator: Any) -> None:
        """The base model (quantized when asked), its LoRA, and the copy accelerate prepares for the forward pass."""
        cfg = self.cfg
        base = load_base_model(cfg.model.base_model, base_dtype(cfg, self.device),
                               quantization_config(cfg, self.device), self.device)
        self.model = add_lora(base, cfg)
        self.model.train()
        self.forward_model = accelerator.prepare_model(self.model)

    def dataset_summary(self) -> Optional[dict]:
        return None  # the text dataset reports its problems while loading (errors name the line)

    def num_examples(self) -> int:
        return len(self.dataset.train)

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.cfg.training.seed * 100_003 + epoch)
        order = torch.randperm(self.num_examples(), generator=generator).tolist()
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def collate(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        return text_data.collate([self.dataset.train[i] for i in indices], self.tokenizer.pad_token_id)

    # -- training --------------------------------------------------------------------------------------------------
    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.forward_model]

    def param_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": learning_rate}]

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Mean cross-entropy over the response tokens (labels -100 elsewhere).

        LoRA dropout draws from torch's global RNG; seeding it from ``generator`` inside a forked RNG state keeps the
        run a pure function of the checkpointed generator, so a resumed run takes the same dropout masks.
        """
        batch = {k: v.to(self.device) for k, v in batch.items()}
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            return self.forward_model(**batch).loss

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint: LoRA weights that this model does not have: {', '.join(unexpected[:5])}")

    # -- outputs ---------------------------------------------------------------------------------------------------
    def export(self, path_stem: Path, step: int, epoch: int) -> Path:
        """The adapter folder ``<path_stem>/``; the merged model ``<path_stem>-merged/`` for the final output only
        (a full model copy per checkpoint would fill the disk)."""
        folder = save_adapter(self.model, self.tokenizer, Path(path_stem))
        if self.cfg.output.save_merged_model and Path(path_stem) == self.cfg.output_path:
            save_merged(self.cfg.model.base_model, folder, folder.with_name(folder.name + MERGED_SUFFIX))
        return folder

    def sample(self, step: int, out_dir: Path, progress: Optional[Callable[[dict], None]] = None,
               preview: bool = False) -> list[tuple[Path, str]]:
        """One .txt per configured prompt holding the greedy completion at this step (no preview for text: an
        adapter has no card picture). ``progress`` hears that the prompts are being completed."""
        prompts = [] if preview else read_sample_prompts(self.cfg.sample.sample_prompts)
        if not prompts:
            return []
        if progress is not None:
            progress({"prompt_index": 1, "prompts": len(prompts), "prompt": prompts[0][:200]})
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        chat = self.dataset.text_format != "text"
        completions = complete(self.model, self.tokenizer, prompts, self.cfg.sample.sample_max_new_tokens, chat)
        written = []
        for i, (prompt, text) in enumerate(zip(prompts, completions)):
            path = out_dir / f"step-{step:08d}-{i:02d}.txt"
            path.write_text(text + "\n", encoding="utf-8")
            written.append((path, prompt))
        return written

    @torch.no_grad()
    def evaluate(self, step: int) -> Optional[dict]:
        """Token-weighted loss on the validation split and its perplexity; None without a split."""
        if not self.dataset.validation:
            return None
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        size = self.cfg.training.batch_size
        try:
            for start in range(0, len(self.dataset.validation), size):
                batch = text_data.collate(self.dataset.validation[start:start + size], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                total += torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                    ignore_index=text_data.IGNORE_INDEX, reduction="sum").item()
                tokens += int((labels != text_data.IGNORE_INDEX).sum())
        finally:
            self.model.train(was_training)
        eval_loss = total / max(tokens, 1)
        return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}
