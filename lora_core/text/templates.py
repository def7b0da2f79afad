"""Chat templates: how a conversation becomes one string, and which parts of it the model is trained to write.

``data.chat_template`` picks the template: unset (the tokenizer's own template, or Alpaca for a base model whose
tokenizer has none), a name from `NAMED_TEMPLATES`, or a Jinja template string (anything containing ``{%`` or
``{{``). The resolved template is stored on the tokenizer, so training, sampling, the saved adapter folder and
``python -m lora_core.text.generate`` all format prompts the same way.

Loss masking relies on one property of the template: rendering the first k turns gives a prefix of rendering all of
them. `conversation_segments` checks it and names the template if it does not hold, rather than silently training on
the wrong tokens.
"""
from __future__ import annotations

from typing import Any

from ..errors import InputError

ALPACA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NAMED_TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "chatml": CHATML_TEMPLATE}
# Text that ends an assistant turn besides the tokenizer's EOS; generation stops there.
END_OF_TURN = {CHATML_TEMPLATE: "<|im_end|>"}


class TemplateError(InputError):
    """A chat template that cannot be used for training; the message names ``data.chat_template``."""


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str:
    """Pick the template for ``data.chat_template`` and store it on the tokenizer (see module docstring)."""
    if chat_template is None or chat_template == "tokenizer":
        template = getattr(tokenizer, "chat_template", None) or ALPACA_TEMPLATE
    elif chat_template in NAMED_TEMPLATES:
        template = NAMED_TEMPLATES[chat_template]
    elif "{%" in chat_template or "{{" in chat_template:
        template = chat_template
    else:
        raise TemplateError(f"data.chat_template: must be one of tokenizer, {', '.join(NAMED_TEMPLATES)} or a Jinja "
                            f"template, got {chat_template!r}")
    tokenizer.chat_template = template
    return template


def stop_strings(tokenizer: Any) -> list[str]:
    """Strings that end a completion under the tokenizer's current template (beyond its EOS token)."""
    marker = END_OF_TURN.get(getattr(tokenizer, "chat_template", None) or "")
    return [marker] if marker else []


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises several unrelated types; the user needs the template named either way
        raise TemplateError(f"data.chat_template: the template failed to render: {e}") from None


def conversation_segments(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces: assistant turns trained, everything else not.

    Each assistant piece runs from after the generation prompt to the end of its turn, so the end-of-turn marker is
    learnt too (the model learns to stop).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
            segments.append((_after(prompt, done), False))
            done = prompt
        full = render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        segments.append((_after(full, done), message["role"] == "assistant"))
        done = full
    return [(text, trained) for text, trained in segments if text]


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise TemplateError("data.chat_template: the template renders earlier turns differently once later turns "
                            "are added, so prompt and response tokens cannot be told apart; use 'alpaca', 'chatml' or "
                            "a template whose output for the first turns is a prefix of the whole conversation")
    return text[len(prefix):]
