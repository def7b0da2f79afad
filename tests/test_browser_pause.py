"""Pause and resume in the tab (gradio 3.41, headless Chromium): the run's Pause button, "paused for user" in the
Runs table, Resume; then a pause for a generation (what the WebUI's hand-off script asks the daemon for when Generate
is pressed; the standalone tab has no txt2img to press) shows "paused for generation" until it resumes."""
from __future__ import annotations

import pytest

from daemon_fixtures import wait_until
from test_browser_tab import browser, daemon_client, page, section, serve_tab, shot, start_a_run  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def world():
    with serve_tab(".venv-gradio3") as served:
        yield served


def test_the_runs_view_shows_paused_for_generation_and_the_run_resumes(world, page):
    page.goto(world["url"])
    client = daemon_client(world)
    section(page, "Dataset")
    page.locator("#lora_scripts_dataset_dir textarea, #lora_scripts_dataset_dir input").fill(str(world["captioned"]))
    run_id = start_a_run(page, "pause_style", steps=100000)

    section(page, "Runs")
    row = page.locator(f'#lora_scripts_runs_table tr[data-run-id="{run_id}"]')
    details = f'#lora_scripts_run_details[data-run-id="{run_id}"]'
    row.and_(page.locator('[data-status="running"]')).wait_for(timeout=300_000)
    page.wait_for_function(f"() => document.querySelector('{details}') !== null", timeout=60_000)
    wait_until(lambda: client.get(run_id)["step"] >= 1, 300, 0.5, "the first step")
    page.locator(f'{details} .lora-scripts-action[data-action="pause"]').click()
    row.and_(page.locator('[data-status="paused"]')).wait_for(timeout=300_000)
    assert "paused for user" in row.inner_text()
    shot(page, "pause_01_paused_for_user")

    page.locator(f'{details} .lora-scripts-action[data-action="resume"]').click()
    row.and_(page.locator('[data-status="running"]')).wait_for(timeout=300_000)
    before = client.get(run_id)["step"]
    client.pause(run_id, reason="generation")  # the WebUI's AlwaysVisible script does this as Generate starts
    row.and_(page.locator('[data-status="paused"]')).wait_for(timeout=300_000)
    assert "paused for generation" in row.inner_text()
    assert "paused for generation" in page.locator(details).inner_text()
    shot(page, "pause_02_paused_for_generation")

    client.resume(run_id)  # ... and this once the WebUI has been idle for lora_scripts_resume_idle_s
    row.and_(page.locator('[data-status="running"]')).wait_for(timeout=300_000)
    wait_until(lambda: client.get(run_id)["step"] > before, 300, 0.5, "the resumed run to train on")
    shot(page, "pause_03_resumed")
    run = client.get(run_id)
    assert run["status"] == "running" and run["step"] > before and run["pause_reason"] is None
    client.cancel(run_id)
    row.and_(page.locator('[data-status="cancelled"]')).wait_for(timeout=300_000)
