"""A text LoRA started from the tab (gradio 3.41.2, as in A1111), in headless Chromium: the person picks the
"Text LoRA" kind, points it at a local language model folder and a .jsonl file, Starts, watches the run in the Runs
table as kind "text", and reads its sample completions there when it ends.

Real parts throughout: the daemon trains the tiny LLaMA of `lora_core.text.tiny` for six steps, sampling at
steps 3 and 6. The model is built inside the served folder (not a pytest tmp folder, which a session running
beside this one may prune).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_core.text.tiny import build_tiny_llama, write_tiny_instruction_set
from test_browser_tab import browser, daemon_client, page, section, serve_tab, shot  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PROMPTS = ["What colour is the sky?", "Name a <b>fruit</b>."]


@pytest.fixture(scope="module")
def world():
    """The tab on gradio 3.41.2, plus a tiny LLaMA folder and a tiny instruction set."""
    with serve_tab(".venv-gradio3") as served:
        served["llama"] = build_tiny_llama(served["base"] / "tiny-llama")
        served["text_data"] = write_tiny_instruction_set(served["base"] / "colours.jsonl")
        yield served


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(value)


def test_a_text_lora_started_in_the_tab_shows_live_as_text_and_its_completions_in_runs(world, page):
    page.goto(world["url"])
    client = daemon_client(world)

    section(page, "Train")
    page.locator("#lora_scripts_run_kind").get_by_text("Text LoRA").click()
    page.locator("#lora_scripts_text_form").wait_for(state="visible", timeout=30_000)
    assert page.locator("#lora_scripts_image_form").is_hidden()
    fill(page, "lora_scripts_text_base_model", str(world["llama"]))
    fill(page, "lora_scripts_text_train_data_file", str(world["text_data"]))
    fill(page, "lora_scripts_text_output_name", "colours")
    fill(page, "lora_scripts_text_max_train_steps", "6")
    fill(page, "lora_scripts_text_batch_size", "4")
    fill(page, "lora_scripts_text_max_seq_length", "64")
    fill(page, "lora_scripts_text_learning_rate", "0.01")
    fill(page, "lora_scripts_text_target_modules", "all-linear")
    fill(page, "lora_scripts_text_sample_prompts", "\n".join(PROMPTS))
    fill(page, "lora_scripts_text_sample_every_n_steps", "3")
    page.locator("#lora_scripts_advanced").get_by_text("Advanced").first.click()
    fill(page, "lora_scripts_extra_yaml", "sample_max_new_tokens: 6\n")
    page.locator("#lora_scripts_start").click()
    status = page.locator("#lora_scripts_train_status").first
    status.get_by_text("Queued run").wait_for(timeout=60_000)
    run_id = status.inner_text().split("Queued run ", 1)[1].split()[0]
    assert "plan failed" not in page.locator("#lora_scripts_plan").first.inner_text()  # text runs are planned too
    shot(page, "text_01_train_form")

    section(page, "Runs")
    row = page.locator(f'#lora_scripts_runs_table tr[data-run-id="{run_id}"]')
    row.wait_for(timeout=30_000)
    assert row.locator("td").last.inner_text().strip() == "text"
    row.and_(page.locator('[data-status="finished"]')).wait_for(timeout=180_000)
    done = client.get(run_id)
    assert done["status"] == "finished" and done["kind"] == "text", (done.get("error"), client.logs(run_id)[-20:])

    completions = page.locator(f'#lora_scripts_run_details[data-run-id="{run_id}"] #lora_scripts_completions')
    completions.wait_for(timeout=30_000)
    prompts = completions.locator(".lora-scripts-prompt")
    assert prompts.count() == len(PROMPTS)
    for shown, prompt in zip(prompts.all_inner_texts(), PROMPTS):
        assert shown.startswith(prompt) and "step 6" in shown  # the markup in a prompt is shown as text
    texts = completions.locator("pre").all_inner_texts()
    samples = sorted((Path(done["run_dir"]) / "output" / "samples").glob("step-00000006-*.txt"))
    assert len(samples) == len(PROMPTS)
    assert sorted(texts) == sorted(p.read_text(encoding="utf-8").rstrip("\n") for p in samples)
    completions.scroll_into_view_if_needed()
    shot(page, "text_02_completions")
