"""Text datasets: formats, loss masks, bad lines named by number, packing and the validation split."""
from __future__ import annotations

import json

import pytest

from lora_core.text.data import IGNORE_INDEX, TextDataError, collate, load_text_dataset, pack, split_validation
from lora_core.text.templates import TemplateError, conversation_segments, resolve_chat_template
from lora_core.text.tiny import build_tiny_tokenizer, write_tiny_instruction_set
from text_fixtures import write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    resolve_chat_template(tok, None)
    return tok


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_instruction_prompt_tokens_carry_no_loss(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps(
        {"instruction": "What colour is the sky?", "input": "at noon", "output": "The sky is blue."})])
    example = load_text_dataset(data, tokenizer).train[0]
    batch = collate([example], tokenizer.pad_token_id)
    labels = batch["labels"][0].tolist()
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(batch["input_ids"][0, :first_trained].tolist())
    assert "What colour is the sky?" in prompt and "at noon" in prompt
    assert all(label == IGNORE_INDEX for label in labels[:first_trained])
    assert labels[first_trained:] == batch["input_ids"][0, first_trained:].tolist()
    assert trained_text(tokenizer, example).startswith("The sky is blue.</s>")


def test_chat_trains_only_assistant_turns(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit"},
                {"role": "assistant", "content": "Apple."}]
    data = write_jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": messages})])
    dataset = load_text_dataset(data, tokenizer)
    assert dataset.text_format == "chat"
    trained = trained_text(tokenizer, dataset.train[0])
    assert "Hello." in trained and "Apple." in trained
    assert "Be brief." not in trained and "Hi" not in trained and "fruit" not in trained


def test_plain_text_is_trained_everywhere(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"text": "The patient reports mild pain."})])
    example = load_text_dataset(data, tokenizer).train[0]
    assert example.labels == example.input_ids
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids[-1] == tokenizer.eos_token_id


def test_padding_carries_no_loss_and_no_attention(tmp_path, tokenizer):
    texts = [{"text": "short"}, {"text": "a much longer text"}]
    data = write_jsonl(tmp_path / "t.jsonl", [json.dumps(t) for t in texts])
    dataset = load_text_dataset(data, tokenizer)
    batch = collate(dataset.train, tokenizer.pad_token_id)
    padded = batch["attention_mask"] == 0
    assert padded.any()
    assert (batch["labels"][padded] == IGNORE_INDEX).all()


def test_malformed_jsonl_lines_are_reported_by_number(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        json.dumps({"instruction": "a", "output": "b"}),
        "",
        '{"instruction": "broken", ',
        "[1, 2]",
        json.dumps({"instruction": "no answer"}),
    ])
    with pytest.raises(TextDataError) as err:
        load_text_dataset(data, tokenizer)
    problems = err.value.problems
    assert [p.split(":")[0] for p in problems] == ["bad.jsonl line 3", "bad.jsonl line 4", "bad.jsonl line 5"]
    assert "not valid JSON" in problems[0] and "'output'" in problems[2]


def test_bad_chat_role_is_reported_with_its_line(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "chat.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),
    ])
    with pytest.raises(TextDataError, match=r"chat.jsonl line 2: messages\[0\] must be"):
        load_text_dataset(data, tokenizer)


def test_csv_instructions_load_and_bad_rows_name_their_line(tmp_path, tokenizer):
    good = tmp_path / "good.csv"
    good.write_text('instruction,input,output\nGreet,,"Hello,\nworld"\nCount,to three,1 2 3\n', encoding="utf-8")
    dataset = load_text_dataset(good, tokenizer)
    assert dataset.text_format == "instruction" and len(dataset.train) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text('instruction,input,output\nGreet,,"Hello,\nworld"\nCount,to three\n', encoding="utf-8")
    with pytest.raises(TextDataError, match="bad.csv line 4: needs a non-empty 'output'"):
        load_text_dataset(bad, tokenizer)


def test_unknown_format_and_file_type_are_explained(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "odd.jsonl", [json.dumps({"question": "?"})])
    with pytest.raises(TextDataError, match="line 1: cannot tell the format"):
        load_text_dataset(data, tokenizer)
    with pytest.raises(TextDataError, match="must be a .jsonl or .csv"):
        load_text_dataset(tmp_path / "data.parquet", tokenizer)


def test_records_without_room_for_the_response_are_dropped_not_trained_on_prompt(tmp_path, tokenizer):
    long_prompt = " ".join(["word"] * 200)
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"instruction": long_prompt, "output": "ok"}),
                                              json.dumps({"instruction": "short", "output": "fine"})])
    dataset = load_text_dataset(data, tokenizer, max_seq_length=32)
    assert dataset.dropped == [1]
    assert len(dataset.train) == 1 and len(dataset.train[0].input_ids) <= 32


def test_packing_fills_blocks_and_keeps_masks(tmp_path, tokenizer):
    data = write_tiny_instruction_set(tmp_path / "d.jsonl", n=30)
    plain = load_text_dataset(data, tokenizer, max_seq_length=64)
    packed = load_text_dataset(data, tokenizer, max_seq_length=64, packing=True)
    assert len(packed.train) < len(plain.train)
    assert all(len(e.input_ids) == 64 for e in packed.train[:-1])
    assert sum(len(e.input_ids) for e in packed.train) == sum(len(e.input_ids) for e in plain.train)
    trained = sum(label != IGNORE_INDEX for e in packed.train for label in e.labels)
    assert trained == sum(label != IGNORE_INDEX for e in plain.train for label in e.labels)
    assert pack(plain.train, 64)[0].labels == packed.train[0].labels


def test_validation_split_is_fixed_by_the_seed_and_disjoint(tmp_path, tokenizer):
    data = write_tiny_instruction_set(tmp_path / "d.jsonl", n=30)
    a = load_text_dataset(data, tokenizer, validation_split=0.2, seed=7)
    b = load_text_dataset(data, tokenizer, validation_split=0.2, seed=7)
    assert len(a.validation) == 6 and len(a.train) == 24
    assert [e.line for e in a.validation] == [e.line for e in b.validation]
    assert not {e.line for e in a.validation} & {e.line for e in a.train}
    assert split_validation(30, 0.2, 8) != split_validation(30, 0.2, 7)


def test_named_and_unknown_chat_templates(tokenizer):
    tok = build_tiny_tokenizer()
    resolve_chat_template(tok, "chatml")
    segments = conversation_segments(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    whole = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert "".join(text for text, _ in segments) == whole
    assert [text for text, trained in segments if trained] == ["yo<|im_end|>\n"]
    with pytest.raises(TemplateError, match="data.chat_template: must be one of"):
        resolve_chat_template(tok, "vicuna")


def test_template_that_rewrites_earlier_turns_is_refused():
    tok = build_tiny_tokenizer()
    resolve_chat_template(tok, "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}")
    with pytest.raises(TemplateError, match="prefix"):
        conversation_segments(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
