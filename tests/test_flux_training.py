"""FLUX.1 LoRA training on the tiny FLUX model: the loss falls, folder and BFL file train alike, resume is exact,
fp8 / gradient checkpointing / block offload compute the same thing, samples render, the memory plan counts FLUX."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_core.checkpoint import latest_checkpoint, load_checkpoint
from lora_core.config import config_from_dict
from lora_core.events import EventWriter, read_events
from lora_core.image.flux_tiny import build_tiny_flux
from lora_core.loop import StopFlag
from lora_core.train import run_training

from daemon_fixtures import daemon_factory, run_config, wait_until  # noqa: F401  (fixtures)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture
def flux_config(flux_dir, tiny_data, tmp_path):
    def make(**overrides):
        raw = {"train_data_dir": str(tiny_data), "base_model": str(flux_dir), "output_dir": str(tmp_path / "out"),
               "resolution": 64, "lora_rank": 4, "batch_size": 2, "max_train_steps": 6, "learning_rate": 1e-3,
               "save_precision": "float", "t5_max_length": 32}
        raw.update(overrides)
        return config_from_dict(raw)
    return make


def _lora(out_dir: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(out_dir)).lora


class StopAt(EventWriter):
    """Asks the loop to stop once a step is reported (a user pressing Cancel)."""

    def __init__(self, path: Path, stop: StopFlag, at: int):
        super().__init__(path)
        self.stop, self.at = stop, at

    def emit(self, type, **fields):
        if type == "step" and fields["step"] >= self.at:
            self.stop.set()
        return super().emit(type, **fields)


def test_two_hundred_steps_at_64px_lower_the_flow_matching_loss(flux_config):
    result = run_training(flux_config(max_train_steps=200, learning_rate=2e-3), show_progress=False)
    assert result.status == "finished" and result.step == 200
    assert all(torch.isfinite(torch.tensor(result.losses)))
    first, last = sum(result.losses[:25]) / 25, sum(result.losses[-25:]) / 25
    assert last < first, f"loss did not fall: first 25 steps {first:.4f}, last 25 {last:.4f}"


def test_the_bfl_single_file_trains_exactly_like_the_diffusers_folder(flux_config, flux_file, tmp_path):
    a = run_training(flux_config(output_dir=str(tmp_path / "folder")), show_progress=False)
    b = run_training(flux_config(output_dir=str(tmp_path / "file"), base_model=str(flux_file)), show_progress=False)
    assert a.status == b.status == "finished"
    assert max(abs(x - y) for x, y in zip(a.losses, b.losses)) < 1e-5
    la, lb = _lora(str(tmp_path / "folder")), _lora(str(tmp_path / "file"))
    assert set(la) == set(lb) and any(k.startswith("transformer.single_transformer_blocks.") for k in la)
    assert max((la[k] - lb[k]).abs().max().item() for k in la) < 1e-5


def test_resume_after_stops_gives_the_same_weights_as_one_run(flux_config, tmp_path):
    common = dict(max_train_steps=7, batch_size=1, gradient_accumulation_steps=2, dropout=0.1,
                  lr_scheduler="cosine", lr_warmup_steps=2, timestep_sampling="shift", guidance_scale=3.5)
    straight = run_training(flux_config(output_dir=str(tmp_path / "straight"), **common), show_progress=False)
    out, events = tmp_path / "resumed", tmp_path / "events.jsonl"
    for stop_at in (2, 5):
        stop = StopFlag()
        partial = run_training(flux_config(output_dir=str(out), resume_from_checkpoint="latest", **common),
                               StopAt(events, stop, stop_at), stop, show_progress=False)
        assert partial.status == "stopped" and partial.step == stop_at
    final = run_training(flux_config(output_dir=str(out), resume_from_checkpoint="latest", **common),
                         EventWriter(events), show_progress=False)
    assert final.status == "finished" and final.step == 7
    assert [e["step"] for e in read_events(events) if e["type"] == "step"] == list(range(1, 8))
    a, b = _lora(str(tmp_path / "straight")), _lora(str(out))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_block_selection_and_targets_decide_which_layers_train(flux_config, tmp_path):
    result = run_training(flux_config(flux_train_blocks="single.1", flux_target_modules=["proj_mlp", "proj_out"],
                                      max_train_steps=2), show_progress=False)
    assert result.status == "finished"
    names = {k.rsplit(".lora_", 1)[0] for k in _lora(str(tmp_path / "out"))}
    assert names == {"transformer.single_transformer_blocks.1.proj_mlp",
                     "transformer.single_transformer_blocks.1.proj_out"}


def test_timestep_samplers_stay_inside_the_unit_interval():
    from lora_core.image.flux_task import sample_timesteps

    for kind in ("sigmoid", "shift", "uniform", "flux_shift"):
        t = sample_timesteps(kind, 4000, torch.Generator().manual_seed(0), 3.0, 1024)
        assert t.min() > 0 and t.max() < 1, kind
    low = sample_timesteps("sigmoid", 4000, torch.Generator().manual_seed(0), 3.0, 16).mean()
    high = sample_timesteps("shift", 4000, torch.Generator().manual_seed(0), 3.0, 16).mean()
    assert high > low + 0.1, "a shift of 3 moves the draws towards noise"


def test_fp8_base_and_gradient_checkpointing_train_with_finite_close_losses(flux_config, tmp_path):
    plain = run_training(flux_config(output_dir=str(tmp_path / "a")), show_progress=False)
    gc = run_training(flux_config(output_dir=str(tmp_path / "b"), gradient_checkpointing=True), show_progress=False)
    fp8 = run_training(flux_config(output_dir=str(tmp_path / "c"), fp8_base=True), show_progress=False)
    assert max(abs(x - y) for x, y in zip(plain.losses, gc.losses)) < 1e-5
    assert all(torch.isfinite(torch.tensor(fp8.losses)))
    assert abs(fp8.losses[0] - plain.losses[0]) < 0.05 * plain.losses[0]


def test_offloaded_blocks_compute_the_same_outputs_and_gradients(flux_dir):
    from lora_core.image.adapters import AdapterSpec, add_network
    from lora_core.image.flux import load_flux_model
    from lora_core.image.flux_task import OffloadedLinear, offload_blocks
    from lora_core.image.fp8 import to_fp8

    def run(offload: int, fp8: bool):
        torch.manual_seed(0)
        tr = load_flux_model(flux_dir, text_encoders=False).transformer
        add_network(tr, AdapterSpec(rank=4, alpha=4.0), ["single_transformer_blocks.1.proj_mlp",
                                                          "transformer_blocks.1.attn.to_q"])
        if fp8:
            to_fp8(tr, torch.float32)
        layers = offload_blocks(tr, offload, torch.float32)
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(1, 16, 64, generator=g)
        out = tr(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                 pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.3]),
                 img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([1.0]),
                 return_dict=False)[0]
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None}
        return out.detach(), grads, layers, tr

    for fp8 in (False, True):
        want, want_grads, _, _ = run(0, fp8)
        got, got_grads, layers, tr = run(3, fp8)
        assert layers > 0 and any(isinstance(m, OffloadedLinear) for m in tr.modules())
        assert torch.allclose(got, want, atol=1e-5)
        assert set(got_grads) == set(want_grads) and len(got_grads) == 4
        for k in want_grads:
            assert torch.allclose(got_grads[k], want_grads[k], atol=1e-5), k


def test_block_swap_is_refused_on_a_cpu_run_by_name(flux_config):
    from lora_core.config import ConfigError

    with pytest.raises(ConfigError, match="training.flux_blocks_to_swap"):
        run_training(flux_config(flux_blocks_to_swap=2), show_progress=False)


def test_samples_render_with_the_flux_pipeline_after_the_encoders_are_freed(flux_config, tmp_path):
    result = run_training(flux_config(max_train_steps=2, sample_every_n_steps=2, sample_steps=2,
                                      sample_prompts=["a red circle --w 64 --h 64"]), show_progress=False)
    assert result.status == "finished"
    images = sorted((tmp_path / "out" / "samples").glob("step*.png"))
    assert images, "no sample image written"
    from PIL import Image

    assert Image.open(images[0]).size == (64, 64)


def test_buckets_and_the_bfl_file_with_caption_shuffling_keep_the_encoders(flux_file, tmp_path):
    from lora_core.tiny import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "mixed", n=4, sizes=[(96, 64), (64, 96)])
    cfg = config_from_dict({"train_data_dir": str(data), "base_model": str(flux_file),
                            "output_dir": str(tmp_path / "out"), "resolution": 64, "lora_rank": 4, "batch_size": 2,
                            "max_train_steps": 3, "enable_bucket": True, "min_bucket_reso": 32,
                            "max_bucket_reso": 128, "bucket_reso_steps": 32, "shuffle_caption": True,
                            "t5_max_length": 16, "save_precision": "float"})
    result = run_training(cfg, show_progress=False)
    assert result.status == "finished" and all(torch.isfinite(torch.tensor(result.losses)))


def test_the_memory_plan_measures_flux_and_counts_fp8_and_block_swap(flux_config, flux_file):
    from lora_core.plan import estimate_mb, make_plan, measure

    cfg = flux_config(base_model=str(flux_file), gradient_checkpointing=False)
    meas = measure(cfg)
    assert meas.weights > 0 and meas.lora_params > 0 and meas.act_per_example > meas.act_per_example_gc > 0
    assert meas.encoder_bytes > 0 and len(meas.swap_block_numels) == 4
    plan = make_plan(cfg, meas)
    assert plan.estimate_mb > 0 and "text encoders (caching only)" in plan.breakdown_mb
    device = torch.device("cuda")
    base = {"batch_size": 1, "gradient_checkpointing": False, "cache_latents": True, "optimizer": "adamw",
            "mixed_precision": "no", "fp8_base": False}
    full, parts = estimate_mb(meas, base, device)
    fp8, fp8_parts = estimate_mb(meas, {**base, "fp8_base": True}, device)
    swap, swap_parts = estimate_mb(meas, {**base, "flux_blocks_to_swap": 2}, device)
    assert fp8_parts["model weights"] < parts["model weights"]
    assert swap_parts["model weights"] < parts["model weights"]


@pytest.mark.slow
def test_a_daemon_run_of_tiny_flux_publishes_a_lora_with_a_sidecar_saying_flux(daemon_factory, flux_file, tiny_data):
    import json

    daemon = daemon_factory()
    client = daemon.client()
    run = client.submit(run_config(flux_file, tiny_data, "fluxy", steps=3, model__t5_max_length=16), name="fluxy")
    wait_until(lambda: client.get(run["id"])["status"] in ("finished", "failed"), 300, 0.5, "the FLUX run")
    row = client.get(run["id"])
    assert row["status"] == "finished", row["error"]
    published = daemon.lora_dir / "fluxy.safetensors"
    assert row["published_file"] == str(published) and published.is_file()
    sidecar = json.loads((daemon.lora_dir / "fluxy.json").read_text())
    assert sidecar["sd version"] == "Flux" and sidecar["activation text"] == "fluxy style"
    raw = published.read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    keys = [k for k in json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]) if k != "__metadata__"]
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)


def test_a_validation_split_reports_a_finite_flow_matching_eval_loss(flux_config, tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_training(flux_config(max_train_steps=3, validation_split=0.25), EventWriter(events),
                          show_progress=False)
    assert result.status == "finished"
    evals = [e for e in read_events(events) if e["type"] == "eval"]
    assert evals and evals[-1]["validation_images"] == 1 and 0 < evals[-1]["eval_loss"] < float("inf")


@pytest.mark.slow
def test_train_speed_family_flux_compares_ours_with_the_uncached_baseline():
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "train_speed.py"), "--family", "flux",
                           "--resolution", "64", "--batch-size", "2", "--steps", "5", "--warmup", "1",
                           "--t5-max-length", "32"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "train_speed_flux_tiny_64px_bs2" and result["peer"] == "baseline"
    assert result["ours_steps_s"] > 0 and result["baseline_steps_s"] > 0 and result["ratio"] > 0
    assert {r["variant"] for r in result["runs"]} == {"ours", "baseline"}
