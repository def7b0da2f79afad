"""Publishing into a Lora folder: atomic, with card sidecars, and never over another file."""
from __future__ import annotations

import json

import pytest

from lora_daemon.publish import (Publication, plan_adapter, plan_lora, publish_adapter, publish_lora, rollback,
                                 sidecar_text)
from lora_daemon.worker import EXIT_CONFIG, EXIT_OOM, EXIT_STOPPED


def test_a_taken_name_gets_a_new_version_and_the_old_file_is_untouched(tmp_path):
    lora = tmp_path / "Lora"
    lora.mkdir()
    (lora / "style.safetensors").write_bytes(b"someone else's lora")
    (lora / "style_v2.json").write_text("{}")  # a sidecar alone also marks the name as taken
    src = tmp_path / "out.safetensors"
    src.write_bytes(b"new weights")
    done = publish_lora(src, plan_lora(lora, "style", "run1"), trigger_words="sks style", preferred_weight=0.8)
    assert done.path == lora / "style_v3.safetensors" and done.path.read_bytes() == b"new weights"
    assert (lora / "style.safetensors").read_bytes() == b"someone else's lora"
    card = json.loads((lora / "style_v3.json").read_text())
    assert card["activation text"] == "sks style" and card["preferred weight"] == 0.8
    assert sorted(p.name for p in lora.iterdir()) == ["style.safetensors", "style_v2.json", "style_v3.json",
                                                      "style_v3.safetensors"]


def test_the_last_sample_becomes_the_preview(tmp_path):
    src = tmp_path / "out.safetensors"
    src.write_bytes(b"w")
    sample = tmp_path / "sample.png"
    sample.write_bytes(b"\x89PNG fake")
    done = publish_lora(src, plan_lora(tmp_path / "Lora", "shapes", "run1"), preview=sample)
    assert done.preview == tmp_path / "Lora" / "shapes.png" and done.preview.read_bytes() == b"\x89PNG fake"
    assert not list((tmp_path / "Lora").glob("*.part"))


def test_text_adapters_go_to_their_own_folder_as_a_whole(tmp_path):
    adapter = tmp_path / "out" / "chat"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    first = publish_adapter(adapter, plan_adapter(tmp_path / "adapters", "chat", "run1"))
    second = publish_adapter(adapter, plan_adapter(tmp_path / "adapters", "chat", "run2"))
    assert first.path.name == "chat" and second.path.name == "chat_v2"
    assert (second.path / "adapter_model.safetensors").read_bytes() == b"w"
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        publish_adapter(tmp_path / "out", plan_adapter(tmp_path / "adapters", "nope", "run3"))


def test_the_daemon_reads_the_engines_exit_codes_right():
    from lora_core import events

    assert (EXIT_CONFIG, EXIT_STOPPED, EXIT_OOM) == (events.EXIT_CONFIG, events.EXIT_STOPPED, events.EXIT_OOM)


def test_publishing_again_after_a_crash_finishes_the_same_name_and_removes_the_half_copy(tmp_path):
    """What a restarted daemon does with a stored publication: the same stem, files already there kept, the
    half-written .part of the killed copy gone — no _v2."""
    lora = tmp_path / "Lora"
    src = tmp_path / "out.safetensors"
    src.write_bytes(b"w" * 1000)
    pub = plan_lora(lora, "style", "20250101-000000-abcdef")
    (lora / "style.json").write_text(sidecar_text(src, "sks", 1.0))  # written before the crash
    pub.part(lora / "style.safetensors").write_bytes(b"w" * 500)  # the copy the crash cut short
    again = Publication.from_dict(pub.to_dict())
    done = publish_lora(src, again, trigger_words="sks")
    assert done.path == lora / "style.safetensors" and done.path.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in lora.iterdir()) == ["style.json", "style.safetensors"]
    assert publish_lora(src, again, trigger_words="sks").path == done.path  # idempotent: a third call changes nothing
    assert sorted(p.name for p in lora.iterdir()) == ["style.json", "style.safetensors"]


def test_a_name_reserved_by_another_publication_is_not_chosen(tmp_path):
    assert plan_lora(tmp_path, "style", "b", reserved=["style"]).stem == "style_v2"


def test_rollback_removes_only_what_this_publication_wrote(tmp_path):
    lora = tmp_path / "Lora"
    lora.mkdir()
    src = tmp_path / "out.safetensors"
    src.write_bytes(b"mine")
    pub = plan_lora(lora, "style", "r1")
    text = sidecar_text(src, None, 1.0)
    (lora / "style.json").write_text(text)
    (lora / "style.safetensors").write_bytes(b"someone else's")
    pub.part(lora / "style.safetensors").write_bytes(b"mi")
    rollback(pub, {lora / "style.safetensors": src, lora / "style.json": text})
    assert sorted(p.name for p in lora.iterdir()) == ["style.safetensors"]
    assert (lora / "style.safetensors").read_bytes() == b"someone else's"
