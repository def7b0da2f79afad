"""FLUX.1 models: the BFL ↔ diffusers key table against diffusers' own converter, the tiny FLUX builder (folder,
full single file, transformer-only parts, fp8), offline loading, dev/schnell and family detection, and the
refusals that happen by field before anything loads."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_core.config import ConfigError, config_from_dict
from lora_core.image import flux_keys
from lora_core.image.flux import is_flux_config, is_flux_source, load_flux_model
from lora_core.image.flux_tiny import build_t5_tokenizer, build_tiny_flux
from lora_core.preflight import find_t5_tokenizer, flux_facts, preflight


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="session")
def flux_parts(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux-parts") / "flux1-tiny.safetensors", single_file=True,
                           layout="parts")


# ---- the key table ----------------------------------------------------------------------------------------------
# FLUX.1's real shapes (BFL names → rows), from the architecture: inner 3072, MLP 12288, heads of 128
D, M, HEAD = 3072, 12288, 128


def _real_bfl_rows(num_double: int = 19, num_single: int = 38) -> dict[str, int]:
    rows = {"img_in.weight": D, "img_in.bias": D, "txt_in.weight": D, "txt_in.bias": D,
            "final_layer.linear.weight": 64, "final_layer.linear.bias": 64,
            "final_layer.adaLN_modulation.1.weight": 2 * D, "final_layer.adaLN_modulation.1.bias": 2 * D}
    for emb in ("time_in", "vector_in", "guidance_in"):
        for layer in ("in_layer", "out_layer"):
            rows[f"{emb}.{layer}.weight"] = rows[f"{emb}.{layer}.bias"] = D
    for i in range(num_double):
        b = f"double_blocks.{i}."
        for s in ("img", "txt"):
            for name, n in ((f"{s}_mod.lin", 6 * D), (f"{s}_attn.qkv", 3 * D), (f"{s}_attn.proj", D),
                            (f"{s}_mlp.0", M), (f"{s}_mlp.2", D)):
                rows[b + name + ".weight"] = rows[b + name + ".bias"] = n
            rows[b + f"{s}_attn.norm.query_norm.scale"] = rows[b + f"{s}_attn.norm.key_norm.scale"] = HEAD
    for i in range(num_single):
        b = f"single_blocks.{i}."
        for name, n in (("modulation.lin", 3 * D), ("linear1", 3 * D + M), ("linear2", D)):
            rows[b + name + ".weight"] = rows[b + name + ".bias"] = n
        rows[b + "norm.query_norm.scale"] = rows[b + "norm.key_norm.scale"] = HEAD
    return rows


def _row_tagged(rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """One column per tensor, every row holding its own number: a converter's slicing shows in the values, and the
    whole real-size model costs a few MB."""
    out, start = {}, 0
    for name, n in rows.items():
        out[name] = torch.arange(start, start + n, dtype=torch.float64)[:, None]
        start += n
    return out


def test_the_key_table_reads_a_real_size_bfl_checkpoint_exactly_as_diffusers_converter_does():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = _row_tagged(_real_bfl_rows())
    theirs = convert_flux_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in bfl.items()})
    ours = flux_keys.bfl_to_diffusers(bfl, flux_keys.FluxDims())
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    back = flux_keys.diffusers_to_bfl(ours, flux_keys.FluxDims())
    assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)


def test_bfl_name_names_the_fused_rows_of_each_diffusers_module():
    dims = flux_keys.FluxDims()
    assert flux_keys.bfl_name("transformer_blocks.0.attn.to_k", dims) == ("double_blocks.0.img_attn.qkv",
                                                                          slice(D, 2 * D))
    assert flux_keys.bfl_name("transformer_blocks.4.attn.add_v_proj", dims) == ("double_blocks.4.txt_attn.qkv",
                                                                                slice(2 * D, 3 * D))
    assert flux_keys.bfl_name("single_transformer_blocks.3.proj_mlp", dims) == ("single_blocks.3.linear1",
                                                                                slice(3 * D, 3 * D + M))
    assert flux_keys.bfl_name("single_transformer_blocks.3.proj_out", dims) == ("single_blocks.3.linear2", None)
    assert flux_keys.bfl_name("transformer_blocks.1.ff_context.net.2", dims) == ("double_blocks.1.txt_mlp.2", None)
    assert flux_keys.module_map("norm_out.linear", dims).swap_halves
    with pytest.raises(KeyError, match="not a weight-holding module"):
        flux_keys.bfl_name("transformer_blocks.0.attn.to_nothing", dims)


def test_the_table_names_every_linear_layer_of_a_diffusers_flux_transformer(flux_dir):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer")
    dims = flux_keys.FluxDims.from_config(tr.config)
    linears = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    bfl = flux_keys.diffusers_to_bfl(tr.state_dict(), dims)
    for name in linears:
        module, rows = flux_keys.bfl_name(name, dims)
        weight = bfl[module + ".weight"]
        part = weight[rows] if rows is not None else weight
        if name != "norm_out.linear":
            assert torch.equal(part, tr.get_submodule(name).weight), name


def test_train_blocks_selects_double_and_single_blocks_and_refuses_missing_ones():
    assert flux_keys.train_blocks("all", 2, 3) == ([0, 1], [0, 1, 2])
    assert flux_keys.train_blocks("double", 2, 3) == ([0, 1], [])
    assert flux_keys.train_blocks("single.1-2,double.0", 2, 3) == ([0], [1, 2])
    with pytest.raises(ValueError, match="has 3 single blocks"):
        flux_keys.train_blocks("single.5", 2, 3)
    assert flux_keys.block_spec_problem("doubles") is not None
    assert flux_keys.block_spec_problem("single.9-3") is not None


# ---- the tiny model and loading -------------------------------------------------------------------------------
def _transformer_out(model, seed: int = 0) -> torch.Tensor:
    tr = model.transformer
    g = torch.Generator().manual_seed(seed)
    cfg = tr.config
    hidden = torch.randn(1, 16, cfg.in_channels, generator=g)
    text = torch.randn(1, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    guidance = torch.tensor([3.5]) if cfg.guidance_embeds else None
    with torch.no_grad():
        return tr(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled,
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(7, 3), guidance=guidance,
                  return_dict=False)[0]


def _encoders_out(model, caption: str = "a red circle, simple background"):
    with torch.no_grad():
        clip_ids = model.tokenizer([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
        t5_ids = model.tokenizer_2([caption], padding="max_length", max_length=32, return_tensors="pt").input_ids
        return model.text_encoder(clip_ids).pooler_output, model.text_encoder_2(t5_ids)[0]


def test_tiny_flux_folder_full_file_and_parts_load_to_the_same_model(flux_dir, flux_file, flux_parts):
    folder = load_flux_model(flux_dir)
    full = load_flux_model(flux_file)
    p = flux_parts.parent
    parts = load_flux_model(flux_parts, t5_path=str(p / "t5xxl.safetensors"), clip_path=str(p / "clip_l.safetensors"),
                            vae_path=str(p / "ae.safetensors"))
    assert folder.variant == full.variant == parts.variant == "dev"
    want = _transformer_out(folder)
    for other in (full, parts):
        assert torch.allclose(_transformer_out(other), want, atol=1e-6)
        for a, b in zip(_encoders_out(other), _encoders_out(folder)):
            assert torch.allclose(a, b, atol=1e-6)
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.allclose(other.vae.encode(pixels).latent_dist.mean,
                                  folder.vae.encode(pixels).latent_dist.mean, atol=1e-5)
    assert folder.vae.config.latent_channels == 16 and full.vae.config.shift_factor == pytest.approx(0.1159)


def test_an_fp8_file_loads_close_to_the_full_precision_model(flux_dir, tmp_path):
    fp8 = build_tiny_flux(tmp_path, single_file=True, fp8=True)
    header = json.loads(fp8.read_bytes()[8:8 + int.from_bytes(fp8.read_bytes()[:8], "little")])
    assert header["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]["dtype"] == "F8_E4M3"
    want = _transformer_out(load_flux_model(flux_dir))
    got = _transformer_out(load_flux_model(fp8, dtype=torch.float32))
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_dev_and_schnell_are_told_by_the_guidance_embedder(tmp_path, flux_file):
    schnell = build_tiny_flux(tmp_path / "s", single_file=True, variant="schnell")
    assert flux_facts(schnell)["variant"] == "schnell" and flux_facts(flux_file)["variant"] == "dev"
    model = load_flux_model(schnell)
    assert model.variant == "schnell" and not model.transformer.config.guidance_embeds
    assert model.noise_scheduler.config.shift == 1.0
    folder = build_tiny_flux(tmp_path / "sf", variant="schnell")
    assert load_flux_model(folder, text_encoders=False).variant == "schnell"


def test_the_tiny_t5_tokenizer_is_t5_shaped_and_deterministic():
    tok = build_t5_tokenizer()
    ids = tok(["a red circle"], padding="max_length", max_length=12).input_ids[0]
    assert ids[ids.index(1) + 1:] == [0] * (12 - ids.index(1) - 1), "</s> (1) then <pad> (0)"
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2
    assert build_t5_tokenizer()("a blue square").input_ids == tok("a blue square").input_ids


def test_flux_models_are_detected_by_their_keys_and_folders(flux_dir, flux_file, flux_parts, tiny_sd_file, tmp_path):
    assert is_flux_source(flux_dir) and is_flux_source(flux_file) and is_flux_source(flux_parts)
    assert not is_flux_source(tiny_sd_file)
    from lora_core.image.sd_models import ModelLoadError, detect_family

    with pytest.raises(ModelLoadError, match="FLUX.1 model"):
        detect_family(list(load_file(str(flux_parts))))
    data = tmp_path / "data"
    data.mkdir()
    cfg = config_from_dict({"base_model": str(flux_file), "train_data_dir": str(data), "output_dir": str(tmp_path)})
    assert is_flux_config(cfg)


def test_tiny_cli_writes_a_flux_folder_and_a_single_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lora_core.tiny", "--family", "flux", "--flux-variant", "schnell",
                          "--single-file", "--out", str(tmp_path / "f.safetensors")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert flux_facts(tmp_path / "f.safetensors")["variant"] == "schnell"


# ---- refusals by field, before anything loads -----------------------------------------------------------------
def _cfg(base: Path, tmp_path: Path, **extra):
    from lora_core.tiny import make_tiny_dataset

    data = tmp_path / "data"
    if not data.is_dir():
        make_tiny_dataset(data, n=2)
    return config_from_dict({"base_model": str(base), "train_data_dir": str(data), "output_dir": str(tmp_path / "o"),
                             **extra})


def test_a_transformer_only_file_without_encoders_configured_is_refused_by_field(flux_parts, tmp_path):
    problems = preflight(_cfg(flux_parts, tmp_path))
    assert any(p.startswith("model.t5_path:") and "T5-XXL" in p for p in problems)
    assert any(p.startswith("model.clip_path:") for p in problems)
    assert any(p.startswith("model.vae_path:") for p in problems)
    p = flux_parts.parent
    assert preflight(_cfg(flux_parts, tmp_path, t5_path=str(p / "t5xxl.safetensors"),
                          clip_path=str(p / "clip_l.safetensors"), vae_path=str(p / "ae.safetensors"))) == []


def test_a_schnell_model_with_a_guidance_setting_is_refused(tmp_path):
    schnell = build_tiny_flux(tmp_path / "s", single_file=True, variant="schnell")
    problems = preflight(_cfg(schnell, tmp_path, guidance_scale=3.5))
    assert len(problems) == 1 and problems[0].startswith("training.guidance_scale:") and "schnell" in problems[0]
    assert preflight(_cfg(schnell, tmp_path)) == []


def test_a_t5_path_that_does_not_exist_is_refused_by_the_schema(flux_parts, tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(flux_parts, tmp_path, t5_path=str(tmp_path / "missing" / "t5xxl_fp16.safetensors"))
    assert any(p.startswith("model.t5_path: no such file") for p in e.value.problems)


def _without_tiny_mark(src: Path, dest: Path) -> Path:
    """The same weights without the tiny models' header note: what a real download looks like to the loader."""
    save_file(load_file(str(src)), str(dest), metadata={"format": "pt"})
    return dest


def test_no_t5_tokenizer_is_refused_naming_both_places_and_forges_is_found(flux_file, tmp_path):
    forge = tmp_path / "forge"
    model = _without_tiny_mark(flux_file, (forge / "models" / "Stable-diffusion").mkdir(parents=True) or
                               forge / "models" / "Stable-diffusion" / "flux1-dev.safetensors")
    problems = preflight(_cfg(model, tmp_path))
    assert len(problems) == 1 and problems[0].startswith("model.t5_tokenizer:")
    assert "model.t5_tokenizer" in problems[0] and "FLUX.1-dev/tokenizer_2" in problems[0]
    with pytest.raises(Exception, match="model.t5_tokenizer"):
        load_flux_model(model)
    tok_dir = forge / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev" / "tokenizer_2"
    build_t5_tokenizer().save_pretrained(tok_dir)
    assert find_t5_tokenizer(model) == tok_dir
    assert preflight(_cfg(model, tmp_path)) == []
    loaded = load_flux_model(model)
    assert loaded.tokenizer_2("a red circle").input_ids == build_t5_tokenizer()("a red circle").input_ids
    own = tmp_path / "tok"
    shutil.copytree(tok_dir, own)
    shutil.rmtree(forge / "backend")
    assert preflight(_cfg(model, tmp_path, t5_tokenizer=str(own))) == []


def test_model_family_flux_with_an_sd_checkpoint_is_refused(tiny_sd_file, tmp_path):
    problems = preflight(_cfg(tiny_sd_file, tmp_path, model_family="flux"))
    assert problems and problems[0].startswith("model.model_family:")


def test_flux_only_settings_are_checked_by_the_schema(flux_file, tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(flux_file, tmp_path, model_family="flux", flux_train_blocks="doubles", train_text_encoder=True,
             timestep_sampling="lognorm")
    text = "\n".join(e.value.problems)
    assert "model.flux_train_blocks:" in text and "model.train_text_encoder:" in text
    assert "training.timestep_sampling:" in text
