"""One schema for the form and the config: the checked-in JSON the WebUI form reads is what the dataclasses say.

The WebUI side cannot import `lora_core` (it runs in the WebUI's Python, without torch), so it reads
daemon/ui/config_schema.json, generated from `lora_core.config`. These tests fail when the two drift apart.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from lora_core import config
from lora_core.config import SECTIONS, ConfigError, config_from_dict, schema_json
from lora_daemon.ui import forms

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / config.SCHEMA_PATH


def test_the_checked_in_schema_matches_the_config_dataclasses():
    assert forms.SCHEMA_FILE == SCHEMA_FILE
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_json(), (
        f"{config.SCHEMA_PATH} is out of date with lora_core/config.py; refresh it with: {config.SCHEMA_COMMAND}")


def test_the_refresh_command_writes_that_file(tmp_path):
    out = tmp_path / "schema.json"
    done = subprocess.run([sys.executable, "-m", "lora_core.config", "--write-schema", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8") == schema_json()
    assert forms.REFRESH == config.SCHEMA_COMMAND


def test_every_setting_is_in_the_schema_with_its_default_and_help():
    settings = json.loads(schema_json())["fields"]
    for section, cls in SECTIONS.items():
        defaults = getattr(config.TrainConfig(), section)
        for f in fields(cls):
            entry = settings[f.name]
            assert entry["section"] == section and entry["default"] == getattr(defaults, f.name), f.name
            assert entry["help"], f"{section}.{f.name}: give it a help text in its field metadata"
    assert settings["learning_rate"] == {"section": "training", "type": "float", "optional": False,
                                         "default": 1e-4, "help": settings["learning_rate"]["help"], "gt": 0}
    assert settings["max_train_steps"]["optional"] and settings["sample_prompts"]["type"] == "any"


@pytest.mark.parametrize("name", ["lr_scheduler", "optimizer", "mixed_precision", "text_format"])
def test_a_dropdown_offers_exactly_what_the_engine_accepts(name, tmp_path):
    spec = forms.FIELD_BY_KEY.get(name) or forms.TEXT_FIELD_BY_KEY[name]
    cls = SECTIONS[spec.section]
    assert list(spec.choices) == config.field_choices(cls, next(f for f in fields(cls) if f.name == name))
    for choice in spec.choices:  # each one is accepted (no other problem names this field) ...
        with pytest.raises(ConfigError) as err:
            config_from_dict({name: choice})  # no base model: fails, but not on this field
        assert not [p for p in err.value.problems if p.startswith(f"{spec.dotted}:")]
    with pytest.raises(ConfigError) as err:  # ... and anything else is refused by name, listing the choices
        config_from_dict({name: "not-a-choice"})
    assert f"{spec.dotted}: must be one of {', '.join(spec.choices)}, got 'not-a-choice'" in err.value.problems


def test_form_rows_take_default_bounds_and_help_from_the_schema():
    settings = forms.SETTINGS
    for spec in forms.FIELDS + forms.TEXT_FIELDS:
        entry = settings[spec.key]
        assert spec.section == entry["section"]
        if spec.key not in ("output_name",):  # the one suggested start value, where the engine's default is empty
            shown = forms.config_to_form({spec.key: entry["default"]}, (spec,))[0][spec.key]
            assert spec.default == shown, spec.key
        assert spec.minimum == entry.get("ge") and spec.maximum == entry.get("le")
    lr = [s for s in forms.FIELDS + forms.TEXT_FIELDS if s.key == "learning_rate"]
    assert len(lr) == 2 and {s.default for s in lr} == {settings["learning_rate"]["default"]}
    assert forms.FIELD_BY_KEY["resolution"].minimum == 64 and forms.FIELD_BY_KEY["resolution"].maximum == 4096
    assert forms.FIELD_BY_KEY["learning_rate"].info == settings["learning_rate"]["help"]


def test_a_form_start_value_may_not_contradict_an_engine_default():
    assert forms.field("output_name", "Output", start="x").default == "x"
    with pytest.raises(ValueError, match="learning_rate: the form may not start at 0.5"):
        forms.field("learning_rate", "Learning rate", start=0.5)


def test_bounds_on_the_fields_are_what_validation_enforces():
    """Each declared bound refuses a value just outside it, naming the field."""
    outside = {"ge": lambda b: b - 1, "gt": lambda b: b, "le": lambda b: b + 1, "lt": lambda b: b}
    checked = 0
    for name, entry in forms.SETTINGS.items():
        for key in set(outside) & set(entry):
            bad = outside[key](entry[key])
            with pytest.raises(ConfigError) as err:
                config_from_dict({name: bad})
            assert [p for p in err.value.problems if p.startswith(f"{entry['section']}.{name}: must be")], (name, bad)
            checked += 1
    assert checked >= 30
    with pytest.raises(ConfigError) as err:
        config_from_dict({"resolution": 500})
    assert "data.resolution: must be a multiple of 8 between 64 and 4096, got 500" in err.value.problems
