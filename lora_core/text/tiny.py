"""A tiny LLaMA-shaped language model, built locally, for tests and for trying the text engine without a download.

Nothing here reaches the network: the tokenizer is a byte-level BPE trained on a few sentences (so any text encodes,
no unknown tokens), the model is `LlamaForCausalLM` from a `LlamaConfig` with random weights, and both are saved as
an ordinary Hugging Face folder that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load.

``python -m lora_core.text.tiny --out DIR [--data FILE]`` writes the model (and a 30-example instruction set).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# A small chat template in the Zephyr style: each turn is "<|role|>\n content </s>\n".
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The patient reports mild pain in the left knee after running.",
    "Please summarise the visit notes in one sentence.",
    "Our support team answers every question politely and clearly.",
    "Translate the word hello into French, Spanish and German.",
    "A LoRA adapter adds small trainable matrices to a frozen model.",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12, colours: red green blue yellow.",
    "### Instruction:\n### Response:\n### Input:\n",
]

_COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
_THINGS = ["apple", "sky", "leaf", "sun", "night", "snow", "cherry", "sea", "grass", "lemon"]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE with BOS/EOS/PAD, role tokens and a chat template, as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS))
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_llama(out_dir: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random-weight LLaMA (hidden 32, 2 layers, 4 heads) plus its tokenizer to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("tiny LLaMA (%d parameters) written to %s", sum(p.numel() for p in model.parameters()), out)
    return out


def write_tiny_instruction_set(path: str | Path, n: int = 30) -> Path:
    """A JSONL instruction set with an easily learnt pattern ("what colour is X?" → fixed answer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            thing = _THINGS[i % len(_THINGS)]
            colour = _COLOURS[i % len(_COLOURS)]
            record = {"instruction": f"What colour is the {thing}?", "input": "" if i % 3 else f"case {i}",
                      "output": f"The {thing} is {colour}."}
            fh.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_core.text.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the tiny model")
    parser.add_argument("--data", help="also write a 30-example instruction JSONL here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_llama(args.out))
    if args.data:
        print(write_tiny_instruction_set(args.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
