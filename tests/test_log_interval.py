"""training.log_every_n_steps: the loss stays on the device between reads (no per-step host sync on a GPU), yet every
step is still reported, in order, before anything it triggers; the non-finite guard still ends a diverging run; and
a run stopped and resumed under deferred reads ends with exactly the weights of one straight run."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_core.config import ConfigError
from lora_core.events import EventWriter, read_events
from lora_core.loop import DIVERGED, StopFlag
from lora_core.train import run_training
from test_train import StopAt  # the user pressing Cancel once a step is reported


def _steps(events: Path) -> list[dict]:
    return [e for e in read_events(events) if e["type"] == "step"]


def test_deferred_reads_report_every_step_with_the_losses_of_a_per_step_run(train_config, tmp_path):
    common = dict(max_train_steps=7, save_steps=2)
    every, deferred = tmp_path / "every.jsonl", tmp_path / "deferred.jsonl"
    a = run_training(train_config(output_dir=str(tmp_path / "a"), **common), EventWriter(every),
                     show_progress=False)
    b = run_training(train_config(output_dir=str(tmp_path / "b"), log_every_n_steps=3, **common),
                     EventWriter(deferred), show_progress=False)
    assert a.status == b.status == "finished"
    assert [e["step"] for e in _steps(deferred)] == list(range(1, 8))
    assert [e["loss"] for e in _steps(deferred)] == [e["loss"] for e in _steps(every)] == a.losses == b.losses
    # a step is reported before the checkpoint it triggers, even between reads (steps 2, 4, 6 are not read steps)
    order = [(e["type"], e["step"]) for e in read_events(deferred) if e["type"] in ("step", "checkpoint")]
    for n in (2, 4, 6):
        assert order.index(("step", n)) < order.index(("checkpoint", n)) < order.index(("step", n + 1))


def test_a_diverging_run_is_stopped_at_the_next_read_without_saving(train_config, tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_training(train_config(max_train_steps=40, learning_rate=1e30, max_grad_norm=0, log_every_n_steps=4),
                          EventWriter(events), show_progress=False)
    assert result.status == "failed" and result.error == DIVERGED
    end = read_events(events)[-1]
    assert end["type"] == "end" and end["status"] == "failed" and end["step"] < 40
    assert end["step"] % 4 == 0, "unguarded steps are judged at a read"
    assert [e["step"] for e in _steps(events)] == list(range(1, end["step"] + 1))
    assert not list((tmp_path / "out").glob("*.safetensors")), "no LoRA of NaN weights is written"


def test_stops_and_resumes_under_deferred_reads_give_the_weights_of_one_run(train_config, tmp_path):
    common = dict(max_train_steps=9, batch_size=1, gradient_accumulation_steps=2, lr_scheduler="cosine",
                  lr_warmup_steps=2, noise_offset=0.05)
    straight = run_training(train_config(output_dir=str(tmp_path / "straight"), **common), show_progress=False)
    out, events = tmp_path / "resumed", tmp_path / "events.jsonl"
    stopped_at = []
    for stop_at in (3, 5):
        stop = StopFlag()
        partial = run_training(train_config(output_dir=str(out), resume_from_checkpoint="latest",
                                            log_every_n_steps=4, **common),
                               StopAt(events, stop, stop_at), stop, show_progress=False)
        assert partial.status == "stopped"
        stopped_at.append(partial.step)
    # the stop is seen when the step is reported: at the next read (every 4th step, or an epoch's end)
    assert 3 <= stopped_at[0] < stopped_at[1] < 9
    final = run_training(train_config(output_dir=str(out), resume_from_checkpoint="latest", log_every_n_steps=4,
                                      **common), EventWriter(events), show_progress=False)
    assert final.status == "finished" and final.step == 9
    assert [e["step"] for e in _steps(events)] == list(range(1, 10))
    a, b = load_file(str(straight.output)), load_file(str(final.output))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_log_every_n_steps_below_one_is_refused_by_name(train_config):
    with pytest.raises(ConfigError, match="log_every_n_steps"):
        train_config(log_every_n_steps=0)
