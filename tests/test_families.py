"""SD 2.x (512 epsilon, 768 v-prediction) and SDXL: tiny models of each family load from diffusers folders and WebUI
single files alike, train, and export LoRA files that diffusers applies exactly as they were trained."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core.image.sd_models import load_sd_model
from lora_core.train import run_training

SDXL_KEY = re.compile(r"^lora_(unet|te1|te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
SD_KEY = re.compile(r"^lora_(unet|te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
FAMILIES = {"sd2": ("sd2", "epsilon"), "sd2-v": ("sd2", "v_prediction"), "sdxl": ("sdxl", "epsilon")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(name, diffusers folder, single file) of one tiny family, built from the same seed."""
    from lora_core.tiny import build_tiny_sd

    family, prediction = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = build_tiny_sd(root / "model", family=family, prediction_type=prediction)
    single = build_tiny_sd(root, single_file=True, family=family, prediction_type=prediction)
    return request.param, folder, single


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_single_file_loads_the_same_weights_as_the_diffusers_folder(family_model):
    name, folder, single = family_model
    a, b = load_sd_model(folder), load_sd_model(single)
    assert (a.family, a.prediction_type) == (b.family, b.prediction_type) == FAMILIES[name]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, part) is None:
            assert getattr(b, part) is None and name != "sdxl"
            continue
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert set(sa) == set(sb), f"{part}: {sorted(set(sa) ^ set(sb))[:4]}"
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert a.tokenizer.pad_token == b.tokenizer.pad_token == ("!" if name.startswith("sd2") else "<|endoftext|>")
    if name == "sdxl":
        assert a.tokenizer_2.pad_token == b.tokenizer_2.pad_token == "!"
        assert a.unet.config.addition_embed_type == b.unet.config.addition_embed_type == "text_time"


def test_single_file_keeps_the_webui_text_encoder_layout(family_model):
    name, folder, single = family_model
    keys = set(load_file(str(single)))
    if name == "sdxl":
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys
        return
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "cond_stage_model.model.positional_embedding" in keys
    # the diffusers encoder has 2 layers; SD2 files hold one more (SD2 conditions on the penultimate layer)
    assert "cond_stage_model.model.transformer.resblocks.2.mlp.c_proj.bias" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_v_prediction_comes_from_the_scheduler_the_file_name_or_a_sidecar_yaml_and_the_config_wins(tmp_path):
    from lora_core.tiny import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "folder", family="sd2", prediction_type="v_prediction")
    named = build_tiny_sd(tmp_path, single_file=True, family="sd2", prediction_type="v_prediction")
    assert named.name == "tiny-sd2-768-v.safetensors"
    assert load_sd_model(folder).prediction_type == "v_prediction"
    assert load_sd_model(named).prediction_type == "v_prediction"
    plain = shutil.copy(named, tmp_path / "my-sd2-model.safetensors")
    assert load_sd_model(plain).prediction_type == "epsilon", "same keys, no hint: epsilon"
    Path(plain).with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    model = load_sd_model(plain)
    assert model.prediction_type == model.noise_scheduler.config.prediction_type == "v_prediction"
    forced = load_sd_model(named, prediction_type="epsilon")
    assert forced.prediction_type == forced.noise_scheduler.config.prediction_type == "epsilon"


def _task(cfg):
    from lora_core.image.task import ImageTask
    from lora_core.loop import make_accelerator

    task = ImageTask(cfg)
    task.setup(make_accelerator(cfg))
    return task


def test_v_prediction_model_trains_on_the_velocity(train_config, tmp_path):
    from lora_core.tiny import build_tiny_sd

    model = build_tiny_sd(tmp_path / "model", single_file=True, family="sd2", prediction_type="v_prediction")
    task = _task(train_config(base_model=str(model)))
    assert task.model.prediction_type == "v_prediction"
    batch = task.collate([0, 1], epoch=0)
    with torch.no_grad():
        loss = task.loss(batch, torch.Generator().manual_seed(7)).item()
        # the same draws, by hand: noise, then timesteps, from the same generator
        latents, sched = batch["latents"], task.model.noise_scheduler
        gen = torch.Generator().manual_seed(7)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        pred = task.unet(sched.add_noise(latents, noise, t), t, batch["text"]).sample
    velocity = sched.get_velocity(latents, noise, t)
    assert loss == pytest.approx(torch.nn.functional.mse_loss(pred, velocity).item(), rel=1e-5)
    assert loss != pytest.approx(torch.nn.functional.mse_loss(pred, noise).item(), rel=1e-3)


def test_sdxl_batches_carry_the_original_size_and_crop_offset_as_time_ids(train_config, tmp_path):
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    model = build_tiny_sd(tmp_path / "model", family="sdxl")
    data = make_tiny_dataset(tmp_path / "wide", n=2, sizes=[(96, 64)])
    task = _task(train_config(base_model=str(model), train_data_dir=str(data)))
    batch = task.collate([0, 1], epoch=0)
    # 96×64 covers 64×64 unscaled; the centre crop starts 16 px from the left
    assert batch["time_ids"].tolist() == [[64, 96, 0, 16, 64, 64]] * 2
    assert batch["text"].shape == (2, 77, 32 + 64) and batch["pooled"].shape == (2, 32)


def _unet_outputs(pipe, sdxl: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if sdxl:
        pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=gen)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 96, 0, 16, 64, 64]])}
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), text, **kwargs).sample


def _text_outputs(encoder):
    ids = torch.tensor([[49406, 320, 1746, 49407] + [0] * 73])
    with torch.no_grad():
        return encoder(ids, output_hidden_states=True).hidden_states[-2]


def test_trained_file_loads_in_diffusers_and_matches_the_peft_trained_model(family_model, train_config, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lora_core.checkpoint import latest_checkpoint
    from lora_core.image.lora import add_lora, load_lora_state

    name, folder, _ = family_model
    sdxl = name == "sdxl"
    cfg = train_config(base_model=str(folder), max_train_steps=4, learning_rate=2e-2, save_steps=4, alpha=2,
                       train_text_encoder=True, text_encoder_lr=1e-2)
    result = run_training(cfg, show_progress=False)
    state = load_file(str(result.output))
    meta = metadata(result.output)
    if sdxl:
        assert state and all(SDXL_KEY.match(k) for k in state), [k for k in state if not SDXL_KEY.match(k)][:5]
        for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                    "lora_unet_output_blocks_0_1_transformer_blocks_1_attn1_to_out_0",
                    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"):
            assert key + ".lora_down.weight" in state, key
        assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in state)
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    else:
        v = name == "sd2-v"
        assert state and all(SD_KEY.match(k) for k in state)
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
        assert meta["ss_base_model_version"] == ("sd_v2_v" if v else "sd_v2") and meta["ss_v2"] == "True"
        assert meta["modelspec.architecture"] == ("stable-diffusion-v2-768-v/lora" if v
                                                  else "stable-diffusion-v2-512/lora")
        assert meta["modelspec.prediction_type"] == ("v" if v else "epsilon")

    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    ckpt = load_file(str(latest_checkpoint(cfg.output.output_dir) / "lora.safetensors"))
    trained = pipeline.from_pretrained(folder, local_files_only=True)
    for part, targets in [("unet", cfg.model.unet_target_modules)] + \
            [(e, cfg.model.text_encoder_target_modules) for e in encoders]:
        add_lora(getattr(trained, part), targets, 4, 2.0, 0.0)
        load_lora_state(getattr(trained, part), {k[len(part) + 1:]: v for k, v in ckpt.items()
                                                 if k.startswith(part + ".")})
        getattr(trained, part).eval()
    base = pipeline.from_pretrained(folder, local_files_only=True)
    loaded = pipeline.from_pretrained(folder, local_files_only=True)
    loaded.load_lora_weights(str(result.output))

    out_base, out_trained, out_loaded = (_unet_outputs(p, sdxl) for p in (base, trained, loaded))
    assert (out_trained - out_base).abs().max() > 1e-3, "the LoRA changed nothing; the test would prove nothing"
    assert (out_loaded - out_trained).abs().max() < 1e-4
    for encoder in encoders:
        te_base, te_trained, te_loaded = (_text_outputs(getattr(p, encoder)) for p in (base, trained, loaded))
        assert (te_trained - te_base).abs().max() > 1e-4, f"{encoder}: its LoRA changed nothing"
        assert (te_loaded - te_trained).abs().max() < 1e-4, f"{encoder}: diffusers did not apply its keys"


def test_samples_render_through_the_family_pipeline_with_the_current_lora(family_model, train_config, tmp_path):
    from lora_core.events import EventWriter, read_events

    _, folder, _ = family_model
    events = tmp_path / "events.jsonl"
    cfg = train_config(base_model=str(folder), max_train_steps=2, sample_every_n_steps=2,
                       sample_prompts=["a red circle --w 64 --h 64 --s 2 --d 1"])
    assert run_training(cfg, EventWriter(events), show_progress=False).status == "finished"
    samples = [e for e in read_events(events) if e["type"] == "sample"]
    assert len(samples) == 1 and samples[0]["prompt"] == "a red circle"
    with Image.open(samples[0]["path"]) as im:
        assert im.size == (64, 64)
