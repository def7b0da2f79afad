"""Continue from an existing LoRA (``model.network_weights``): ours of any type, or a foreign sd-scripts file.

What continuing restores is every adapter tensor, the type, rank and alpha; what it does not is the optimizer state
(and the LR schedule, step counter and data position). So "N steps, export, continue K" is compared with "N + K in
one go" whose optimizer state is dropped at step N, on the same batches and noise: they must agree exactly.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_core.errors import InputError
from lora_core.image.sd_models import load_sd_model
from lora_core.image.task import ImageTask
from lora_core.loop import make_accelerator, make_optimizer
from lora_core.train import run_training
from loader_maths import apply_file, unet_output

BATCHES = [[0, 1], [2, 3], [1, 2], [3, 0]]


def ready(cfg) -> ImageTask:
    task = ImageTask(cfg)
    task.setup(make_accelerator(cfg))
    return task


def steps(task: ImageTask, optimizer, batches, generator: torch.Generator) -> None:
    """Plain optimizer steps on fixed batches (what the loop does, without its schedule and checkpoints)."""
    for indices in batches:
        loss = task.loss(task.collate(indices, epoch=0), generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["lora", "loha", "dora"])
def test_n_steps_exported_then_continued_k_equals_n_plus_k_up_to_optimizer_state(kind, train_config, tmp_path):
    cfg = train_config(network_type=kind, lora_rank=4, alpha=2, learning_rate=1e-2)
    one_go = ready(cfg)
    optimizer = make_optimizer(cfg, one_go.param_groups(cfg.training.learning_rate))
    generator = torch.Generator().manual_seed(5)
    steps(one_go, optimizer, BATCHES[:2], generator)
    noise_at_n = generator.get_state()
    file = one_go.export(tmp_path / "after-n", step=2, epoch=1)  # save_precision float: nothing rounded

    optimizer.state.clear()  # the one thing a LoRA file does not carry
    steps(one_go, optimizer, BATCHES[2:], generator)
    expected = one_go.lora_state_dict()

    # continuing: the config says plain LoRA of another rank; dim_from_weights takes type, rank and alpha from the file
    cont_cfg = train_config(network_weights=str(file), dim_from_weights=True, lora_rank=16,
                            output_dir=str(tmp_path / "cont"))
    continued = ready(cont_cfg)
    assert (continued.spec.network_type, continued.spec.rank, continued.spec.alpha) == (kind, 4, 2.0)
    optimizer = make_optimizer(cont_cfg, continued.param_groups(cfg.training.learning_rate))
    steps(continued, optimizer, BATCHES[2:], torch.Generator().set_state(noise_at_n))
    got = continued.lora_state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), "continuing must give the N+K weights"


def foreign_sd_scripts_file(base, path, rank: int = 4, alpha: float = 1.0):
    """A LoRA named as kohya sd-scripts names one: every Linear (and 1x1 conv) of the transformer blocks, ff and
    projections included, ``lora_unet_<diffusers path with _>``, rank-4 random factors, its usual metadata."""
    unet = load_sd_model(base).unet
    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for name, layer in unet.named_modules():
        if ".attentions." not in f".{name}." or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        out_f, in_f = layer.weight.shape[:2]
        conv = (1, 1) if layer.weight.dim() == 4 else ()
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, *conv, generator=gen) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, *conv, generator=gen) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                            "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"})
    return tensors


def test_a_foreign_sd_scripts_file_loads_exactly_and_trains_on(train_config, tiny_sd, tmp_path):
    foreign = tmp_path / "someone_elses.safetensors"
    tensors = foreign_sd_scripts_file(tiny_sd, foreign)
    assert any("_ff_net_0_proj" in k for k in tensors) and any("_proj_in" in k for k in tensors)
    cfg = train_config(network_weights=str(foreign), dim_from_weights=True, max_train_steps=2)
    task = ready(cfg)
    base = load_sd_model(tiny_sd).unet.eval()
    weights = base.state_dict()
    key_of = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in weights if k.endswith(".weight")}
    loaded = load_sd_model(tiny_sd).unet.eval()
    loaded.load_state_dict(apply_file(weights, key_of, tensors, 1.0))
    task.unet.eval()
    start = unet_output(task.unet, False)
    assert (start - unet_output(base, False)).abs().max() > 1e-3
    assert (start - unet_output(loaded, False)).abs().max() < 1e-4, "the continued run starts from the file"

    result = run_training(cfg, show_progress=False)
    assert result.status == "finished", result.error
    out = load_file(str(result.output))
    assert out.keys() == tensors.keys(), "the continued file adapts exactly the foreign file's layers"
    assert any(not torch.equal(out[k], tensors[k]) for k in out if k.endswith("up.weight"))
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "1.0")


def test_files_of_another_family_or_type_are_refused_by_name(train_config, tiny_sd, tmp_path):
    sdxl = tmp_path / "an_sdxl_lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 4),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0)}, str(sdxl))
    with pytest.raises(InputError, match=r"model.network_weights: an_sdxl_lora.safetensors is an SDXL LoRA .* "
                                         r"the base model is sd1"):
        ready(train_config(network_weights=str(sdxl), dim_from_weights=True))

    unet = load_sd_model(tiny_sd).unet
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    out_f, in_f = unet.get_submodule(layer).weight.shape
    key = "lora_unet_" + layer.replace(".", "_")
    loha = tmp_path / "a_loha.safetensors"
    save_file({f"{key}.hada_w1_a": torch.zeros(out_f, 4), f"{key}.hada_w1_b": torch.zeros(4, in_f),
               f"{key}.hada_w2_a": torch.zeros(out_f, 4), f"{key}.hada_w2_b": torch.zeros(4, in_f),
               f"{key}.alpha": torch.tensor(4.0)}, str(loha),
              metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"})})
    with pytest.raises(InputError, match=r"model.network_type: lora, but model.network_weights a_loha.safetensors "
                                         r"is a LoHa; set model.network_type: loha"):
        ready(train_config(network_weights=str(loha)))
    with pytest.raises(InputError, match=r"model.lora_rank: 8, but a_loha.safetensors has rank 4"):
        ready(train_config(network_weights=str(loha), network_type="loha", lora_rank=8, alpha=4))
    with pytest.raises(InputError, match="model.network_weights: no such file"):
        train_config(network_weights=str(tmp_path / "missing.safetensors"))


def test_a_diffusers_peft_folder_continues_with_its_alpha(train_config, tiny_sd, tmp_path):
    """``format: diffusers`` folders (and peft files) hold lora_A/lora_B under the component's name, alpha in the
    adapter metadata: the continued UNet is W + alpha/r · B A on exactly those layers."""
    from lora_core.image.export import save_diffusers_lora

    unet = load_sd_model(tiny_sd).unet.eval()
    gen = torch.Generator().manual_seed(3)
    state = {}
    for name, layer in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            state[f"{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=gen) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=gen) * 0.1
    folder = save_diffusers_lora(tmp_path / "peft", state, [], rank=4, alpha=2.0, precision="float")
    task = ready(train_config(network_weights=str(folder), dim_from_weights=True))
    assert (task.spec.rank, task.spec.alpha, task.spec.network_type) == (4, 2.0, "lora")
    weights = unet.state_dict()
    for key in [k for k in state if k.endswith("lora_A.weight")]:
        path = key[: -len(".lora_A.weight")]
        weights[path + ".weight"] = weights[path + ".weight"] + 0.5 * state[path + ".lora_B.weight"] @ state[key]
    expected = load_sd_model(tiny_sd).unet.eval()
    expected.load_state_dict(weights)
    task.unet.eval()
    assert (unet_output(task.unet, False) - unet_output(expected, False)).abs().max() < 1e-4
