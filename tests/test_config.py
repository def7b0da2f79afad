"""The one config schema: both forms, defaults, and errors a user can act on."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from lora_core.config import ConfigError, TrainConfig, config_from_dict, load_config

FLAT = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"
lora_rank: 8
unet_target_modules: ["to_q", "to_v"]
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""

SECTIONED = """\
data:     {train_data_dir: "./data/style_train", metadata_path: "./data/style_train/metadata.csv"}
model:    {base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors", lora_rank: 8,
           unet_target_modules: ["to_q", "to_v"]}
training: {batch_size: 4, epochs: 10, learning_rate: 2e-4}
output:   {output_dir: "./output/my_style_lora", save_steps: 100}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data/style_train").mkdir(parents=True)
    (tmp_path / "data/style_train/metadata.csv").write_text("file_name,text\n")
    (tmp_path / "models/Stable-diffusion").mkdir(parents=True)
    (tmp_path / "models/Stable-diffusion/v1-5-pruned.safetensors").write_bytes(b"")
    (tmp_path / "models/Stable-diffusion/old.ckpt").write_bytes(b"")
    return tmp_path


def load(project: Path, text: str, name: str = "cfg.yaml") -> TrainConfig:
    path = project / name
    path.write_text(text)
    return load_config(path)


def test_flat_and_sectioned_forms_load_to_the_same_config(project):
    flat, sectioned = load(project, FLAT, "flat.yaml"), load(project, SECTIONED, "sectioned.yaml")
    assert flat.to_dict() == sectioned.to_dict()
    assert flat.training.learning_rate == 2e-4 and flat.model.lora_rank == 8


def test_issue_example_with_alpha_dropout_and_accumulation_loads(project):
    cfg = load(project, """\
data:     {train_data_dir: "./data/style_train", metadata_path: "./data/style_train/metadata.csv"}
model:    {base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors", lora_rank: 8, alpha: 8, dropout: 0.1}
training: {batch_size: 4, epochs: 10, learning_rate: 2e-4, gradient_accumulation_steps: 2}
output:   {output_dir: "./output/my_style_lora", save_steps: 100}
""")
    assert (cfg.model.alpha, cfg.model.dropout, cfg.training.gradient_accumulation_steps) == (8.0, 0.1, 2)


def test_relative_paths_resolve_against_the_config_folder(project, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    cfg = load(project, FLAT)
    assert cfg.data.train_data_dir == str((project / "data/style_train").resolve())
    assert cfg.output.output_dir == str((project / "output/my_style_lora").resolve())
    assert cfg.output.output_name == "my_style_lora"
    assert cfg.output.logging_dir == str(Path(cfg.output.output_dir) / "logs")


def test_every_field_has_a_documented_default():
    documented = yaml.safe_load((Path(__file__).parents[1] / "configs/lora_default.yaml").read_text())
    defaults = TrainConfig().to_dict()
    for section, values in defaults.items():
        assert set(documented[section]) == set(values), f"configs/lora_default.yaml section {section}"
        for key, value in values.items():
            assert documented[section][key] == value, f"{section}.{key} default differs from the docs"


BAD = [
    ("learning_rate: -1\n", "training.learning_rate: must be > 0, got -1.0 (line {n})"),
    ("batch_size: 0\n", "training.batch_size: must be at least 1, got 0 (line {n})"),
    ("lora_rank: 2.5\n", "model.lora_rank: must be a whole number, got 2.5 (line {n})"),
    ("epochs: ten\n", "training.epochs: must be a whole number, got 'ten' (line {n})"),
    ("mixed_precision: fp8\n", "training.mixed_precision: must be one of no, fp16, bf16, got 'fp8' (line {n})"),
    ("dropout: 1.5\n", "model.dropout: must be in [0, 1), got 1.5 (line {n})"),
    ("resolution: 500\n", "data.resolution: must be a multiple of 8 between 64 and 4096, got 500 (line {n})"),
    ("lerning_rate: 1e-4\n", "lerning_rate: unknown setting (did you mean 'learning_rate'?) (line {n})"),
    ("shuffle_caption: maybe\n", "data.shuffle_caption: must be true or false, got 'maybe' (line {n})"),
    ("lr_scheduler: cosine_restarts\n",
     "training.lr_scheduler: must be one of constant, constant_with_warmup, cosine, linear, got 'cosine_restarts' "
     "(line {n})"),
    ("unet_target_modules: 5\n", "model.unet_target_modules: must be a list of names, got 5 (line {n})"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[b[0].split(":")[0] for b in BAD])
def test_bad_value_is_refused_naming_field_value_reason_and_line(project, line, message):
    text = FLAT + line
    n = text.count("\n")
    with pytest.raises(ConfigError) as err:
        load(project, text)
    assert message.format(n=n) in err.value.problems


def test_unknown_key_inside_a_section_gets_a_hint(project):
    with pytest.raises(ConfigError) as err:
        load(project, SECTIONED + "sample: {sample_every_n_step: 10}\n")
    assert err.value.problems == ["sample.sample_every_n_step: unknown setting (did you mean 'sample_every_n_steps'?) "
                                  "(line 6)"]


def test_key_in_the_wrong_section_is_named(project):
    text = SECTIONED.replace("training: {batch_size: 4", "training: {lora_rank: 4, batch_size: 4")
    with pytest.raises(ConfigError) as err:
        load(project, text)
    assert err.value.problems == ["training.lora_rank: belongs in section 'model', not 'training' (line 4)"]


def test_missing_paths_and_pickle_checkpoints_are_refused_before_loading(project):
    with pytest.raises(ConfigError) as err:
        load(project, FLAT.replace("style_train\"\nmetadata", "nope\"\nmetadata")
             .replace("v1-5-pruned.safetensors", "old.ckpt"))
    problems = "\n".join(err.value.problems)
    assert "data.train_data_dir: no such folder" in problems
    assert "model.base_model: old.ckpt is a pickle file" in problems and "allow_pickle: true" in problems
    cfg = load(project, FLAT.replace("v1-5-pruned.safetensors", "old.ckpt") + "allow_pickle: true\n")
    assert cfg.model.base_model.endswith("old.ckpt")


def test_not_yaml_and_not_a_mapping_are_clear_errors(project):
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2\)"):
        load(project, "a: 1\n  b: [\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(project, "- just\n- a list\n")


def test_yaml_tags_that_would_build_objects_are_refused(project):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(project, FLAT + "seed: !!python/object/apply:os.system ['echo hacked']\n")


def test_dict_configs_from_the_daemon_validate_the_same_way(project):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"training": {"learning_rate": -1}}, base_dir=project)
    assert "training.learning_rate: must be > 0, got -1.0" in err.value.problems
    assert any(p.startswith("data.train_data_dir: required") for p in err.value.problems)


def test_an_override_replaces_a_flat_or_aliased_value_instead_of_colliding(project):
    raw = {"train_data_dir": "data/style_train", "base_model": "models/Stable-diffusion/v1-5-pruned.safetensors",
           "output_dir": "out", "output_name": "mine", "network_dim": 16}
    cfg = config_from_dict(raw, base_dir=project, overrides={"output.output_name": "theirs", "lora_rank": 4,
                                                             "training.batch_size": 2})
    assert (cfg.output.output_name, cfg.model.lora_rank, cfg.training.batch_size) == ("theirs", 4, 2)


def test_a_bad_sample_prompt_option_is_refused_with_the_config(project):
    with pytest.raises(ConfigError) as err:
        load(project, FLAT + "sample_prompts: ['a red circle --w 500', 'a cat']\n")
    assert err.value.problems == ["sample.sample_prompts: prompt 1: --w '500': must be a multiple of 8, at least 64 "
                                  "(line 11)"]


@dataclasses.dataclass
class Probe:
    interval: Optional[int] = None  # the letters "int" in "interval" or "Optional" must not matter
    mode: Literal["a", "b"] = "a"
    names: list[str] = dataclasses.field(default_factory=list)
    ratio: float = 0.5


def test_types_come_from_the_annotations_not_their_spelling():
    """`typing.get_type_hints` decides coercion: an Optional number may be empty, a Literal is a choice."""
    from lora_core.config import field_choices, field_type

    kinds = {f.name: field_type(Probe, f) for f in dataclasses.fields(Probe)}
    assert kinds == {"interval": ("int", True), "mode": ("str", False), "names": ("list", False),
                     "ratio": ("float", False)}
    assert field_choices(Probe, dataclasses.fields(Probe)[1]) == ["a", "b"]
    with pytest.raises(ConfigError) as err:  # and the real fields coerce by their hints
        config_from_dict({"max_train_steps": None, "memory_budget_mb": "512", "seed": "7.5", "alpha": None})
    assert [p for p in err.value.problems if p.startswith("training.")] == \
        ["training.seed: must be a whole number, got '7.5'"]


def test_the_daemon_resolves_a_config_in_one_validation_pass(tiny_sd, tiny_data, tmp_path, monkeypatch):
    """`resolve_config` (validate, plan and submit all use it) validates once, with the run's folder in place."""
    import lora_core.config as config
    from lora_daemon.queue import resolve_config

    passes = []
    real = config._validate
    monkeypatch.setattr(config, "_validate", lambda *a: (passes.append(1), real(*a))[1])
    run_out = tmp_path / "runs" / "r1" / "output"
    raw = {"base_model": str(tiny_sd), "train_data_dir": str(tiny_data), "output_dir": "./mine/my_style",
           "resolution": 64}
    cfg = resolve_config(raw, str(tmp_path), run_out)
    assert len(passes) == 1
    assert cfg["output"]["output_dir"] == str(run_out) and cfg["output"]["output_name"] == "my_style"
    assert cfg["output"]["logging_dir"] == str(run_out / "logs")
    named = resolve_config({**raw, "output_name": "from_config"}, str(tmp_path), run_out, name="given")
    unnamed = resolve_config({k: v for k, v in raw.items() if k != "output_dir"}, str(tmp_path), run_out)
    assert (named["output"]["output_name"], unnamed["output"]["output_name"]) == ("given", "lora")
    assert len(passes) == 3
