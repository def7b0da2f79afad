"""The loop's parts on their own: the task contract both kinds satisfy, min-SNR weights against the paper's maths,
fault injection read once, and the CLI's console progress off a terminal (a real child process, stderr a pipe)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lora_core.loop import FAULT_OOM_ENV, TrainingRun
from lora_core.task import TrainingTask
from text_fixtures import text_config, tiny_llama  # noqa: F401  (tiny_llama: fixture)


def test_both_kinds_of_task_satisfy_the_training_task_protocol(train_config, tiny_llama, tmp_path):
    from lora_core.image.task import ImageTask
    from lora_core.text.task import TextTask

    image, text = ImageTask(train_config()), TextTask(text_config(tmp_path, tiny_llama))
    for task in (image, text):
        assert isinstance(task, TrainingTask)
        # declared before setup, not probed with getattr defaults later
        assert task.started_at == 0.0 and task.total_steps == 0
    assert image.text_encoder is None and image.disk_cache_stats is None and image.reg_scan is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_min_snr_gamma_over_snr_as_the_paper_defines_it(prediction_type):
    from diffusers import DDPMScheduler

    from lora_core.image.task import min_snr_weight

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    gamma = 5.0
    # Hang et al.: SNR(t) = alpha_bar / (1 - alpha_bar); weight = min(SNR, gamma) / SNR, and for a v target
    # (whose loss is the epsilon loss times SNR + 1) min(SNR, gamma) / (SNR + 1) — sd-scripts' apply_snr_weight
    ac = sched.alphas_cumprod[timesteps].double()
    snr = ac / (1 - ac)
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1 if prediction_type == "v_prediction"
                                                                    else snr)
    got = min_snr_weight(sched, timesteps, gamma, prediction_type)
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    assert got[0] < got[-1]  # low-noise timesteps (high SNR) are weighted down
    if prediction_type == "epsilon":
        assert got[-1] == pytest.approx(1.0)  # SNR below gamma: weight 1


def test_fault_injection_is_read_once_when_the_attempt_starts(train_config, monkeypatch):
    monkeypatch.setenv(FAULT_OOM_ENV, "3:2")
    run = TrainingRun(train_config())
    monkeypatch.delenv(FAULT_OOM_ENV)
    assert run.fault is not None and (run.fault.at_step, run.fault.min_batch) == (3, 2)
    with pytest.raises(torch.OutOfMemoryError):
        run.fault.check(3, 2)
    run.fault.check(3, 1)  # smaller batch than MIN_BATCH: no fault
    assert TrainingRun(train_config()).fault is None


def test_console_progress_on_a_terminal_draws_a_bar_and_off_one_writes_lines():
    from lora_core.console import ConsoleProgress

    feed = [("cache", {"what": "latents", "done": 1, "total": 2}), ("cache", {"what": "latents", "done": 2, "total": 2}),
            ("start", {"step": 0, "total_steps": 3})]
    feed += [("step", {"step": s, "total_steps": 3, "epoch": 0, "loss": 0.5, "lr": 1e-4, "it_s": 2.0, "eta_s": 1.0,
                       "peak_mem_mb": 1.0}) for s in (1, 2, 3)]
    feed.append(("close", {}))
    outputs = {}
    for tty in (True, False):
        stream = io.StringIO()
        progress = ConsoleProgress(stream, tty=tty)
        for kind, fields in feed:
            progress(kind, fields)
        outputs[tty] = stream.getvalue()
    assert "\r" in outputs[True] and "training" in outputs[True]
    assert "\r" not in outputs[False] and "\x1b" not in outputs[False]
    assert outputs[False].splitlines()[-1].startswith("step 3/3  loss 0.5000")


def test_the_cli_off_a_terminal_prints_plain_progress_lines_and_no_library_noise(tiny_sd, tiny_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train_data_dir": str(tiny_data), "base_model": str(tiny_sd), "resolution": 64,
                                      "output_dir": str(tmp_path / "out"), "max_train_steps": 2, "batch_size": 2,
                                      "lora_rank": 4}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "lora_core.train", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert "step 2/2" in " ".join(lines) and any(line.startswith("step 1/2  loss ") for line in lines)
    assert "\x1b[" not in proc.stderr and "\r" not in proc.stderr
    assert "requires torchvision" not in proc.stderr and "FutureWarning" not in proc.stderr
    assert proc.stdout.strip().endswith(".safetensors")


def test_a_checkpoint_half_written_by_a_crash_is_never_listed_and_the_next_save_sweeps_it(tmp_path):
    from lora_core.checkpoint import Position, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
    from lora_core.files import temp_path

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"
    crashed = temp_path(root / "step-00000002")  # what a writer killed mid-save leaves
    crashed.mkdir(parents=True)
    (crashed / "state.json").write_text("{")
    assert list_checkpoints(tmp_path) == []
    lora = {"w": layer.weight.detach().clone()}
    path = save_checkpoint(tmp_path, Position(step=2), lora, optimizer, scheduler, None, torch.Generator(), {})
    assert latest_checkpoint(tmp_path) == path and sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert torch.equal(load_checkpoint(path).lora["w"], lora["w"])
