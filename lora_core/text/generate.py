"""Try a text LoRA: ``python -m lora_core.text.generate --base DIR --adapter DIR --prompt "..."``.

Prints the base model's completion and the adapted model's completion one after the other (greedy decoding, so the
difference is the adapter's doing, not chance). Prompts are formatted with the chat template saved in the adapter
folder — the one used in training — unless ``--raw`` asks for plain text continuation. Local folders only.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import ConfigError
from ..events import EXIT_CONFIG
from .completion import complete
from .export import ADAPTER_FILES
from .model import load_base_model, load_tokenizer
from .templates import TemplateError, resolve_chat_template


def _folder(path: str, what: str, needs: tuple[str, ...] = ()) -> Path:
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"{what}: no such folder: {folder}")
    missing = [name for name in needs if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"{what}: {folder} is not a LoRA adapter folder (missing {', '.join(missing)})")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_core.text.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="local Hugging Face model folder")
    parser.add_argument("--adapter", help="adapter folder written by a text-generation run")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no chat template")
    parser.add_argument("--chat-template", help="tokenizer (default), alpaca, chatml or a Jinja template")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    base_dir = _folder(args.base, "--base")
    adapter_dir = _folder(args.adapter, "--adapter", ADAPTER_FILES) if args.adapter else None
    has_tokenizer = adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file()
    try:
        tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base_dir)
        resolve_chat_template(tokenizer, args.chat_template)
        model = load_base_model(base_dir)
    except (ConfigError, TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))

    def answer(prompt: str) -> str:
        return complete(model, tokenizer, [prompt], args.max_new_tokens, chat=not args.raw)[0]

    for prompt in args.prompt:
        print(f"### prompt\n{prompt}")
        if adapter_dir is None:
            print(f"### base\n{answer(prompt)}")
            continue
        with model.disable_adapter():
            print(f"### base\n{answer(prompt)}")
        print(f"### adapter\n{answer(prompt)}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
