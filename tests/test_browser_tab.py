"""A person trains a LoRA from the standalone tab (gradio 3.41.2, as in A1111), in a real headless Chromium.

Real parts throughout: the daemon runs in the engine's Python, the tab in the `.venv-gradio3` environment, and the
run trains the tiny SD model at 64 px. Screenshots land in test-artifacts/browser/ for a human to look at.
"""
from __future__ import annotations

import contextlib
import json
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
               "base": base, "models": models}
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
    # no sample prompts were asked for, yet the card has a picture (rendered at the end) and names its base model
    assert Path(run["preview_file"]).name == "preview.png" and (world["lora_dir"] / "my_style.png").is_file()
    sidecar = json.loads((world["lora_dir"] / "my_style.json").read_text(encoding="utf-8"))
    assert sidecar["description"] == "trained by lora-scripts on tiny-sd1.safetensors"


# ---------------------------------------------------------------- the first hour (issue 12), in both gradio versions
TIMINGS = ARTIFACTS / "start_to_queued.jsonl"
WATCH_PAGE = """() => {
    // gradio keeps its status overlay in the page and hides it with opacity 0: count only what a person can see
    const seen = (el) => { for (let e = el; e && e.nodeType === 1; e = e.parentElement) {
        const st = getComputedStyle(e); if (st.display === 'none' || st.visibility === 'hidden' || Number(st.opacity) === 0) return false; }
        return el.getClientRects().length > 0; };
    window.__loraSeen = {processing: 0, checking: 0, queuing: 0};
    const look = () => {
        const hits = document.evaluate("//*[contains(text(), 'processing')]", document.body, null,
                                       XPathResult.ORDERED_NODE_SNAPSHOT_TYPE, null);
        for (let i = 0; i < hits.snapshotLength; i++) {
            const hit = hits.snapshotItem(i);
            if (/processing\\s*\\|/.test(hit.textContent) && seen(hit)) {
                window.__loraSeen.processing += 1;
                const owner = hit.closest('[id]');
                window.__loraSeen.where = owner ? owner.id : hit.outerHTML.slice(0, 200);
            }
        }
        const status = document.querySelector('#lora_scripts_train_status');
        const said = status ? status.innerText : '';
        if (said.includes('checking…')) window.__loraSeen.checking += 1;
        if (said.includes('queuing…')) window.__loraSeen.queuing += 1;
    };
    window.__loraObserver && window.__loraObserver.disconnect();
    window.__loraObserver = new MutationObserver(look);
    window.__loraObserver.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def field(page, key: str):
    return page.locator(f"#lora_scripts_{key} input, #lora_scripts_{key} textarea").first


def dropdown_offers(page, elem_id: str, name: str, within_s: float = 120.0) -> None:
    """Open a dropdown like a person and look for ``name`` among its options, opening it again now and then while
    the page's load events (which fill the list) may still be on their way on a busy machine; close it again."""
    deadline = time.monotonic() + within_s
    while True:
        page.locator(f"#{elem_id} input").first.click()
        try:
            page.locator(f"#{elem_id} ul.options li", has_text=name).first.wait_for(timeout=5_000)
            break
        except PlaywrightTimeoutError:
            if time.monotonic() > deadline:
                raise
        finally:
            page.keyboard.press("Escape")
            page.locator("#lora_scripts_preset_info, body").first.click(position={"x": 1, "y": 1})


def base_model_list_is_live(page, world) -> None:
    """A model added after the tab started is offered on a fresh page; one added later appears on Refresh."""
    models = world["models"]
    tiny = next(models.glob("tiny-sd1*.safetensors"))
    os.link(tiny, models / "added_before_load.safetensors")
    page.goto(world["url"])
    section(page, "Train")
    dropdown_offers(page, "lora_scripts_base_model", "added_before_load.safetensors")
    os.link(tiny, models / "added_later.safetensors")
    page.locator("#lora_scripts_refresh_models").click()
    dropdown_offers(page, "lora_scripts_base_model", "added_later.safetensors")
    assert "tiny-sd1.safetensors" in page.locator("#lora_scripts_base_model input").first.input_value()


def validate_shows_one_status_line(page) -> None:
    """Validate says "checking…" in the status line and no field shows gradio's "processing | 1.2s" overlay."""
    page.evaluate(WATCH_PAGE)
    page.locator("#lora_scripts_validate").click()
    page.locator("#lora_scripts_train_status").first.get_by_text("The settings are valid.").wait_for(timeout=60_000)
    seen = page.evaluate("() => { window.__loraObserver.disconnect(); return window.__loraSeen; }")
    assert seen["checking"] >= 1 and seen["processing"] == 0, seen


def empty_dataset_is_refused(page, world) -> None:
    """An empty folder: Check says there are no images (an error), Start refuses it; nothing is queued."""
    empty = world["base"] / "empty_dataset"
    empty.mkdir(exist_ok=True)
    section(page, "Dataset")
    field(page, "dataset_dir").fill(str(empty))
    page.locator("#lora_scripts_check").click()
    report = page.locator("#lora_scripts_check_report").first
    report.get_by_text("no_images").wait_for(timeout=120_000)
    assert "0 readable images" in report.inner_text() and "lora-scripts-error" in report.inner_html()
    section(page, "Train")
    page.locator("#lora_scripts_start").click()
    page.locator("#lora_scripts_train_errors").first.get_by_text("holds no images").wait_for(timeout=60_000)
    assert "Nothing was queued" in page.locator("#lora_scripts_train_status").first.inner_text()


def check_uses_the_train_resolution(page, world) -> None:
    """The 64 px dataset checked at the Train section's 64 px: no false "too_small" warnings."""
    section(page, "Train")
    field(page, "resolution").fill("64")
    section(page, "Dataset")
    field(page, "dataset_dir").fill(str(world["captioned"]))
    page.locator("#lora_scripts_check").click()
    report = page.locator("#lora_scripts_check_report").first
    report.get_by_text("4 readable images").wait_for(timeout=120_000)
    assert "too_small" not in report.inner_text() and "0 warnings" in report.inner_text()


def start_is_quick_and_a_second_click_queues_no_twin(page, world, label: str, output_name: str) -> str:
    """Start answers "Queued run …" without waiting for a memory plan (the time is printed and kept in
    test-artifacts/browser/start_to_queued.jsonl, not asserted); pressing Start again while the run is pending
    queues nothing new."""
    section(page, "Train")
    field(page, "output_name").fill(output_name)
    field(page, "resolution").fill("64")
    field(page, "batch_size").fill("1")
    field(page, "max_train_steps").fill("6")
    page.locator("#lora_scripts_advanced").get_by_text("Advanced").first.click()
    field(page, "sample_prompts").fill("a red circle --w 64 --h 64 --s 30\na blue square --w 64 --h 64 --s 30")
    field(page, "sample_every_n_steps").fill("4")
    status = page.locator("#lora_scripts_train_status").first
    started = time.perf_counter()  # no page observer now: it would slow the browser and the figure
    page.locator("#lora_scripts_start").click()
    status.get_by_text("Queued run").wait_for(timeout=60_000)
    took = time.perf_counter() - started
    print(f"\nStart → 'Queued' in the browser ({label}): {took:.2f} s", flush=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(TIMINGS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"gradio": label, "start_to_queued_s": round(took, 3), "time": time.time()}) + "\n")
    run_id = re.search(r"Queued run (\S+)", status.inner_text()).group(1)
    page.evaluate(WATCH_PAGE)
    page.locator("#lora_scripts_start").click()
    status.get_by_text(f"run {run_id} ({output_name}) has these settings").wait_for(timeout=60_000)
    seen = page.evaluate("() => { window.__loraObserver.disconnect(); return window.__loraSeen; }")
    assert seen["queuing"] >= 1 and seen["processing"] == 0, seen  # Start, too: one status line, no overlay
    runs = [r for r in daemon_client(world).list_runs(all=True) if r["name"] == output_name]
    assert [r["id"] for r in runs] == [run_id]
    return run_id


def runs_row_shows_plan_eta_speed_sampling_and_an_axed_curve(page, world, run_id: str) -> None:
    """The run's row: the memory plan worked out in the run, an ETA and it/s from the step events, "sampling
    prompt i/n, step j/m" while samples render; the loss curve has step/loss axes and a smoothed line."""
    section(page, "Runs")
    row = page.locator(f'#lora_scripts_runs_table tr[data-run-id="{run_id}"]')
    row.locator(".lora-scripts-plan", has_text="fits").wait_for(timeout=240_000)
    # while the samples render: the phase in words, and the ETA and speed the last step event gave
    seen = page.wait_for_function(
        """(id) => { const r = document.querySelector(`#lora_scripts_runs_table tr[data-run-id="${id}"]`);
                     const phase = r && r.querySelector('.lora-scripts-phase');
                     const eta = r && r.querySelector('.lora-scripts-eta').innerText.trim();
                     const its = r && r.querySelector('.lora-scripts-its').innerText.trim();
                     return phase && phase.innerText.includes('sampling prompt') && eta && its
                            && {phase: phase.innerText, eta, its}; }""", arg=run_id, timeout=300_000).json_value()
    shot(page, f"first_hour_sampling_{run_id}")
    phase, eta, speed = seen["phase"], seen["eta"], seen["its"]
    assert re.match(r"sampling prompt [12]/2, step \d+/30", phase), phase
    assert re.fullmatch(r"(\d+h )?(\d+m )?\d+s", eta), eta
    assert float(speed) > 0
    page.wait_for_function("() => Number(document.querySelector('#lora_scripts_loss_curve')?.dataset.points) >= 4",
                           timeout=240_000)
    curve = page.locator("#lora_scripts_loss_curve")
    assert curve.locator("text.lora-scripts-axis-title").all_text_contents() == ["step", "loss"]
    assert curve.locator("polyline.lora-scripts-loss-raw").count() == 1
    assert curve.locator("polyline.lora-scripts-loss-smoothed").count() == 1
    assert curve.locator("text.lora-scripts-tick").count() >= 3
    shot(page, f"first_hour_running_{run_id}")


def daemon_panel_tells_the_truth(page, world) -> None:
    section(page, "Daemon")
    where = page.locator("#lora_scripts_publish_dir")
    where.wait_for(timeout=30_000)
    assert str(world["lora_dir"]) in where.inner_text()
    captioner = page.locator(".lora-scripts-captioner[data-name='wd14']")
    captioner.wait_for(timeout=60_000)
    assert str(world["base"] / "captioners" / "wd14") in captioner.inner_text()


def finished_run_has_a_card_preview_and_names_its_base_model(page, world, run_id: str, output_name: str) -> None:
    section(page, "Runs")
    page.locator(f'#lora_scripts_runs_table tr[data-run-id="{run_id}"][data-status="finished"]').wait_for(
        timeout=600_000)
    run = daemon_client(world).get(run_id)
    assert Path(run["preview_file"]).name == "step00000004_01.png"  # the last sample
    assert (world["lora_dir"] / f"{output_name}.png").read_bytes() == Path(run["preview_file"]).read_bytes()
    sidecar = json.loads((world["lora_dir"] / f"{output_name}.json").read_text(encoding="utf-8"))
    assert sidecar["description"] == "trained by lora-scripts on tiny-sd1.safetensors"
    log = daemon_client(world).logs(run_id, tail=400)
    assert any("samples at step 4: 2 image(s) in" in line for line in log)


def the_first_hour(page, world, label: str) -> None:
    """Issue 12's first hour in the tab: every click answers at once and nothing looks hung."""
    base_model_list_is_live(page, world)
    empty_dataset_is_refused(page, world)
    check_uses_the_train_resolution(page, world)
    section(page, "Train")
    validate_shows_one_status_line(page)
    daemon_panel_tells_the_truth(page, world)
    name = f"first_hour_{label.replace('.', '_')}"
    run_id = start_is_quick_and_a_second_click_queues_no_twin(page, world, label, name)
    runs_row_shows_plan_eta_speed_sampling_and_an_axed_curve(page, world, run_id)
    finished_run_has_a_card_preview_and_names_its_base_model(page, world, run_id, name)


def test_the_first_hour_every_click_answers_at_once_and_nothing_looks_hung(world, page):
    the_first_hour(page, world, "gradio-3.41")
