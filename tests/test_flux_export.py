"""FLUX.1 LoRA files, proven against their consumers: a tiny diffusers FLUX transformer gets a peft LoRA on its
layers, the file is written, and the file is applied the way each loader applies it.

* default (kohya) format: by ComfyUI's FLUX key map and by sd-scripts' FLUX loader (`loader_maths`), on the
  BFL-format weights; converted to diffusers and run, the transformer gives what the peft model gives;
* ``format: diffusers``: through diffusers' own FluxPipeline loader, and by ComfyUI's map for diffusers-named FLUX
  LoRAs (row ranges of the fused BFL layers).
"""
from __future__ import annotations

import json
import struct

import pytest
import torch

from loader_maths import (apply_file, bfl_flux_linears, comfy_flux_diffusers_key_map, comfy_flux_key_map,
                          file_modules, flux_inputs, flux_output, loader_delta, sd_scripts_flux_key_map)

from lora_core.image.adapters import export_modules
from lora_core.image.export import training_metadata
from lora_core.image.flux_export import FluxExportError, flux_metadata, fuse_pieces, kohya_flux_tensors, write_flux_lora
from lora_core.image.flux_keys import FluxDims, bfl_to_diffusers, diffusers_to_bfl, rope_axes
from lora_core.image.lora import add_lora

RANK, ALPHA = 4, 2.0
HEAD, HEADS = 8, 2
# every Linear a FLUX LoRA may sit on, by its diffusers name ending: attention, MLP, modulation, embedders, final layer
ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
               "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out", "x_embedder", "context_embedder",
               "timestep_embedder.linear_1", "timestep_embedder.linear_2", "guidance_embedder.linear_1",
               "guidance_embedder.linear_2", "text_embedder.linear_1", "text_embedder.linear_2", "norm_out.linear"]
# what sd-scripts' FLUX LoRA holds: the double/single blocks' layers (not the final layer, not the embedders)
BLOCK_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                 "norm1_context.linear", "norm.linear", "proj_mlp", "single_transformer_blocks.0.proj_out",
                 "single_transformer_blocks.1.proj_out"]


# what the FLUX task hands `write_flux_lora` besides the tensors (`export.training_metadata`'s arguments)
METADATA = dict(output_name="x", base_model_version="flux1", prediction_type="flow", rank=RANK, alpha=ALPHA,
                dropout=0.0, learning_rate=1e-4, text_encoder_lr=None, resolution=512, num_train_images=3,
                tag_frequency={}, dataset_dirs={}, started_at=0.0, steps=1, epoch=1, max_train_steps=1,
                base_model_path="/m/flux1-dev.safetensors", batch_size=1, gradient_accumulation_steps=1,
                mixed_precision="bf16", optimizer="adamw", lr_scheduler="constant", seed=0, noise_offset=0.0,
                min_snr_gamma=None, clip_skip=1, bucket_info=None, cache_latents=True, gradient_checkpointing=True)


def tiny_transformer(guidance: bool = True, seed: int = 0):
    """A FLUX-shaped diffusers transformer, two double and two single blocks, 16 wide, seeded."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                  attention_head_dim=HEAD, num_attention_heads=HEADS, joint_attention_dim=12,
                                  pooled_projection_dim=10, guidance_embeds=guidance,
                                  axes_dims_rope=rope_axes(HEAD)).eval()


def trained(targets: list[str], guidance: bool = True):
    """(base transformer, the same transformer with a LoRA whose up matrices are non-zero, as after training)."""
    base = tiny_transformer(guidance)
    model = tiny_transformer(guidance)
    add_lora(model, targets, RANK, ALPHA, 0.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return base, model


def bfl_weights(base) -> dict[str, torch.Tensor]:
    return diffusers_to_bfl(base.state_dict(), FluxDims.from_config(base.config))


def run_bfl(weights: dict[str, torch.Tensor], guidance: bool = True) -> torch.Tensor:
    """BFL-format weights → diffusers names → a fresh transformer's output."""
    model = tiny_transformer(guidance, seed=99)
    model.load_state_dict(bfl_to_diffusers(weights, FluxDims.from_config(model.config)))
    return flux_output(model)


def write(model, tmp_path, fmt: str = "kohya", precision: str = "float", **settings):
    """The file as the FLUX task writes it (fp32 by default, to compare at 1e-4)."""
    variant = "dev" if model.config.guidance_embeds else "schnell"
    return write_flux_lora(tmp_path / "flux_lora", export_modules(model), FluxDims.from_config(model.config),
                           variant, fmt, precision, {**METADATA, **settings})


def kohya_file(model, tmp_path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(write(model, tmp_path)))


def test_every_module_of_the_file_names_a_real_bfl_linear_and_qkv_is_one_module(tmp_path):
    base, model = trained(ALL_TARGETS)
    weights = bfl_weights(base)
    real = bfl_flux_linears(2, 2, guidance=True)
    assert sorted(k for k in weights if k.endswith(".weight") and weights[k].dim() == 2) == \
        sorted(f"{p}.weight" for p in real)  # the BFL state dict has exactly the Linear layers BFL's model builds
    modules = file_modules(kohya_file(model, tmp_path))
    comfy = comfy_flux_key_map(weights)
    assert set(modules) <= set(comfy), sorted(set(modules) - set(comfy))
    assert set(modules) == {"lora_unet_" + p.replace(".", "_") for p in real}  # every Linear got its LoRA
    qkv = modules["lora_unet_double_blocks_0_img_attn_qkv"]
    inner = HEAD * HEADS
    assert qkv["lora_down.weight"].shape == (3 * RANK, inner) and qkv["lora_up.weight"].shape == (3 * inner, 3 * RANK)
    assert float(qkv["alpha"]) == pytest.approx(3 * ALPHA)
    linear1 = modules["lora_unet_single_blocks_1_linear1"]
    assert linear1["lora_up.weight"].shape == (3 * inner + 4 * inner, 4 * RANK)
    assert float(linear1["alpha"]) == pytest.approx(4 * ALPHA)


def default_targets_of(transformer) -> list[str]:
    """The layers a FLUX run adapts by default: ``model.flux_target_modules`` in every block, as the task picks them."""
    from lora_core.config import FLUX_TARGETS
    from lora_core.image.flux_keys import block_prefixes
    from lora_core.image.flux_task import lora_targets

    c = transformer.config
    return lora_targets(transformer, FLUX_TARGETS, block_prefixes(range(c.num_layers), range(c.num_single_layers)),
                        "all")


@pytest.mark.parametrize("loader,targets", [("comfyui", "every linear"), ("sd-scripts", "every block linear"),
                                            ("sd-scripts", "the default targets")])
def test_kohya_file_applied_to_the_bfl_weights_gives_the_trained_model_output(tmp_path, loader, targets):
    """sd-scripts loads block layers (and the input embedders) only: a key it cannot place fails `apply_file`."""
    names = {"every linear": ALL_TARGETS, "every block linear": BLOCK_TARGETS}.get(targets) or \
        default_targets_of(tiny_transformer())
    base, model = trained(names)
    expected = flux_output(model)
    weights = bfl_weights(base)
    key_of = comfy_flux_key_map(weights) if loader == "comfyui" else \
        sd_scripts_flux_key_map(bfl_flux_linears(2, 2, guidance=True))
    got = run_bfl(apply_file(weights, key_of, kohya_file(model, tmp_path), 1.0))
    assert (expected - flux_output(base)).abs().max() > 1e-2  # the LoRA changes the output: the test can fail
    assert (got - expected).abs().max() < 1e-4


def test_a_schnell_file_has_no_guidance_layers_and_matches_too(tmp_path):
    targets = [t for t in ALL_TARGETS if not t.startswith("guidance_embedder")]
    base, model = trained(targets, guidance=False)
    weights = bfl_weights(base)
    got = run_bfl(apply_file(weights, comfy_flux_key_map(weights), kohya_file(model, tmp_path), 1.0), guidance=False)
    assert (got - flux_output(model)).abs().max() < 1e-4


def test_fused_pieces_of_different_ranks_and_alphas_keep_each_scale():
    """Rank concatenation with the block-diagonal up matrix, as sd-scripts' and ComfyUI's maths apply it (alpha
    over the fused rank), equals each piece's own B·A·alpha/rank stacked; an untrained piece stays zero."""
    gen = torch.Generator().manual_seed(0)
    inn, out = 6, 5
    pieces = []
    for start, rank, alpha in ((0, 2, 1.0), (out, 3, 6.0)):  # q and k trained, v (rows 10..15) not
        pieces.append((slice(start, start + out), {"lora_A.weight": torch.randn(rank, inn, generator=gen),
                                                   "lora_B.weight": torch.randn(out, rank, generator=gen),
                                                   "alpha": torch.tensor(alpha)}))
    fused = fuse_pieces(pieces, 3 * out)
    delta = loader_delta(fused, torch.zeros(3 * out, inn))
    for rows, parts in pieces:
        own = parts["lora_B.weight"] @ parts["lora_A.weight"] * float(parts["alpha"]) / parts["lora_A.weight"].shape[0]
        assert torch.allclose(delta[rows], own, atol=1e-6)
    assert torch.count_nonzero(delta[2 * out:]) == 0


def test_diffusers_format_loaded_by_diffusers_and_by_comfyui_gives_the_trained_model_output(tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    base, model = trained(ALL_TARGETS)
    expected = flux_output(model)
    folder = write(model, tmp_path, "diffusers")
    file = folder / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(file))
    assert tensors and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                           for k in tensors)

    # diffusers: FluxPipeline.load_lora_weights does these two steps (state dict + metadata, then the transformer)
    state, alphas, metadata = FluxPipeline.lora_state_dict(str(folder), return_alphas=True, return_lora_metadata=True)
    loaded = tiny_transformer()
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=loaded, metadata=metadata)
    assert (flux_output(loaded) - expected).abs().max() < 1e-4

    # ComfyUI: transformer.<diffusers module> → a row range of the fused BFL weight, alpha absent → scale 1
    inner = HEAD * HEADS
    key_of = comfy_flux_diffusers_key_map(2, 2, inner, 4 * inner, guidance=True)
    weights = {k: v.clone() for k, v in bfl_weights(base).items()}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key[len("transformer."):-len(".lora_A.weight")]
        bfl, rows, swapped = key_of[module]
        delta = tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        if swapped:
            delta = torch.cat(delta.chunk(2, dim=0)[::-1], dim=0)
        if rows is None:
            weights[bfl] = weights[bfl] + delta
        else:
            weights[bfl][rows[0]:rows[0] + rows[1]] += delta
    assert (run_bfl(weights) - expected).abs().max() < 1e-4


def read_header(path) -> tuple[dict, dict]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    return header.pop("__metadata__"), header


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_the_file_says_flux_dev_or_schnell_as_sd_scripts_writes_it(tmp_path, variant):
    _, model = trained(["to_q", "to_k", "to_v"], guidance=variant == "dev")
    path = write(model, tmp_path, precision="fp16", guidance_scale=1.0 if variant == "dev" else None,
                 timestep_sampling="shift", discrete_flow_shift=3.1582, t5_max_length=512)
    meta, header = read_header(path)
    assert meta["modelspec.architecture"] == f"flux-1-{variant}/lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux" and "sshs_model_hash" in meta
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in meta and "ss_v2" not in meta and "ss_clip_skip" not in meta
    assert meta["ss_timestep_sampling"] == "shift" and meta["ss_discrete_flow_shift"] == "3.1582"
    assert meta["ss_t5xxl_max_token_length"] == "512"
    assert ("ss_guidance_scale" in meta) == (variant == "dev")
    assert {k.split(".")[0] for k in header} == {"lora_unet_double_blocks_0_img_attn_qkv",
                                                "lora_unet_double_blocks_1_img_attn_qkv",
                                                "lora_unet_single_blocks_0_linear1",
                                                "lora_unet_single_blocks_1_linear1"}
    assert all(v["dtype"] == "F16" for v in header.values())
    with pytest.raises(ValueError, match="variant"):
        flux_metadata("pro")


def test_family_metadata_overrides_and_removes_common_keys():
    meta = training_metadata(**METADATA, family_metadata={"ss_v2": None, "modelspec.title": "t"})
    assert "ss_v2" not in meta and meta["modelspec.title"] == "t"
    assert training_metadata(**METADATA)["modelspec.architecture"] == "flux-1/lora"


def test_layers_no_flux_file_can_hold_are_refused_by_name():
    dims = FluxDims(16, 64)
    lokr = {"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(8, 8), "alpha": torch.tensor(1.0)}
    with pytest.raises(FluxExportError, match=r"transformer_blocks\.0\.attn\.to_q: FLUX files hold plain LoRA"):
        kohya_flux_tensors({"transformer_blocks.0.attn.to_q": lokr}, dims)
    with pytest.raises(FluxExportError, match=r"transformer_blocks\.1\.ff\.net\.2: .*network_type lora"):
        kohya_flux_tensors({"transformer_blocks.1.ff.net.2": lokr}, dims)
    with pytest.raises(FluxExportError, match=r"down_blocks\.0\.attentions\.0\.proj_in: not a weight-holding"):
        kohya_flux_tensors({"down_blocks.0.attentions.0.proj_in": {}}, dims)


def test_the_lora_card_says_flux_for_a_flux_file_and_the_sd_version_for_others(tmp_path):
    from lora_daemon.publish import sidecar_text

    from lora_core.image.export import save_lora_file

    _, model = trained(["to_q", "to_k", "to_v"])
    card = json.loads(sidecar_text(write(model, tmp_path), "sks", 1.0, "/models/flux1-dev.safetensors"))
    assert card["sd version"] == "Flux" and card["description"] == "trained by lora-scripts on flux1-dev.safetensors"
    sd = save_lora_file(tmp_path / "sd.safetensors", {"lora_unet_x.alpha": torch.tensor(1.0)},
                        training_metadata(**{**METADATA, "base_model_version": "sd_v1"}), "fp16")
    assert json.loads(sidecar_text(sd, None, 1.0))["sd version"] == "SD1"
    not_safetensors = tmp_path / "folder_lora"
    not_safetensors.mkdir()
    assert "sd version" not in json.loads(sidecar_text(not_safetensors, None, 1.0))


def test_a_lora_trained_on_the_tiny_bfl_file_applied_to_that_files_own_weights_gives_the_trained_output(tmp_path):
    """End to end on a real BFL-format file (the tiny FLUX single file, Forge's layout): its transformer, read back
    to diffusers, trains a LoRA on the default targets for a few optimizer steps; the written file applied by
    ComfyUI's key map to the file's own ``model.diffusion_model.*`` weights gives the trained model's output."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from lora_core.image.flux_keys import TRANSFORMER_PREFIX, infer_config
    from lora_core.image.flux_tiny import build_tiny_flux

    path = build_tiny_flux(tmp_path / "models", single_file=True)
    bfl = {k[len(TRANSFORMER_PREFIX):]: v.float() for k, v in load_file(str(path)).items()
           if k.startswith(TRANSFORMER_PREFIX)}
    facts = infer_config(bfl)

    def from_file():
        model = FluxTransformer2DModel(**facts["config"]).eval()
        model.load_state_dict(bfl_to_diffusers(bfl, facts["dims"]))
        return model

    model = from_file()
    names = default_targets_of(model)
    add_lora(model, names, RANK, ALPHA, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    target = torch.randn(flux_output(model).shape, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(**flux_inputs(model.config), return_dict=False)[0], target)
        loss.backward()
        optimizer.step()
    expected = flux_output(model)
    assert (expected - flux_output(from_file())).abs().max() > 1e-3  # training moved the output

    tensors = load_file(str(write(model, tmp_path)))
    patched = apply_file(bfl, comfy_flux_key_map(bfl), tensors, 1.0)
    merged = FluxTransformer2DModel(**facts["config"]).eval()
    merged.load_state_dict(bfl_to_diffusers(patched, facts["dims"]))
    assert (flux_output(merged) - expected).abs().max() < 1e-4
    assert set(file_modules(tensors)) <= set(sd_scripts_flux_key_map(
        bfl_flux_linears(facts["config"]["num_layers"], facts["config"]["num_single_layers"], guidance=True)))


@pytest.mark.parametrize("network", [{"network_type": "loha"}, {"network_type": "lora", "use_dora": True}])
def test_an_adapter_no_flux_file_can_hold_is_refused_before_training(tmp_path, network):
    from lora_core.config import config_from_dict
    from lora_core.image.flux_tiny import build_tiny_flux
    from lora_core.preflight import preflight

    path = build_tiny_flux(tmp_path / "models", single_file=True)
    (tmp_path / "data").mkdir()
    cfg = config_from_dict({"base_model": str(path), "train_data_dir": str(tmp_path / "data"),
                            "output_dir": str(tmp_path / "out"), **network})
    problems = [p for p in preflight(cfg) if p.startswith("model.network_type")]
    assert problems and "FLUX LoRA files hold plain LoRA only" in problems[0] and "use lora" in problems[0]
