"""The CLIP tokenizer every SD1/SD2/SDXL model uses, built offline from the BPE table shipped with the package.

WebUI single-file checkpoints carry no tokenizer, and A1111 itself fetches one from the Hugging Face hub on first use.
We cannot reach a hub, so ``data/bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP's BPE merges, MIT licence, as shipped
by open_clip) is turned into the exact ``vocab.json``/``merges.txt`` pair of ``openai/clip-vit-large-patch14``:
byte symbols, byte symbols + ``</w>``, one token per merge, then the two special tokens (49408 in all).
"""
from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

BPE_FILE = Path(__file__).resolve().parents[1] / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a tokenizer folder that ``CLIPTokenizer.from_pretrained(folder)`` loads (SD2/SDXL-G pad with '!')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": pad_token, "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}), encoding="utf-8")
    return folder


def load_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token,
                         model_max_length=77)
