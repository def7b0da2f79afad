"""The LoRA toolbox on tiny SD1/SDXL models and real files: merge, bake, resize, extract, inspect, bad input.

The oracle is the loaders' maths, written here (as A1111's ``networks`` and ComfyUI's ``lora.py`` apply a kohya
module): ``W' = W + strength · alpha/rank · up @ down`` on the layer the module names, conv factors flattened.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_core.tools import lora_file
from lora_core.tools.bake import bake
from lora_core.tools.extract import extract_lora
from lora_core.tools.inspect import inspect_file
from lora_core.tools.merge import merge_loras
from lora_core.tools.resize import resize_lora
from loader_maths import comfy_sgm_name, comfy_unet_prefixes

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    from lora_core.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp("bases")
    return {family: build_tiny_sd(root / family, single_file=True, family=family) for family in ("sd1", "sd2", "sdxl")}


def make_lora(path: Path, family: str, seed: int, rank: int = 4, alpha: float = 2.0, text: bool = True) -> Path:
    """A kohya file from our own trainer's export path: peft LoRA on the tiny model, random factors."""
    from lora_core.image.export import kohya_lora_tensors, save_lora_file
    from lora_core.image.lora import add_lora, lora_state
    from lora_core.tiny import build_components

    parts = build_components(family, seed=0)
    add_lora(parts["unet"], UNET_TARGETS, rank, alpha, 0.0)
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if family == "sdxl" else [])
    if text:
        for encoder in encoders:
            add_lora(encoder, TE_TARGETS, rank, alpha, 0.0, field="te")
    gen = torch.Generator().manual_seed(seed)
    for model in [parts["unet"]] + (encoders if text else []):
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.2
    states = [lora_state(e) for e in encoders] if text else []
    tensors = kohya_lora_tensors(family, lora_state(parts["unet"]), states, alpha, parts["unet"].config)
    meta = {"ss_base_model_version": VERSION[family], "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_steps": "120", "ss_tag_frequency": json.dumps({"img": {"red circle": 3, "blue square": 1}})}
    return save_lora_file(path, tensors, meta, precision="float")


# ------------------------------------------------------------------------------------- the loaders' maths
def kohya_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict] = {}
    for key, value in load_file(str(path)).items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = value.float()
    return modules


def unet_names(name: str, unet) -> set[str]:
    """The kohya names a diffusers UNet layer answers to: its diffusers path and its SGM path — the SGM path by
    ComfyUI's key table (`loader_maths.comfy_unet_prefixes`), not by the engine's own `ldm_keys` mapping."""
    names = {"lora_unet_" + name.replace(".", "_")}
    cfg = unet.config
    prefixes = comfy_unet_prefixes(cfg.layers_per_block, ["CrossAttn" in t for t in cfg.down_block_types],
                                   ["CrossAttn" in t for t in cfg.up_block_types])
    sgm = comfy_sgm_name(name, prefixes)
    if sgm is not None:
        names.add("lora_unet_" + sgm.replace(".", "_"))
    return names


def apply_lora(model, prefix: str, path: Path, strength: float, unet: bool) -> int:
    """Add strength·alpha/rank·up@down to each layer the file names; returns how many layers changed."""
    modules = kohya_modules(path)
    hits = 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if unet:
                names = unet_names(name, model)
            else:
                full = name if name.startswith("text_model.") else "text_model." + name
                names = {f"{prefix}_{full.replace('.', '_')}"}
            for n in names & set(modules):
                m = modules[n]
                down, up = m["lora_down.weight"], m["lora_up.weight"]
                rank = down.shape[0]
                alpha = float(m["alpha"]) if "alpha" in m else rank
                delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
                layer.weight += strength * alpha / rank * delta
                hits += 1
    return hits


def load(path: Path):
    from lora_core.image.sd_models import load_sd_model

    return load_sd_model(path)


def unet_out(model, family: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if family == "sdxl":
        pooled = torch.randn(1, model.text_encoder_2.config.projection_dim, generator=gen)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return model.unet(latents, torch.tensor([500]), text, **kwargs).sample


def text_out(encoder) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1746, 49407] + [49407] * 73])
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states[-2]


def a1111_family(path: Path) -> str:
    """A1111's guess from the state dict's key signature (sd_models_config): SDXL's second OpenCLIP encoder,
    SD2's OpenCLIP encoder, else SD1."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    if "conditioner.embedders.1.model.ln_final.weight" in keys:
        return "sdxl"
    if "cond_stage_model.model.ln_final.weight" in keys:
        return "sd2"
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    return "sd1"


# ------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_by_concatenation_equals_applying_the_inputs(bases, family, tmp_path):
    a = make_lora(tmp_path / "a.safetensors", family, seed=1, rank=4, alpha=2.0)
    b = make_lora(tmp_path / "b.safetensors", family, seed=2, rank=2, alpha=1.0)
    merged = tmp_path / "ab.safetensors"
    report = merge_loras([(a, 0.7), (b, -0.4)], merged, precision="fp32")
    assert report["method"] == "concat" and report["rank"] == 6 and merged.is_file()

    expected, got = load(bases[family]), load(bases[family])
    assert apply_lora(expected.unet, "lora_unet", a, 0.7, True) > 0
    apply_lora(expected.unet, "lora_unet", b, -0.4, True)
    assert apply_lora(got.unet, "lora_unet", merged, 1.0, True) > 0
    diff = (unet_out(expected, family) - unet_out(got, family)).abs().max().item()
    assert diff < 1e-4
    for mod_e, mod_g in zip(expected.unet.state_dict().values(), got.unet.state_dict().values()):
        assert (mod_e - mod_g).abs().max() < 1e-5
    assert inspect_file(merged)["training"]["merged_from"][0]["weight"] == 0.7


def test_svd_merge_error_decreases_with_rank_and_is_reported(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", "sd1", seed=1, rank=4)
    b = make_lora(tmp_path / "b.safetensors", "sd1", seed=2, rank=4)
    exact = kohya_modules(_merged(tmp_path, [(a, 1.0), (b, 0.5)], None))
    errors, true_errors = [], []
    for rank in (1, 3, 6, 8):
        out = tmp_path / f"r{rank}.safetensors"
        report = merge_loras([(a, 1.0), (b, 0.5)], out, rank=rank, precision="fp32")
        assert report["rank"] == rank and set(report["error_per_module"]) == {k for k in exact}
        errors.append(report["mean_relative_error"])
        got = kohya_modules(out)
        true_errors.append(sum(_rel(exact[n], got[n]) for n in exact) / len(exact))
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]
    assert errors[-1] < 1e-4  # rank 8 = 4 + 4 holds the sum exactly
    assert true_errors == pytest.approx(errors, abs=1e-4)


def _merged(tmp_path: Path, inputs, rank) -> Path:
    out = tmp_path / "exact.safetensors"
    merge_loras(inputs, out, rank=rank, precision="fp32")
    return out


def _delta(m: dict) -> torch.Tensor:
    rank = m["lora_down.weight"].shape[0]
    return float(m["alpha"]) / rank * (m["lora_up.weight"].flatten(1) @ m["lora_down.weight"].flatten(1))


def _rel(ref: dict, got: dict) -> float:
    r, g = _delta(ref), _delta(got)
    return float((r - g).norm() / r.norm())


def test_resize_reports_retained_energy_and_its_error_falls_with_rank(tmp_path):
    src = make_lora(tmp_path / "big.safetensors", "sd1", seed=3, rank=8)
    reports = [resize_lora(src, tmp_path / f"r{r}.safetensors", rank=r, precision="fp32") for r in (2, 4, 8)]
    means = [r["mean_relative_error"] for r in reports]
    assert means[0] > means[1] > means[2] and means[2] < 1e-4
    assert all(0 < m["retained"] <= 1 for m in reports[0]["per_module"].values())
    original = kohya_modules(src)
    small = kohya_modules(tmp_path / "r2.safetensors")
    name = next(iter(original))
    assert small[name]["lora_down.weight"].shape[0] == 2
    assert _rel(original[name], small[name]) == pytest.approx(reports[0]["per_module"][name]["relative_error"],
                                                                abs=1e-4)
    fro = resize_lora(src, tmp_path / "fro.safetensors", rank=8, method="sv_fro", param=0.9)
    assert all(m["retained"] >= 0.9 - 1e-6 and m["rank"] <= 8 for m in fro["per_module"].values())
    assert inspect_file(tmp_path / "r4.safetensors")["rank"] == 4


# -------------------------------------------------------------------------------------------------- bake
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_comfyui_key_table_finds_every_unet_layer_in_the_single_file_checkpoint(bases, family):
    """The oracle the bake and merge tests use (ComfyUI's diffusers → ldm/SGM table, mirrored in loader_maths)
    names a tensor of the checkpoint file for every weight layer of the UNet, and two layers never share one."""
    from safetensors import safe_open

    with safe_open(str(bases[family]), "pt") as f:
        keys = {k[len("model.diffusion_model."):] for k in f.keys() if k.startswith("model.diffusion_model.")}
    unet = load(bases[family]).unet
    cfg = unet.config
    prefixes = comfy_unet_prefixes(cfg.layers_per_block, ["CrossAttn" in t for t in cfg.down_block_types],
                                   ["CrossAttn" in t for t in cfg.up_block_types])
    named = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            sgm = comfy_sgm_name(name, prefixes)
            assert sgm is not None and f"{sgm}.weight" in keys, (name, sgm)
            named[name] = sgm
    assert len(set(named.values())) == len(named) > 20


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_baked_checkpoint_equals_base_plus_lora_and_loads_as_its_family(bases, family, tmp_path):
    lora = make_lora(tmp_path / "style.safetensors", family, seed=4)
    out = tmp_path / "baked.safetensors"
    report = bake(bases[family], [(lora, 0.8)], out, precision="fp32")
    assert report["changed_tensors"] > 0 and report["family"] == family
    assert a1111_family(out) == family
    baked = load(out)
    assert baked.family == family
    expected = load(bases[family])
    apply_lora(expected.unet, "lora_unet", lora, 0.8, True)
    encoders = [("lora_te1" if family == "sdxl" else "lora_te", "text_encoder")]
    if family == "sdxl":
        encoders.append(("lora_te2", "text_encoder_2"))
    for prefix, attr in encoders:
        assert apply_lora(getattr(expected, attr), prefix, lora, 0.8, False) > 0
        assert (text_out(getattr(expected, attr)) - text_out(getattr(baked, attr))).abs().max() < 1e-4
    assert (unet_out(expected, family) - unet_out(baked, family)).abs().max() < 1e-4
    base_out = unet_out(load(bases[family]), family)
    assert (unet_out(baked, family) - base_out).abs().max() > 1e-3  # the LoRA did change something
    # the base's original key layout and every tensor survive
    assert sorted(load_file(str(out))) == sorted(load_file(str(bases[family])))

    half = tmp_path / "baked16.safetensors"
    bake(bases[family], [(lora, 0.8)], half, precision="fp16")
    assert {v.dtype for v in load_file(str(half)).values() if v.is_floating_point()} == {torch.float16}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_extract_from_base_and_baked_recovers_the_lora(bases, family, tmp_path):
    lora = make_lora(tmp_path / "style.safetensors", family, seed=5, rank=4)
    baked = tmp_path / "baked.safetensors"
    bake(bases[family], [(lora, 1.0)], baked, precision="fp32")
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(baked, bases[family], out, rank=4, precision="fp32")
    assert report["max_relative_error"] < 1e-3
    original, extracted = load(bases[family]), load(bases[family])
    encoders = [("lora_te", "text_encoder")] if family != "sdxl" else [("lora_te1", "text_encoder"),
                                                                       ("lora_te2", "text_encoder_2")]
    apply_lora(original.unet, "lora_unet", lora, 1.0, True)
    assert apply_lora(extracted.unet, "lora_unet", out, 1.0, True) == len(
        [k for k in kohya_modules(lora) if k.startswith("lora_unet_")])
    for prefix, attr in encoders:
        apply_lora(getattr(original, attr), prefix, lora, 1.0, False)
        assert apply_lora(getattr(extracted, attr), prefix, out, 1.0, False) > 0
        assert (text_out(getattr(original, attr)) - text_out(getattr(extracted, attr))).abs().max() < 1e-3
    assert (unet_out(original, family) - unet_out(extracted, family)).abs().max() < 1e-3
    assert set(kohya_modules(out)) == set(kohya_modules(lora))  # the names sd-scripts writes for the family


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_reads_our_file_with_its_training_metadata(tmp_path):
    info = inspect_file(make_lora(tmp_path / "ours.safetensors", "sdxl", seed=1, rank=4, alpha=2.0))
    assert info["family"] == "sdxl" and info["adapter_types"] == ["lora"] and info["rank"] == 4
    assert info["alpha"] == 2.0 and info["training"]["steps"] == 120
    assert info["training"]["top_tags"][0] == ["red circle", 3] or info["training"]["top_tags"][0] == ("red circle", 3)
    assert info["text_encoder_modules"] > 0 and any(b.startswith("lora_te2") for b in info["blocks"])


def test_inspect_reads_a_sd_scripts_named_file_without_metadata(tmp_path):
    """SDXL as sd-scripts names it (SGM UNet names, lora_te1/te2, a LoCon 3×3 conv), no ss_* keys at all."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, (out_f, in_f) in {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
                                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
                                "lora_te2_text_model_encoder_layers_0_mlp_fc1": (5120, 1280)}.items():
        t[name + ".lora_down.weight"] = torch.randn(8, in_f, generator=g)
        t[name + ".lora_up.weight"] = torch.zeros(out_f, 8)
        t[name + ".alpha"] = torch.tensor(4.0)
    t["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] = torch.randn(4, 320, 3, 3, generator=g)
    t["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"] = torch.zeros(320, 4, 1, 1)
    t["lora_unet_input_blocks_1_0_in_layers_2.alpha"] = torch.tensor(1.0)
    path = tmp_path / "sd_scripts.safetensors"
    save_file(t, str(path))
    info = inspect_file(path)
    assert info["family"] == "sdxl" and info["format"] == "kohya"
    assert info["adapter_types"] == ["locon", "lora"] and info["rank"] == [4, 8] and info["modules"] == 4
    assert info["blocks"]["lora_te2"]["alpha"] == [4.0]


def test_inspect_reads_lycoris_loha_lokr_and_dora_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {f"{name}.hada_w1_a": torch.randn(32, 4, generator=g), f"{name}.hada_w1_b": torch.randn(4, 32, generator=g),
         f"{name}.hada_w2_a": torch.randn(32, 4, generator=g), f"{name}.hada_w2_b": torch.randn(4, 32, generator=g),
         f"{name}.alpha": torch.tensor(2.0)}
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    t.update({f"{k}.lokr_w1": torch.randn(4, 4, generator=g), f"{k}.lokr_w2_a": torch.randn(8, 2, generator=g),
              f"{k}.lokr_w2_b": torch.randn(2, 8, generator=g), f"{k}.alpha": torch.tensor(2.0)})
    v = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
    t.update({f"{v}.lora_down.weight": torch.randn(4, 32, generator=g), f"{v}.lora_up.weight": torch.randn(32, 4),
              f"{v}.alpha": torch.tensor(4.0), f"{v}.dora_scale": torch.ones(32, 1)})
    path = tmp_path / "lycoris.safetensors"
    save_file(t, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    info = inspect_file(path)
    assert info["adapter_types"] == ["dora", "loha", "lokr", "lora"] and info["family"] == "sd1"
    lf = lora_file.open_lora(path)
    loha = lf.modules[name]
    expected = (t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]) * (t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"])
    assert torch.allclose(loha.delta(), expected * 2.0 / 4, atol=1e-5)
    lokr = lf.modules[k]
    expected = torch.kron(t[f"{k}.lokr_w1"], t[f"{k}.lokr_w2_a"] @ t[f"{k}.lokr_w2_b"]) * 2.0 / 2
    assert torch.allclose(lokr.delta(), expected, atol=1e-5)
    with pytest.raises(lora_file.UnsupportedAdapterError, match="DoRA"):
        merge_loras([(path, 1.0)], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_inspect_reads_a_diffusers_peft_file(tmp_path):
    from lora_core.image.export import save_diffusers_lora
    from lora_core.image.lora import add_lora, lora_state
    from lora_core.tiny import build_components

    parts = build_components("sd1")
    add_lora(parts["unet"], ["to_q"], 4, 8.0, 0.0)
    add_lora(parts["text_encoder"], ["q_proj"], 4, 8.0, 0.0, field="te")
    folder = save_diffusers_lora(tmp_path / "peft", lora_state(parts["unet"]), [lora_state(parts["text_encoder"])],
                                 4, 8.0)
    info = inspect_file(folder)
    assert info["format"] == "diffusers" and info["rank"] == 4 and info["alpha"] == 8.0
    assert "lora_te" in info["blocks"] and info["unet_modules"] == 8
    lf = lora_file.open_lora(folder)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in lf.modules


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_gets_one_named_error_each_and_nothing_is_written(bases, tmp_path):
    sd1 = make_lora(tmp_path / "sd1.safetensors", "sd1", seed=1, text=False)
    sdxl = make_lora(tmp_path / "sdxl.safetensors", "sdxl", seed=1, text=False)
    out = tmp_path / "out.safetensors"
    with pytest.raises(lora_file.MixedFamiliesError, match=r"sd1\.safetensors is sd1.*sdxl\.safetensors is sdxl"):
        merge_loras([(sd1, 1.0), (sdxl, 1.0)], out)
    with pytest.raises(lora_file.MixedFamiliesError, match="sdxl"):
        bake(bases["sd1"], [(sdxl, 1.0)], out)
    pickle = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, pickle)
    with pytest.raises(lora_file.PickleRefusedError, match=r"old\.ckpt"):
        bake(pickle, [(sd1, 1.0)], out)
    with pytest.raises(lora_file.PickleRefusedError, match=r"old\.ckpt"):
        merge_loras([(pickle, 1.0)], out)
    with pytest.raises(lora_file.NotABaseModelError, match=r"sd1\.safetensors: this is a LoRA"):
        bake(sd1, [(sd1, 1.0)], out)
    with pytest.raises(lora_file.NotALoraError, match="base checkpoint"):
        merge_loras([(bases["sd1"], 1.0)], out)
    with pytest.raises(lora_file.MissingFileError, match=r"gone\.safetensors"):
        merge_loras([(tmp_path / "gone.safetensors", 1.0)], out)
    with pytest.raises(lora_file.MissingFileError, match=r"gone\.safetensors"):
        extract_lora(tmp_path / "gone.safetensors", bases["sd1"], out)
    assert not out.exists() and not list(tmp_path.glob(".*"))  # no temp file either
    out.write_bytes(b"keep")
    with pytest.raises(lora_file.OutputExistsError, match="--force"):
        merge_loras([(sd1, 1.0)], out)
    assert out.read_bytes() == b"keep"
    merge_loras([(sd1, 1.0)], out, force=True)
    assert inspect_file(out)["family"] == "sd1"


def test_cli_prints_one_line_for_bad_input_and_json_for_inspect(bases, tmp_path):
    lora = make_lora(tmp_path / "x.safetensors", "sd1", seed=1, text=False)
    cmd = [sys.executable, "-m", "lora_core.tools"]
    bad = subprocess.run(cmd + ["bake", str(lora), str(lora), "--out", str(tmp_path / "m.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "this is a LoRA, not a base checkpoint" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "m.safetensors").exists()
    events = tmp_path / "events.jsonl"
    ok = subprocess.run(cmd + ["merge", f"{lora}:0.5", "--out", str(tmp_path / "half.safetensors"), "--json",
                               "--events", str(events)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["output"] == str(tmp_path / "half.safetensors")
    kinds = [json.loads(line)["type"] for line in events.read_text().splitlines()]
    assert kinds[0] == "start" and "progress" in kinds and kinds[-1] == "end"
    shown = subprocess.run(cmd + ["inspect", str(tmp_path / "half.safetensors"), "--json"], capture_output=True,
                           text=True, timeout=120)
    assert json.loads(shown.stdout)["files"][0]["family"] == "sd1"


# ------------------------------------------------------------------------- every adapter type of the trainer
ADAPTER_TYPES = {
    "lora": dict(network_type="lora"),
    "locon": dict(network_type="locon", conv_rank=2, conv_alpha=1.0),
    "loha": dict(network_type="loha", conv_rank=2, conv_alpha=1.0),
    "lokr": dict(network_type="lokr", lokr_factor=2),
    "dora": dict(network_type="dora"),
}
EXPECTED_TYPES = {"lora": ["lora"], "locon": ["locon", "lora"], "loha": ["loha"], "lokr": ["lokr"],
                  "dora": ["dora", "lora"]}


@pytest.mark.parametrize("kind", list(ADAPTER_TYPES))
def test_each_adapter_type_of_ours_is_inspected_and_bakes_like_the_adapted_model_runs(bases, kind, tmp_path):
    """A file from our exporter for each adapter type: inspect names the type, and the baked checkpoint's UNet
    answers exactly like the adapted UNet (peft/LyCORIS modules applying themselves in the forward pass)."""
    pytest.importorskip("lora_core.image.adapters")
    from lora_core.image.adapters import AdapterSpec, add_network, adapter_parameters, export_modules
    from lora_core.image.export import kohya_network_tensors, save_lora_file
    from lora_core.tiny import build_components

    parts = build_components("sd1", seed=0)
    unet = parts["unet"]
    spec = AdapterSpec(rank=4, alpha=2.0, **ADAPTER_TYPES[kind])
    torch.manual_seed(0)
    add_network(unet, spec, UNET_TARGETS)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p += torch.randn(p.shape, generator=gen) * 0.05
    path = tmp_path / f"{kind}.safetensors"
    tensors = kohya_network_tensors("sd1", export_modules(unet), [], unet.config)
    save_lora_file(path, tensors, {"ss_base_model_version": "sd_v1"}, precision="float")

    info = inspect_file(path)
    assert info["adapter_types"] == EXPECTED_TYPES[kind] and info["family"] == "sd1"
    baked = tmp_path / "baked.safetensors"
    bake(bases["sd1"], [(path, 1.0)], baked, precision="fp32")

    class Holder:  # what unet_out needs of a loaded model
        pass

    adapted = Holder()
    adapted.unet = unet.eval()
    expected = unet_out(adapted, "sd1")
    got = unet_out(load(baked), "sd1")
    assert (expected - got).abs().max() < 1e-4
    assert (expected - unet_out(load(bases["sd1"]), "sd1")).abs().max() > 1e-3
