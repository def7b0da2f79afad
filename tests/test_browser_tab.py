"""A person trains a LoRA from the standalone tab (gradio 3.41.2, as in A1111), in a real headless Chromium.

Real parts throughout: the daemon runs in the engine's Python, the tab in the `.venv-gradio3` environment, and the
run trains the tiny SD model at 64 px. Screenshots land in test-artifacts/browser/ for a human to look at.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from dataset_fixtures import make_tagger_dir
from prepare_webui_envs import CHROMIUM, require

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# The tiny tagger's tags for coloured shapes on a background: (name, category, bias, weight on mean R, G, B)
SHAPE_TAGS = [("red_shape", 0, 0.0, (4.0, -2.0, -2.0)), ("blue_shape", 0, 0.0, (-2.0, -2.0, 4.0)),
              ("simple_background", 0, 3.0, (0.0, 0.0, 0.0))]

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def prerequisite(ok: bool, message: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_prerequisites() -> None:
    prerequisite(CHROMIUM.exists(), f"{CHROMIUM} is missing: run `python tests/prepare_webui_envs.py` as root")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        prerequisite(False, "the playwright python package is missing: pip install -e '.[test]'")


@contextlib.contextmanager
def serve_tab(env_name: str):
    """A tiny model, images with and without captions, a tiny tagger, a daemon (engine env) and the standalone tab
    served from the WebUI-like environment ``env_name``.

    Its folder is not a pytest tmp_path: pytest prunes old tmp folders of other sessions, and a session running
    beside this one must not delete the daemon's state folder mid-run.
    """
    browser_prerequisites()
    python = require(env_name)
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    holder = tempfile.TemporaryDirectory(prefix="lora-scripts-tab-")
    base = Path(holder.name)
    models, home, lora_dir = base / "models", base / "home", base / "Lora"
    build_tiny_sd(models, single_file=True)
    images = sorted(make_tiny_dataset(base / "photos", n=4, size=64, sidecars=False).glob("*.png"))
    captioned = make_tiny_dataset(base / "captioned", n=4, size=64)
    captioners = base / "captioners"
    make_tagger_dir(captioners / "wd14", SHAPE_TAGS)
    env = {**os.environ, "LORA_SCRIPTS_CAPTIONERS": str(captioners), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "start", "--lora-dir", str(lora_dir)],
                   check=True, env=env, timeout=120)
    port = free_port()
    ui_log = open(base / "ui.log", "wb")
    ui = subprocess.Popen([str(python), str(ROOT / "daemon"), "--home", str(home), "ui", "--port", str(port),
                           "--checkpoints", str(models), "--lora-dir", str(lora_dir)],
                          cwd=str(base), env=env, stdout=ui_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "lora-scripts/v1/live", timeout=2).read()
                break
            except OSError:
                if ui.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the tab did not start:\n" + (base / "ui.log").read_text(errors="replace"))
                time.sleep(0.5)
        yield {"url": url, "home": home, "lora_dir": lora_dir, "images": images, "captioned": captioned,
               "base": base}
    finally:
        ui.terminate()
        ui.wait(timeout=30)
        ui_log.close()
        subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "stop"], env=env, timeout=120)
        holder.cleanup()


@pytest.fixture(scope="module")
def world():
    """The tab on gradio 3.41.2, as A1111 1.10 serves it."""
    with serve_tab(".venv-gradio3") as served:
        yield served


@pytest.fixture
def page(browser, request):
    """A fresh page; when the test fails, its last screen is saved next to the other screenshots."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:  # the call's report is logged before fixtures tear down
        shot(page, f"failed_{request.node.name}")
    page.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def section(page, label: str) -> None:
    page.locator("#lora_scripts_sections .tab-nav button", has_text=label).click()


def daemon_client(world):
    from lora_daemon.client import DaemonClient

    return DaemonClient(home=world["home"], timeout=10)


def refuse_a_learning_rate_of_minus_one(page) -> None:
    """Train section: learning rate -1, Start; the engine's message appears next to the field."""
    section(page, "Train")
    page.locator("#lora_scripts_learning_rate input").fill("-1")
    page.locator("#lora_scripts_start").click()
    error = page.locator("#lora_scripts_err_learning_rate").first  # gradio 3 repeats an HTML block's id inside
    error.get_by_text("must be > 0").wait_for(timeout=60_000)
    assert "training.learning_rate: must be > 0, got -1.0" in error.inner_text()
    assert "Nothing was queued" in page.locator("#lora_scripts_train_status").first.inner_text()


def runs_section_shows_no_hidden_plumbing(page) -> None:
    """The run id box the JS writes into is in the page but takes no space: only its button shows."""
    section(page, "Runs")
    assert page.locator("#lora_scripts_selected_run textarea, #lora_scripts_selected_run input").count() == 1
    assert page.locator("#lora_scripts_selected_run_box").is_hidden()
    button = page.locator("#lora_scripts_load_run_config").bounding_box()
    row = page.locator("#lora_scripts_load_run_config").locator("xpath=..").bounding_box()
    assert button and row and row["height"] <= button["height"] + 2


def start_a_run(page, output_name: str, steps: int) -> str:
    """Train section: the tiny model at 64 px, batch 1, ``steps`` steps; Start; returns the queued run's id."""
    section(page, "Train")
    page.locator("#lora_scripts_output_name input, #lora_scripts_output_name textarea").fill(output_name)
    page.locator("#lora_scripts_resolution input").fill("64")
    page.locator("#lora_scripts_batch_size input").fill("1")
    page.locator("#lora_scripts_max_train_steps input").fill(str(steps))
    page.locator("#lora_scripts_start").click()
    status = page.locator("#lora_scripts_train_status").first
    status.get_by_text("Queued run").wait_for(timeout=60_000)
    return re.search(r"Queued run (\S+)", status.inner_text()).group(1)


def test_a_learning_rate_of_minus_one_is_refused_next_to_its_field_and_queues_nothing(world, page):
    page.goto(world["url"])
    refuse_a_learning_rate_of_minus_one(page)
    shot(page, "01_bad_learning_rate")
    assert daemon_client(world).list_runs(all=True) == []
    runs_section_shows_no_hidden_plumbing(page)
    shot(page, "01_runs_section_empty")


def drop_files(page, files: list[str], attempts: int = 3) -> None:
    """Drop files on the upload box and wait until each has finished uploading, as a person would before pressing
    Add (pressing early is refused: "still uploading?"). gradio 3.41's upload now and then never finishes in
    headless Chromium (the list keeps saying "Uploading..."); a person then clears the box and drops the files again."""
    box = page.locator("#lora_scripts_upload")
    for attempt in range(1, attempts + 1):
        box.locator("input[type=file]").set_input_files(files)
        try:
            box.get_by_text(Path(files[0]).name).first.wait_for(timeout=30_000)
            box.get_by_text("Uploading...").first.wait_for(state="detached", timeout=30_000)
            return
        except PlaywrightTimeoutError:
            if attempt == attempts:
                raise
            box.locator("button").last.click()  # the box's clear (×) button
            box.locator("input[type=file]").wait_for(state="attached", timeout=10_000)


def test_a_person_trains_a_lora_from_the_tab_and_finds_it_in_the_lora_folder(world, page):
    page.goto(world["url"])
    client = daemon_client(world)

    # Dataset: drop four images, auto-caption them, fix one caption by hand
    page.locator("#lora_scripts_dataset_name input, #lora_scripts_dataset_name textarea").fill("shapes")
    drop_files(page, [str(p) for p in world["images"]])
    page.locator("#lora_scripts_add_files").click()
    page.locator("#lora_scripts_dataset_status").get_by_text("saved 4 file(s)").wait_for(timeout=60_000)
    folder = page.locator("#lora_scripts_dataset_dir textarea, #lora_scripts_dataset_dir input").input_value()
    assert Path(folder) == world["home"] / "datasets" / "shapes"
    page.locator("#lora_scripts_autocaption").click()
    page.locator("#lora_scripts_dataset_status").get_by_text("Captioned with wd14").wait_for(timeout=180_000)
    captions = {e["file"]: e["caption"] for e in client.captions_get(folder)["entries"]}
    assert len(captions) == 4 and all("simple background" in c for c in captions.values())
    page.locator("#lora_scripts_gallery .thumbnail-item").first.click()
    caption_box = page.locator("#lora_scripts_caption_text textarea")
    page.wait_for_function("() => document.querySelector('#lora_scripts_caption_text textarea').value !== ''")
    edited_file = page.locator("#lora_scripts_caption_file textarea, #lora_scripts_caption_file input").input_value()
    caption_box.fill("my_style, a shape drawn by hand")
    page.locator("#lora_scripts_save_caption").click()
    page.locator("#lora_scripts_dataset_status").get_by_text(f"Saved the caption of {edited_file}").wait_for()
    assert {e["file"]: e["caption"] for e in client.captions_get(folder)["entries"]}[edited_file] == \
        "my_style, a shape drawn by hand"
    shot(page, "02_dataset_captioned")

    # Train: tiny model at 64 px, long enough to watch and to reload the page mid-run
    run_id = start_a_run(page, "my_style", steps=300)
    shot(page, "03_train_form")

    # Runs: progress and the loss curve move while it trains
    section(page, "Runs")
    row = page.locator(f'#lora_scripts_runs_table tr[data-run-id="{run_id}"]')
    row.and_(page.locator('[data-status="running"]')).wait_for(timeout=180_000)
    curve = page.locator("#lora_scripts_loss_curve")
    page.wait_for_function("() => Number(document.querySelector('#lora_scripts_loss_curve')?.dataset.points) >= 3",
                           timeout=180_000)
    first = int(curve.get_attribute("data-points"))
    page.wait_for_function(f"() => Number(document.querySelector('#lora_scripts_loss_curve')?.dataset.points) > {first}",
                           timeout=120_000)
    shot(page, "04_run_live")

    # Reload mid-run: the page re-attaches to the running job
    assert client.get(run_id)["status"] == "running", "the run ended before the reload; raise max_train_steps"
    page.reload()
    section(page, "Runs")
    page.locator(f'#lora_scripts_run_details[data-run-id="{run_id}"]').wait_for(timeout=30_000)
    page.wait_for_function("() => Number(document.querySelector('#lora_scripts_loss_curve')?.dataset.points) >= 2",
                           timeout=60_000)
    shot(page, "05_after_reload")

    # Finished: the LoRA is in the Lora folder and the toast tells what to type
    row.and_(page.locator('[data-status="finished"]')).wait_for(timeout=600_000)
    toast = page.locator(".lora-scripts-toast", has_text="<lora:my_style:0.8>")
    toast.wait_for(timeout=60_000)
    shot(page, "06_finished")
    run = client.get(run_id)
    assert Path(run["published_file"]) == world["lora_dir"] / "my_style.safetensors"
    assert (world["lora_dir"] / "my_style.safetensors").stat().st_size > 0
