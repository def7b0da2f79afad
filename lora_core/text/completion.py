"""Generate completions for prompts: the sample completions of a run and ``python -m lora_core.text.generate`` share this.

A prompt is formatted exactly as training formatted a user turn (the tokenizer's resolved chat template with the
generation prompt), unless ``chat`` is False, where it is continued as raw text (``text``-format runs). Decoding is
greedy, so the same adapter always gives the same completion and before/after comparisons are meaningful.
"""
from __future__ import annotations

from typing import Any

import torch

from .templates import render, stop_strings


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat:
        text = render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


@torch.no_grad()
def complete(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 64, chat: bool = True) -> list[str]:
    """One greedy completion per prompt (without the prompt), cut at the end of the assistant's turn."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_strings(tokenizer)
    completions = []
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt, chat)], dtype=torch.long, device=device)
            extra = {"stop_strings": stops, "tokenizer": tokenizer} if stops else {}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **extra)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            for stop in stops:
                text = text.split(stop, 1)[0]
            # max_new_tokens can cut a multi-byte character in half; its bytes decode to U+FFFD, not text
            completions.append(text.rstrip("\ufffd").strip())
    finally:
        model.train(was_training)
    return completions
