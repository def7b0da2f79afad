"""Every adapter type (LoRA, LoCon, LoHa, LoKr, DoRA) trains on the tiny SD1 and SDXL models, and the file it exports,
applied with the loaders' own maths (`loader_maths`, from A1111's and ComfyUI's loaders), reproduces the trained UNet
(max abs diff < 1e-4 in fp32), and ``<lora:name:0.5>`` gives half of every layer's change.

A1111 patches the WebUI's own checkpoint weights, so for SDXL the file is applied to the SGM-named single file and
that file is loaded back — the key names are proven by the same step as the tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_core.checkpoint import latest_checkpoint
from lora_core.image.adapters import LYCORIS_CHILD, AdapterSpec, add_network, load_adapter_state
from lora_core.image.sd_models import load_sd_model
from lora_core.train import run_training
from loader_maths import apply_file, file_modules, unet_output

TYPES = {
    "lora": dict(network_type="lora"),
    "locon": dict(network_type="locon", conv_rank=2, conv_alpha=1),
    "loha": dict(network_type="loha", conv_rank=2, conv_alpha=1),
    "lokr": dict(network_type="lokr", lokr_factor=2, conv_rank=0),  # w2 = w2_a @ w2_b: scale alpha / dim
    "lokr-full": dict(network_type="lokr"),  # two full matrices: the loaders use scale 1
    "dora": dict(network_type="dora"),
    "locon-dora": dict(network_type="locon", use_dora=True, conv_rank=2, conv_alpha=1),
}
FILE_PARTS = {"lora_down.weight", "lora_up.weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1",
              "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "dora_scale", "alpha"}


# ---- models -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> tuple[Path, Path]:
    from lora_core.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp("sdxl")
    return build_tiny_sd(root / "model", family="sdxl"), build_tiny_sd(root, single_file=True, family="sdxl")


def trained_unet(cfg, base: Path):
    """The UNet exactly as training left it: base model + the same adapter + the last checkpoint's tensors."""
    unet = load_sd_model(base).unet
    add_network(unet, AdapterSpec.from_model_config(cfg.model), cfg.model.unet_target_modules)
    ckpt = load_file(str(latest_checkpoint(cfg.output.output_dir) / "lora.safetensors"))
    load_adapter_state(unet, {k[len("unet."):]: v for k, v in ckpt.items() if k.startswith("unet.")})
    return unet.eval()


def lycoris_delta(layer: torch.nn.Module) -> torch.Tensor:
    """The weight change a LyCORIS module applies in its own forward pass: its forward hands ``op`` (F.linear /
    F.conv2d) the final ΔW, DoRA included, so one forward with ``op`` recording gives exactly what training used."""
    module = getattr(layer, LYCORIS_CHILD)
    seen, op = {}, module.op

    def record(x, weight, bias=None, **kwargs):
        seen["delta"] = weight.detach().float()
        return op(x, weight, bias, **kwargs)

    module.op = record
    try:
        with torch.no_grad():
            layer(torch.zeros(1, layer.in_features) if isinstance(layer, torch.nn.Linear)
                  else torch.zeros(1, layer.in_channels, 8, 8))
    finally:
        module.op = op
    return seen["delta"]


def effective_weights(unet) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight as training computed it (peft's delta; LyCORIS's own forward)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, LoraLayer):
            out[name] = layer.get_base_layer().weight.detach() + layer.get_delta_weight("default").detach()
        elif hasattr(layer, LYCORIS_CHILD) and not name.endswith(LYCORIS_CHILD):
            out[name] = layer.weight.detach() + lycoris_delta(layer)
    return out


def train(train_config, base: Path, kind: str, **extra):
    cfg = train_config(base_model=str(base), max_train_steps=3, learning_rate=2e-2, lora_rank=4, alpha=2,
                       batch_size=2, **TYPES[kind], **extra)
    result = run_training(cfg, show_progress=False)
    assert result.status == "finished", result.error
    return cfg, result.output


def check_metadata(path: Path, kind: str) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    spec = TYPES[kind]
    lycoris = spec["network_type"] in ("loha", "lokr", "dora") or spec.get("use_dora")
    assert meta["ss_network_module"] == ("lycoris.kohya" if lycoris else "networks.lora")
    if lycoris or spec.get("conv_rank"):
        args = json.loads(meta["ss_network_args"])
        if lycoris:  # LyCORIS calls LoRA-with-DoRA "locon"
            assert args["algo"] == {"loha": "loha", "lokr": "lokr"}.get(spec["network_type"], "locon")
        if spec.get("conv_rank"):
            assert args["conv_dim"] == "2" and args["conv_alpha"] == "1.0"
        if "dora" in kind:
            assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
    return meta


def check_parts(tensors: dict[str, torch.Tensor], kind: str) -> None:
    parts = {k.split(".", 1)[1] for k in tensors}
    assert parts <= FILE_PARTS, parts - FILE_PARTS
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in tensors)
    expect = {"lora": {"lora_down.weight"}, "locon": {"lora_down.weight"}, "loha": {"hada_w1_a", "hada_w2_b"},
              "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, "lokr-full": {"lokr_w1", "lokr_w2"},
              "dora": {"dora_scale", "lora_up.weight"}, "locon-dora": {"dora_scale", "lora_down.weight"}}[kind]
    assert expect <= parts, (kind, parts)
    if "dora" in kind:  # per input column, as A1111 reads it
        for key, value in tensors.items():
            if key.endswith(".dora_scale"):
                assert value.shape[0] == 1, (key, value.shape)
    if TYPES[kind].get("conv_rank"):
        # diffusers (SD1) or SGM (SDXL) names of resnet convs, downsampler and upsampler convs
        ends = ("_conv1", "_conv2", "_conv", "_in_layers_2", "_out_layers_3", "_op")
        conv = [k for k in tensors if k.split(".")[0].endswith(ends)]
        assert conv, "no 3x3 convolution was adapted"


# ---- the tests ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(TYPES))
def test_sd1_file_applied_with_the_loaders_maths_reproduces_the_trained_unet(kind, train_config, tiny_sd):
    cfg, path = train(train_config, tiny_sd, kind)
    tensors = load_file(str(path))
    check_parts(tensors, kind)
    check_metadata(path, kind)

    trained = trained_unet(cfg, tiny_sd)
    base_unet = load_sd_model(tiny_sd).unet.eval()
    weights = base_unet.state_dict()
    key_of = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in weights if k.endswith(".weight")}

    # layer by layer: the loaders rebuild the weight the training implementation computes
    effective = effective_weights(trained)
    full = apply_file(weights, key_of, tensors, 1.0)
    assert len(effective) == len(file_modules(tensors))
    for name, w in effective.items():
        assert (full[name + ".weight"] - w).abs().max() < 1e-5, name

    out_base = unet_output(base_unet, False)
    out_trained = unet_output(trained, False)
    assert (out_trained - out_base).abs().max() > 1e-3, "the adapter changed nothing; the test would prove nothing"
    loaded = load_sd_model(tiny_sd).unet.eval()
    loaded.load_state_dict(full)
    assert (unet_output(loaded, False) - out_trained).abs().max() < 1e-4

    # <lora:name:0.5>: half of every layer's change, DoRA's included (the multiplier scales the final change)
    half = apply_file(weights, key_of, tensors, 0.5)
    reference = dict(weights)
    for name, w in effective.items():
        reference[name + ".weight"] = weights[name + ".weight"] + 0.5 * (w - weights[name + ".weight"])
    loaded.load_state_dict(half)
    out_half = unet_output(loaded, False)
    loaded.load_state_dict(reference)
    assert (out_half - unet_output(loaded, False)).abs().max() < 1e-4
    assert (out_half - out_base).abs().max() > 1e-4 and (out_half - out_trained).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["locon", "loha", "lokr", "dora"])
def test_sdxl_file_applied_to_the_webui_checkpoint_reproduces_the_trained_unet(kind, train_config, sdxl_model,
                                                                               tmp_path):
    folder, single = sdxl_model
    cfg, path = train(train_config, folder, kind)
    tensors = load_file(str(path))
    check_parts(tensors, kind)
    assert not any(s in k for k in tensors for s in ("down_blocks", "up_blocks", "mid_block"))
    assert any("input_blocks" in k for k in tensors) and any("output_blocks" in k for k in tensors)
    trained = trained_unet(cfg, folder)
    out_trained = unet_output(trained, True)
    out_base = unet_output(load_sd_model(folder).unet.eval(), True)
    assert (out_trained - out_base).abs().max() > 1e-3

    checkpoint = load_file(str(single))
    prefix = "model.diffusion_model."
    key_of = {"lora_unet_" + k[len(prefix): -len(".weight")].replace(".", "_"): k for k in checkpoint
              if k.startswith(prefix) and k.endswith(".weight")}
    outputs = {}
    for multiplier in (1.0, 0.5):
        patched = apply_file(checkpoint, key_of, tensors, multiplier)
        patched_path = tmp_path / f"patched-{multiplier}.safetensors"
        save_file({k: v.contiguous() for k, v in patched.items()}, str(patched_path))
        outputs[multiplier] = unet_output(load_sd_model(patched_path).unet.eval(), True)
    assert (outputs[1.0] - out_trained).abs().max() < 1e-4
    assert (outputs[0.5] - out_base).abs().max() > 1e-4 and (outputs[0.5] - out_trained).abs().max() > 1e-4


def test_text_encoder_adapters_export_under_the_text_encoder_prefix(train_config, tiny_sd):
    from transformers import CLIPTextModel

    cfg, path = train(train_config, tiny_sd, "loha", train_text_encoder=True, text_encoder_lr=1e-2)
    tensors = load_file(str(path))
    te_keys = [k for k in tensors if k.startswith("lora_te_")]
    assert te_keys and all("text_model_encoder_layers" in k for k in te_keys)
    base = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder", local_files_only=True)
    weights = base.state_dict()
    # A1111's SD1 text encoder is transformers-4 CLIP: its layers live under text_model. (newer transformers drop it)
    key_of = {"lora_te_" + ("" if k.startswith("text_model.") else "text_model_")
              + k[: -len(".weight")].replace(".", "_"): k for k in weights if k.endswith(".weight")}
    patched = apply_file(weights, key_of, tensors, 1.0, prefix="lora_te_")
    trained = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder", local_files_only=True)
    add_network(trained, AdapterSpec.from_model_config(cfg.model), cfg.model.text_encoder_target_modules,
                conv=False)
    ckpt = load_file(str(latest_checkpoint(cfg.output.output_dir) / "lora.safetensors"))
    load_adapter_state(trained, {k[len("text_encoder."):]: v for k, v in ckpt.items()
                                 if k.startswith("text_encoder.")})
    ids = torch.tensor([[49406, 320, 1746, 49407] + [0] * 73])
    loaded = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder", local_files_only=True)
    loaded.load_state_dict(patched)
    with torch.no_grad():
        got, want, before = (m.eval()(ids).last_hidden_state for m in (loaded, trained, base))
    assert (want - before).abs().max() > 1e-4
    assert (got - want).abs().max() < 1e-4



@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_text_adapter_types_export_as_peft_folders_that_answer_like_the_trained_model(kind, tmp_path):
    """Text LoRAs are read by peft (``PeftModel.from_pretrained``), so peft's own DoRA/LoHa/LoKr train them."""
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_core.text.task import TextTask
    from lora_core.text.tiny import build_tiny_llama
    from text_fixtures import text_config

    base = build_tiny_llama(tmp_path / "llama")
    cfg = text_config(tmp_path, base, network_type=kind, max_train_steps=3, lora_rank=4, alpha=8,
                      **({"lokr_factor": 4} if kind == "lokr" else {}))
    result = run_training(cfg, show_progress=False)
    assert result.status == "finished", result.error
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["peft_type"] == {"dora": "LORA", "loha": "LOHA", "lokr": "LOKR"}[kind]
    assert config.get("use_dora", False) == (kind == "dora")

    task = TextTask(cfg)
    task.setup(Accelerator(cpu=True))
    before = task.model(input_ids=torch.arange(5, 45).reshape(2, 20)).logits.detach()
    task.load_lora_state_dict(load_file(str(latest_checkpoint(cfg.output.output_dir) / "lora.safetensors")))
    ids = torch.arange(5, 45).reshape(2, 20)
    task.model.eval()
    with torch.no_grad():
        trained = task.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True), str(result.output)).eval()
        got = loaded(input_ids=ids).logits
    assert (trained - before).abs().max() > 1e-4, "training changed nothing; the test would prove nothing"
    assert (got - trained).abs().max() < 1e-4


def test_a_diffusers_folder_is_refused_for_lycoris_types_by_field(train_config):
    from lora_core.config import ConfigError

    with pytest.raises(ConfigError, match="model.network_type: output.format diffusers holds plain LoRA only"):
        train_config(network_type="lokr", format="diffusers")
    with pytest.raises(ConfigError, match="model.network_type: locon adds convolution layers"):
        train_config(network_type="locon", task_type="text-generation", train_data_file=__file__)
