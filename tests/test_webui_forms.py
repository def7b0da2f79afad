"""The Train form speaks the engine's schema: its values validate as a config, and each problem finds its field."""
from __future__ import annotations

import pytest

from lora_daemon.ui.forms import (FIELDS, TEXT_FIELDS, config_to_form, form_to_config, is_text_config, parse_extra_yaml,
                             problems_by_field, text_form_to_config)
from lora_daemon.ui.forms import SETTINGS, TEXT_TASK
from lora_daemon.ui.presets import all_presets, get_preset, list_presets, preset_form_values, text_form_start
from lora_core.config import ConfigError, config_from_dict


def form_defaults() -> dict:
    return {spec.key: spec.default for spec in FIELDS}


def test_default_form_is_a_valid_engine_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "images").mkdir()
    raw = form_to_config(form_defaults(), str(tmp_path / "model.safetensors"), str(tmp_path / "images"),
                         str(tmp_path / "out"))
    cfg = config_from_dict(raw)
    assert cfg.output.output_name == "my_lora" and cfg.training.max_train_steps is None


def test_the_daemons_output_overrides_do_not_clash_with_the_form(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"")
    raw = form_to_config({**form_defaults(), "output_name": "my_style"}, str(tmp_path / "m.safetensors"),
                         str(tmp_path), None)
    cfg = config_from_dict(raw, overrides={"output.output_dir": str(tmp_path / "out"),
                                           "output.output_name": "my_style"})
    assert cfg.output.output_name == "my_style"


def test_negative_learning_rate_is_reported_next_to_the_learning_rate_field(tmp_path):
    values = {**form_defaults(), "learning_rate": "-1"}
    with pytest.raises(ConfigError) as err:
        config_from_dict(form_to_config(values, str(tmp_path / "missing.safetensors"), None, None))
    by_field, general = problems_by_field(err.value.problems)
    assert by_field["learning_rate"] == ["training.learning_rate: must be > 0, got -1.0"]
    assert any(p.startswith("model.base_model:") for p in general)


def test_other_settings_yaml_overrides_the_form_and_bad_yaml_names_the_line():
    extra = parse_extra_yaml("clip_skip: 2\nlearning_rate: 3e-4\n")
    raw = form_to_config(form_defaults(), None, None, None, extra)
    assert raw["clip_skip"] == 2 and raw["training"]["learning_rate"] == "3e-4"
    with pytest.raises(ValueError, match=r"line 2"):
        parse_extra_yaml("a: 1\nb: : c\n")


def test_a_run_snapshot_loads_back_into_the_form(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "m.safetensors").write_bytes(b"")
    snapshot = config_from_dict(form_to_config({**form_defaults(), "lora_rank": 4, "sample_prompts": "a\nb"},
                                               str(tmp_path / "m.safetensors"), str(tmp_path / "images"),
                                               str(tmp_path / "out"))).to_dict()
    form, rest = config_to_form(snapshot)
    assert form["lora_rank"] == 4 and form["sample_prompts"] == "a\nb" and form["max_train_steps"] == 0
    assert rest["base_model"] == str(tmp_path / "m.safetensors") and "lora_rank" not in rest


def test_every_preset_validates_and_lists_only_what_it_changes(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "llm").mkdir()
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n', encoding="utf-8")
    presets = all_presets()
    assert {p.name for p in list_presets()} == {"style", "character", "concept", "style-lowvram",
                                                "character-lowvram", "concept-lowvram", "sdxl-prodigy",
                                                "sd15-locon", "lokr-style", "dora-character", "flux-character",
                                                "flux-style", "flux-lowvram"}
    assert {p.name for p in list_presets(family="flux")} == {"flux-character", "flux-style", "flux-lowvram"}
    assert not any(p.name.startswith("flux-") for p in list_presets(family="sd"))
    assert [p.name for p in list_presets(task_type=TEXT_TASK)] == ["text"]
    by_name = {p.name: p for p in presets}
    for preset in presets:
        assert preset.description
        base = by_name[preset.own["extends"]].values if "extends" in preset.own else {}
        for key, value in preset.own.items():
            if key == "extends":
                continue
            assert key in SETTINGS, f"preset {preset.name}: {key} is not a setting"
            inherited = base.get(key, SETTINGS[key]["default"])
            assert value != inherited, f"preset {preset.name}: {key}: {value!r} is what it would be anyway"
        paths = ({"base_model": str(tmp_path / "llm"), "train_data_file": str(tmp_path / "train.jsonl")}
                 if preset.task_type == TEXT_TASK else
                 {"base_model": str(tmp_path / "m.safetensors"), "train_data_dir": str(tmp_path)})
        config_from_dict({**preset.values, **paths, "output_dir": str(tmp_path / "out")})
    low = get_preset("character-lowvram").values
    assert low["batch_size"] == 1 and low["lr_scheduler"] == "cosine" and low["train_text_encoder"] is False


def test_choosing_a_preset_resets_what_the_last_one_set_and_keeps_the_users_name():
    character = preset_form_values("character", FIELDS)
    assert character["train_text_encoder"] is True and character["text_encoder_lr"] == 5e-5
    style = preset_form_values("style", FIELDS)
    assert style["train_text_encoder"] is False and style["text_encoder_lr"] == 0 and style["epochs"] == 10
    assert style["lr_scheduler"] == "cosine" and style["batch_size"] == 2
    assert "output_name" not in style and "trigger_word" not in style
    start = text_form_start(TEXT_FIELDS)
    assert start["learning_rate"] == 2e-4 and start["target_modules"] == "q_proj, k_proj, v_proj, o_proj"


def test_a_preset_extending_a_missing_or_circular_one_is_left_out(tmp_path):
    (tmp_path / "a.yaml").write_text("# A\nextends: b\nbatch_size: 3\n")
    (tmp_path / "b.yaml").write_text("# B\nextends: a\n")
    (tmp_path / "c.yaml").write_text("# C\nextends: nowhere\n")
    (tmp_path / "d.yaml").write_text("# D\nbatch_size: 2\n")
    (tmp_path / "e.yaml").write_text("# E\nextends: d\nseed: 1\n")
    assert {p.name: p.values for p in all_presets(tmp_path)} == {"d": {"batch_size": 2},
                                                                 "e": {"batch_size": 2, "seed": 1}}


def text_form_defaults() -> dict:
    return {spec.key: spec.default for spec in TEXT_FIELDS}


def test_the_text_form_is_a_valid_text_generation_config(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    values = {**text_form_defaults(), "base_model": str(tmp_path / "llm"), "train_data_file": str(tmp_path /
              "train.jsonl"), "text_format": "text", "target_modules": "q_proj, v_proj",
              "sample_prompts": "What colour is the sky?\n\nName a fruit.", "sample_every_n_steps": 5}
    cfg = config_from_dict(text_form_to_config(values, str(tmp_path / "out")))
    assert cfg.is_text and cfg.model.target_modules == ["q_proj", "v_proj"]
    assert cfg.sample.sample_prompts == ["What colour is the sky?", "Name a fruit."]
    assert cfg.data.max_seq_length == 512 and cfg.training.max_train_steps is None
    form, rest = config_to_form(cfg.to_dict(), TEXT_FIELDS)
    assert is_text_config(cfg.to_dict()) and form["target_modules"] == "q_proj, v_proj"
    assert form["base_model"] == str(tmp_path / "llm") and "max_seq_length" not in rest


def test_a_bad_text_form_value_is_reported_next_to_its_field(tmp_path):
    values = {**text_form_defaults(), "base_model": str(tmp_path / "no-such-model"), "max_seq_length": "-8",
              "text_format": "poetry"}
    with pytest.raises(ConfigError) as err:
        config_from_dict(text_form_to_config(values))
    by_field, general = problems_by_field(err.value.problems, TEXT_FIELDS)
    assert by_field["max_seq_length"][0].startswith("data.max_seq_length:")
    assert by_field["text_format"][0].startswith("data.text_format:")
    assert "base_model" in by_field and "train_data_file" in by_field, (by_field, general)
