"""Training on the tiny SD1 model: the loss falls, files load in diffusers, checkpoints resume exactly, stop saves."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core.events import EXIT_OOM, EXIT_STOPPED, EventWriter, read_events
from lora_core.loop import StopFlag
from lora_core.train import run_training

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
REQUIRED_METADATA = ["ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                     "ss_base_model_version", "ss_tag_frequency", "ss_resolution", "ss_num_train_images",
                     "ss_learning_rate", "ss_training_started_at", "ss_steps", "modelspec.architecture",
                     "modelspec.title", "sshs_model_hash"]


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.slow
def test_two_hundred_steps_on_four_images_lower_the_loss(train_config):
    cfg = train_config(max_train_steps=200, batch_size=2, learning_rate=1e-3)
    result = run_training(cfg, show_progress=False)
    assert result.status == "finished" and result.step == 200
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < first, f"loss did not fall: first 20 steps {first:.4f}, last 20 {last:.4f}"
    assert Path(cfg.output.output_dir, "logs").is_dir() and any(Path(cfg.output.output_dir, "logs").iterdir())
    assert Path(cfg.output.output_dir, "config.yaml").is_file()


def test_exported_file_has_only_kohya_keys_the_metadata_and_the_a1111_hash(train_config):
    cfg = train_config(max_train_steps=4, trigger_word="shapez")
    result = run_training(cfg, show_progress=False)
    path = result.output
    assert path == Path(cfg.output.output_dir) / "out.safetensors"
    state = load_file(str(path))
    assert state and all(KOHYA_KEY.match(k) for k in state), [k for k in state if not KOHYA_KEY.match(k)][:5]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert all(state[k].ndim == 0 and state[k].item() == 4.0 for k in state if k.endswith(".alpha"))
    meta = metadata(path)
    assert all(k in meta for k in REQUIRED_METADATA), [k for k in REQUIRED_METADATA if k not in meta]
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"])["images"]["simple background"] == 4
    assert meta["ss_output_name"] == "out" and meta["modelspec.trigger_phrase"] == "shapez"
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header_len:]).hexdigest()


def _unet_outputs(pipe, seed: int = 0, scale: float | None = None):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    kwargs = {"cross_attention_kwargs": {"scale": scale}} if scale is not None else {}
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([500]), text, **kwargs).sample


def test_diffusers_loads_the_file_and_matches_the_peft_trained_model(train_config, tiny_sd):
    from diffusers import StableDiffusionPipeline

    from lora_core.checkpoint import latest_checkpoint
    from lora_core.image.lora import add_lora, load_lora_state

    cfg = train_config(max_train_steps=6, learning_rate=2e-2, save_steps=6, alpha=2, train_text_encoder=True,
                       text_encoder_lr=1e-3)
    result = run_training(cfg, show_progress=False)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in load_file(str(result.output)))

    trained = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    add_lora(trained.unet, cfg.model.unet_target_modules, 4, 2.0, 0.0)
    ckpt = load_file(str(latest_checkpoint(cfg.output.output_dir) / "lora.safetensors"))
    load_lora_state(trained.unet, {k[5:]: v for k, v in ckpt.items() if k.startswith("unet.")})
    trained.unet.eval()

    base = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    loaded.load_lora_weights(str(result.output))
    out_base, out_trained, out_loaded = _unet_outputs(base), _unet_outputs(trained), _unet_outputs(loaded)
    assert (out_trained - out_base).abs().max() > 1e-3, "the LoRA changed nothing; the test would prove nothing"
    assert (out_loaded - out_trained).abs().max() < 1e-4
    half = _unet_outputs(loaded, scale=0.5)
    ratio = (half - out_base).norm() / (out_loaded - out_base).norm()
    assert 0.45 < ratio < 0.55, f"scale 0.5 moved the output {ratio:.3f} of the way, expected about half"


def test_single_file_checkpoint_trains_and_exports_like_the_diffusers_folder(train_config, tiny_sd_file, tmp_path):
    folder = run_training(train_config(max_train_steps=3), show_progress=False)
    single = run_training(train_config(max_train_steps=3, base_model=str(tiny_sd_file),
                                       output_dir=str(tmp_path / "single")), show_progress=False)
    a, b = load_file(str(folder.output)), load_file(str(single.output))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert metadata(single.output)["ss_sd_model_name"] == tiny_sd_file.name


def test_corrupt_image_and_duplicate_are_reported_by_name_and_the_run_completes(train_config, tiny_data, tmp_path):
    (tiny_data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    first = sorted(tiny_data.glob("*.png"))[0]
    (tiny_data / "copy_of_first.png").write_bytes(first.read_bytes())
    (tiny_data / "copy_of_first.txt").write_text("duplicate")
    events_path = tmp_path / "events.jsonl"
    result = run_training(train_config(max_train_steps=2), EventWriter(events_path), show_progress=False)
    assert result.status == "finished"
    dataset = next(e for e in read_events(events_path) if e["type"] == "dataset")
    assert [s["file"] for s in dataset["skipped"]] == ["broken.png"]
    assert dataset["duplicates"] == [{"file": "copy_of_first.png", "same_as": first.name}]
    assert dataset["images"] == 4


class StopAt(EventWriter):
    """An event sink that asks the loop to stop once a given step is reported — a user pressing Cancel."""

    def __init__(self, path: Path, stop: StopFlag, at: int):
        super().__init__(path)
        self.stop, self.at = stop, at

    def emit(self, type, **fields):
        if type == "step" and fields["step"] >= self.at:
            self.stop.set()
        return super().emit(type, **fields)


def test_resume_after_several_stops_gives_the_same_weights_as_one_run(train_config, tmp_path):
    common = dict(max_train_steps=9, batch_size=1, gradient_accumulation_steps=2, dropout=0.1,
                  shuffle_caption=True, caption_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2,
                  noise_offset=0.05, train_text_encoder=True)
    straight = run_training(train_config(output_dir=str(tmp_path / "straight"), **common), show_progress=False)

    out = tmp_path / "resumed"
    events = tmp_path / "events.jsonl"
    for stop_at in (3, 5):
        stop = StopFlag()
        partial = run_training(train_config(output_dir=str(out), resume_from_checkpoint="latest", **common),
                               StopAt(events, stop, stop_at), stop, show_progress=False)
        assert partial.status == "stopped" and partial.step == stop_at
    final = run_training(train_config(output_dir=str(out), resume_from_checkpoint="latest", **common),
                         EventWriter(events), show_progress=False)
    assert final.status == "finished" and final.step == 9
    steps = [e["step"] for e in read_events(events) if e["type"] == "step"]
    assert steps == list(range(1, 10)), "step counters must continue exactly across resumes"
    starts = [e["resumed_from"] for e in read_events(events) if e["type"] == "start"]
    assert starts[0] is None and starts[1].endswith("step-00000003") and starts[2].endswith("step-00000005")
    a, b = load_file(str(straight.output)), load_file(str(final.output))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _write_cfg(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_lora_then_exits_3(tiny_sd, tiny_data, tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", train_data_dir=str(tiny_data), base_model=str(tiny_sd), resolution=64,
                     output_dir=str(tmp_path / "out"), max_train_steps=5000, lora_rank=4)
    events = tmp_path / "events.jsonl"
    child = subprocess.Popen([sys.executable, "-m", "lora_core.train", "--config", str(cfg), "--events",
                              str(events), "--no-progress"], env=_child_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(e["type"] == "step" and e["step"] >= 3 for e in read_events(events)):
        assert child.poll() is None, child.stderr.read()
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == EXIT_STOPPED, err
    end = read_events(events)[-1]
    assert end["type"] == "end" and end["status"] == "stopped"
    ckpts = list((tmp_path / "out" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name == f"step-{end['step']:08d}"
    assert Path(end["output"]).is_file() and Path(end["output"]).name == f"out-step{end['step']:08d}.safetensors"


def test_injected_oom_steps_down_the_batch_and_finishes(train_config, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CORE_FAULT_OOM", "3:2")
    events = tmp_path / "events.jsonl"
    result = run_training(train_config(max_train_steps=6, batch_size=2, oom_policy="step_down"),
                          EventWriter(events), show_progress=False)
    assert result.status == "finished" and result.step == 6
    ooms = [e for e in read_events(events) if e["type"] == "oom" and e.get("action") == "step_down"]
    assert ooms and ooms[-1]["change"] == {"training.batch_size": 1, "training.gradient_accumulation_steps": 2}
    starts = [e for e in read_events(events) if e["type"] == "start"]
    assert starts[-1]["step"] == 2 and starts[-1]["resumed_from"].endswith("step-00000002")


def test_oom_without_step_down_exits_4_with_advice_and_no_traceback(tiny_sd, tiny_data, tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", train_data_dir=str(tiny_data), base_model=str(tiny_sd), resolution=64,
                     output_dir=str(tmp_path / "out"), max_train_steps=6, batch_size=2)
    env = {**_child_env(), "LORA_CORE_FAULT_OOM": "2"}
    proc = subprocess.run([sys.executable, "-m", "lora_core.train", "--config", str(cfg), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_OOM
    assert "Traceback" not in proc.stderr
    assert "out of memory at step 1" in proc.stderr.replace("CUDA out of memory at step 1", "out of memory at step 1")
    assert "training.batch_size" in proc.stderr and "gradient_checkpointing" in proc.stderr


def test_config_error_exits_2_before_any_model_is_loaded(tmp_path):
    cfg = _write_cfg(tmp_path / "c.yaml", train_data_dir=str(tmp_path), base_model=str(tmp_path),
                     output_dir=str(tmp_path / "out"), learning_rate=-1)
    proc = subprocess.run([sys.executable, "-m", "lora_core.train", "--config", str(cfg)], env=_child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "training.learning_rate: must be > 0, got -1.0 (line" in proc.stderr


def test_diffusers_format_writes_a_peft_folder_that_load_lora_weights_reads(train_config, tiny_sd):
    from diffusers import StableDiffusionPipeline

    kohya = run_training(train_config(max_train_steps=3, learning_rate=2e-2, alpha=2), show_progress=False)
    peft = run_training(train_config(max_train_steps=3, learning_rate=2e-2, alpha=2, format="diffusers",
                                     output_dir=str(kohya.output.parent.parent / "peft")), show_progress=False)
    assert peft.output.is_dir() and (peft.output / "pytorch_lora_weights.safetensors").is_file()
    outputs = []
    for source in (kohya.output, peft.output):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
        pipe.load_lora_weights(str(source))
        outputs.append(_unet_outputs(pipe))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-4, "both formats must load at the same (alpha/rank) scale"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_gpu_only_settings_on_a_cpu_machine_are_refused_by_name_before_loading(train_config, tmp_path):
    from lora_core.errors import InputError

    with pytest.raises(InputError, match="training.mixed_precision: fp16 needs a CUDA GPU"):
        run_training(train_config(mixed_precision="fp16"), show_progress=False)
    with pytest.raises(InputError, match="training.optimizer: adamw8bit needs bitsandbytes and a CUDA GPU"):
        run_training(train_config(optimizer="adamw8bit"), show_progress=False)
    with pytest.raises(InputError, match="training.device: 'cuda' was asked for"):
        run_training(train_config(device="cuda"), show_progress=False)


def test_a_diverging_run_stops_with_advice_instead_of_saving_nan_weights(train_config, tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_training(train_config(max_train_steps=20, learning_rate=1e30, max_grad_norm=0),
                          EventWriter(events), show_progress=False)
    assert result.status == "failed" and "not a finite number" in result.error
    assert "learning_rate" in result.advice
    end = read_events(events)[-1]
    assert end["type"] == "end" and end["status"] == "failed" and end["step"] < 20
