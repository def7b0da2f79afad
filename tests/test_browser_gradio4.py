"""The same tab on gradio 4.40.0 (as Forge serves it), in headless Chromium: a shorter story than the gradio 3 one.

The tab loads, a bad learning rate is refused next to its field, a run started from the form shows up live in the
Runs table, and its Cancel button stops it the engine's way: it saves a checkpoint first and ends `cancelled`.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from test_browser_tab import (browser, daemon_client, page, refuse_a_learning_rate_of_minus_one,  # noqa: F401
                              runs_section_shows_no_hidden_plumbing, section, serve_tab, shot, start_a_run,
                              the_first_hour)

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def world():
    """The tab on gradio 4.40.0, as Forge serves it."""
    with serve_tab(".venv-gradio4") as served:
        yield served


def test_on_gradio_4_a_run_started_in_the_form_shows_live_and_cancel_keeps_a_checkpoint(world, page):
    page.goto(world["url"])
    client = daemon_client(world)
    runs_section_shows_no_hidden_plumbing(page)
    refuse_a_learning_rate_of_minus_one(page)
    shot(page, "g4_01_bad_learning_rate")
    assert client.list_runs(all=True) == []

    page.locator("#lora_scripts_learning_rate input").fill("0.001")
    section(page, "Dataset")
    page.locator("#lora_scripts_dataset_dir textarea, #lora_scripts_dataset_dir input").fill(str(world["captioned"]))
    run_id = start_a_run(page, "forge_style", steps=100000)

    section(page, "Runs")
    row = page.locator(f'#lora_scripts_runs_table tr[data-run-id="{run_id}"]')
    row.and_(page.locator('[data-status="running"]')).wait_for(timeout=120_000)
    page.wait_for_function("() => Number(document.querySelector('#lora_scripts_loss_curve')?.dataset.points) >= 2",
                           timeout=60_000)
    shot(page, "g4_02_running")
    page.locator(f'#lora_scripts_run_details[data-run-id="{run_id}"] .lora-scripts-action[data-action="cancel"]').click()
    row.and_(page.locator('[data-status="cancelled"]')).wait_for(timeout=90_000)
    shot(page, "g4_03_cancelled")
    run = client.get(run_id)
    assert run["status"] == "cancelled" and 0 < run["step"] < 100000
    assert run["checkpoint"] and Path(run["checkpoint"]).is_dir()
    assert not (world["lora_dir"] / "forge_style.safetensors").exists()


def test_on_gradio_4_the_first_hour_every_click_answers_at_once_and_nothing_looks_hung(world, page):
    the_first_hour(page, world, "gradio-4.40")
