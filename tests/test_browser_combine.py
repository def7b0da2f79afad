"""The Combine section in headless Chromium (gradio 3.41 as A1111 serves it, and 4.40 as Forge does): a person picks
two LoRAs from the Lora folder and sees what they are, merges them, follows the job in Runs, finds the merged file in
the list with its inspect summary, and resizes it, seeing the retained energy.

Real parts: the standalone tab in the WebUI-like venv, a real daemon running the toolbox jobs in child processes,
and LoRA files written by the engine's own export path on the tiny SD1 model.
"""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from test_browser_tab import browser, daemon_client, page, section, serve_tab, shot  # noqa: F401
from test_tools import make_lora

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module", params=[".venv-gradio3", ".venv-gradio4"])
def world(request):
    with serve_tab(request.param) as served:
        served["lora_dir"].mkdir(parents=True, exist_ok=True)
        make_lora(served["lora_dir"] / "style.safetensors", "sd1", seed=1, rank=4, text=False)
        make_lora(served["lora_dir"] / "character.safetensors", "sd1", seed=2, rank=4, text=False)
        served["gradio"] = request.param
        yield served


def pick(page, name: str, attempts: int = 5) -> None:
    """Choose ``name`` in the Combine section's LoRA list like a person: open it, click the option, close it."""
    for attempt in range(attempts):
        page.locator("#lora_scripts_combine_loras input").first.click()
        try:
            page.locator("#lora_scripts_combine_loras ul.options li", has_text=name).first.click(timeout=5_000)
            break
        except PlaywrightTimeoutError:
            if attempt == attempts - 1:
                raise
            page.locator("#lora_scripts_combine_refresh").click()  # the list was built before the file came
        finally:
            page.keyboard.press("Escape")
    page.locator("#lora_scripts_combine_weights").first.click()


def combine(page, out: str) -> str:
    """Output name, Combine; returns the queued job's id."""
    page.locator("#lora_scripts_combine_out input, #lora_scripts_combine_out textarea").first.fill(out)
    page.locator("#lora_scripts_combine_run").click()
    status = page.locator("#lora_scripts_combine_status").first
    status.get_by_text("as job").wait_for(timeout=120_000)
    return re.search(r"as job (\S+):", status.inner_text()).group(1)


def job_in_runs(page, job_id: str) -> None:
    """Runs: the job's row shows its progress and ends finished; its details show the report and the file."""
    section(page, "Runs")
    row = page.locator(f'#lora_scripts_runs_table tr[data-run-id="{job_id}"]')
    row.wait_for(timeout=120_000)
    row.and_(page.locator('[data-status="finished"]')).wait_for(timeout=400_000)
    done, total = re.search(r"(\d+)/(\d+)", row.locator(".lora-scripts-progress-cell").inner_text()).groups()
    assert int(total) > 0 and done == total  # progress counted like a run's steps
    row.click()
    page.locator(f'#lora_scripts_run_details[data-run-id="{job_id}"] #lora_scripts_run_file '
                 f'.lora-scripts-inspect').wait_for(timeout=120_000)


def test_pick_two_loras_merge_them_follow_the_job_and_resize_the_result(world, page):
    client = daemon_client(world)
    page.goto(world["url"])
    section(page, "Combine")
    page.locator("#lora_scripts_combine_refresh").click()  # the files came after the tab was built
    # two quick picks, the second while the first one's summary is still being read: both shown, no button
    pick(page, "style.safetensors")
    pick(page, "character.safetensors")
    info = page.locator("#lora_scripts_combine_info").first
    info.get_by_text("an exact merge has rank 8").wait_for(timeout=120_000)
    assert "style.safetensors: sd1 · lora · rank 4 · alpha 2.0" in info.inner_text()
    assert info.locator(".lora-scripts-inspect").count() == 2
    assert "<th>block</th>" in info.inner_html() and "red circle (3)" in info.inner_text()
    shot(page, f"combine_01_picked_{world['gradio']}")

    page.locator("#lora_scripts_combine_weights input, #lora_scripts_combine_weights textarea").first.fill("0.8, 0.5")
    merge_id = combine(page, "combo")
    job_in_runs(page, merge_id)
    details = page.locator(f'#lora_scripts_run_details[data-run-id="{merge_id}"]')
    assert 'data-rank="8"' in details.inner_html() and "combo.safetensors" in details.inner_text()
    shot(page, f"combine_02_merge_in_runs_{world['gradio']}")

    # the merged file in the Combine list, with its inspect summary when picked
    page.goto(world["url"])
    section(page, "Combine")
    page.locator("#lora_scripts_combine_refresh").click()
    pick(page, "combo.safetensors")
    info = page.locator("#lora_scripts_combine_info").first
    info.locator('.lora-scripts-inspect[data-rank="8"]').wait_for(timeout=120_000)
    assert "merged from" in info.inner_text()

    # resize it to rank 2: the report says how much of each module's energy is kept
    page.locator("#lora_scripts_combine_action label", has_text="Resize one LoRA").click()
    page.locator("#lora_scripts_combine_rank input").first.fill("2")
    resize_id = combine(page, "small")
    status = page.locator("#lora_scripts_combine_status").first
    for _ in range(200):
        page.locator("#lora_scripts_combine_refresh").click()
        try:
            status.get_by_text("retained energy").wait_for(timeout=3_000)
            break
        except PlaywrightTimeoutError:
            continue
    text = status.inner_text()
    assert "retained energy: lowest" in text and "8 → 2" in text, text
    assert 'data-rank="2"' in status.inner_html()
    shot(page, f"combine_03_resized_{world['gradio']}")
    run = client.get(resize_id)
    assert run["status"] == "finished" and run["output_file"].endswith("small.safetensors")
    assert (world["lora_dir"] / "small.safetensors").is_file()
