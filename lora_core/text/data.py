"""Text datasets: read JSONL/CSV records, turn them into token ids with a loss mask, pack, split off validation.

Three record formats (``data.text_format``; ``auto`` decides from the first record):

* ``text``: ``{"text": "..."}`` — plain continued pre-training; every token is trained.
* ``instruction``: Alpaca ``{"instruction", "input" (optional), "output", "system" (optional)}`` — turned into a
  user/assistant conversation; only the response is trained.
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`` — only assistant turns are
  trained. In a CSV, the ``messages`` column holds that list as JSON.

Prompt tokens get the label -100 (PyTorch's ignore index), so the loss is the model's error on the response alone:
the model learns to answer, not to parrot the questions. Every bad record is reported with its file and line number,
all at once, and nothing is silently dropped except over-long examples with no response left after truncation,
which are logged by line.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import InputError
from .templates import conversation_segments

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("text", "instruction", "chat")
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20


class TextDataError(InputError):
    """Records the user must fix; ``problems`` holds one line each, naming file and line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more"] if more else [])))


@dataclass
class Example:
    """One training sequence: token ids and labels of the same length (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    line: Optional[int] = None  # source line; None for packed sequences that span several records


@dataclass
class TextDataset:
    train: list[Example]
    validation: list[Example]
    text_format: str
    dropped: list[int] = field(default_factory=list)  # lines whose response did not fit in max_seq_length


def read_records(path: str | Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, record) pairs from a .jsonl or .csv file, plus (line number, problem) per unreadable line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise TextDataError([f"data.train_data_file: {path.name} must be a .jsonl or .csv file"])
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            records, problems = (_read_jsonl if suffix == ".jsonl" else _read_csv)(fh)
    except UnicodeDecodeError as e:
        raise TextDataError([f"{path.name}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    if not records and not problems:
        raise TextDataError([f"{path.name}: no records"])
    return records, problems


def _read_jsonl(fh) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    records, problems = [], []
    for number, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((number, f"not valid JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(record, dict):
            problems.append((number, f"must be a JSON object, got {type(record).__name__}"))
            continue
        records.append((number, record))
    return records, problems


def _read_csv(fh) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    records, problems = [], []
    reader = csv.DictReader(fh)
    start = 2  # line 1 is the header
    try:
        for row in reader:
            if None in row:
                problems.append((start, "more cells than header columns"))
            elif any(v is not None for v in row.values()):
                record = {k.strip(): v for k, v in row.items() if k is not None and v not in (None, "")}
                if isinstance(record.get("messages"), str):
                    try:
                        record["messages"] = json.loads(record["messages"])
                    except json.JSONDecodeError as e:
                        problems.append((start, f"the messages cell is not valid JSON: {e.msg}"))
                        start = reader.line_num + 1
                        continue
                records.append((start, record))
            start = reader.line_num + 1
    except csv.Error as e:
        problems.append((reader.line_num, str(e)))
    return records, problems


def detect_format(record: dict, text_format: str) -> str:
    """``auto`` → the format the first record's keys say; an explicit format is kept as is."""
    if text_format != "auto":
        return text_format
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return "unknown"


def to_messages(record: dict, text_format: str) -> list[dict]:
    """The record as a conversation (instruction and chat formats); raises ValueError saying what is wrong."""
    if text_format == "instruction":
        instruction, extra = record.get("instruction"), record.get("input", "")
        output, system = record.get("output"), record.get("system")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("needs a non-empty 'instruction' text")
        if not isinstance(output, str) or not output.strip():
            raise ValueError("needs a non-empty 'output' text")
        if not isinstance(extra, str) or (system is not None and not isinstance(system, str)):
            raise ValueError("'input' and 'system' must be text")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("needs a non-empty 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant message, so there is nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_segments(tokenizer: Any, segments: list[tuple[str, bool]]) -> Example:
    """Tokenise each piece on its own, so the prompt tokens are exactly those a prompt alone would give."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return Example(ids, labels)


def encode_text(tokenizer: Any, text: str) -> Example:
    """A plain text with BOS/EOS around it (when the tokenizer has them), all of it trained."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


def encode_record(tokenizer: Any, record: dict, text_format: str) -> Example:
    if text_format == "text":
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("needs a non-empty 'text'")
        return encode_text(tokenizer, text)
    return encode_segments(tokenizer, conversation_segments(tokenizer, to_messages(record, text_format)))


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate examples into full ``max_len`` blocks (fewer padding tokens, faster epochs).

    Attention is not blocked between neighbours in a block (plain concatenation, as most trainers do); each
    example's own BOS/turn markers separate them. The last short block is kept when it has trained tokens.
    """
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    blocks = [Example(ids[i:i + max_len], labels[i:i + max_len]) for i in range(0, len(ids), max_len)]
    return [b for b in blocks if any(t != IGNORE_INDEX for t in b.labels)]


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation), a fixed function of the seed so a resumed run evaluates the same records."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_val = min(n - 1, max(1, math.floor(n * fraction + 0.5)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def load_text_dataset(path: str | Path, tokenizer: Any, text_format: str = "auto", max_seq_length: int = 512,
                      packing: bool = False, validation_split: float = 0.0, seed: int = 42) -> TextDataset:
    """Read, check, tokenise, truncate, split and (optionally) pack a text dataset; see module docstring."""
    name = Path(path).name
    records, problems = read_records(path)
    if not records:
        raise TextDataError([f"{name} line {line}: {problem}" for line, problem in problems])
    fmt = detect_format(records[0][1], text_format)
    if fmt not in FORMATS:
        raise TextDataError([f"{name} line {records[0][0]}: cannot tell the format: give a 'text', 'instruction' "
                             f"(with 'output') or 'messages' field, or set data.text_format"])
    detected = f", detected from line {records[0][0]}" if text_format == "auto" else ""
    examples, dropped = [], []
    for line, record in records:
        try:
            example = encode_record(tokenizer, record, fmt)
        except ValueError as e:
            problems.append((line, f"{e} ({fmt} format{detected})"))
            continue
        example.line = line
        example.input_ids, example.labels = example.input_ids[:max_seq_length], example.labels[:max_seq_length]
        if all(t == IGNORE_INDEX for t in example.labels):
            dropped.append(line)
            continue
        examples.append(example)
    if problems:
        raise TextDataError([f"{name} line {line}: {problem}" for line, problem in sorted(problems)])
    if dropped:
        log.warning("%s: %d record(s) have no response left within max_seq_length=%d and are skipped (lines %s)",
                    name, len(dropped), max_seq_length, ", ".join(map(str, dropped[:MAX_REPORTED])))
    if not examples:
        raise TextDataError([f"{name}: no record fits in data.max_seq_length={max_seq_length} with its response"])
    train_idx, val_idx = split_validation(len(examples), validation_split, seed)
    train = [examples[i] for i in train_idx]
    validation = [examples[i] for i in val_idx]
    if packing:
        train = pack(train, max_seq_length)
    log.info("%s: %d training and %d validation sequences (%s format%s)", name, len(train), len(validation), fmt,
             ", packed" if packing else "")
    return TextDataset(train, validation, fmt, dropped)


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
