"""The GPU hand-off's "ask" question in a browser: the tab inside a WebUI-like app (the stub A1111 on gradio 3.41,
its settings saved with ``lora_scripts_gpu_handoff: ask``) shows "Run X wants the GPU: free the WebUI's VRAM now?"
while a real daemon trains on the WebUI's device; Free answers it, the Daemon section then says the model is off the
GPU, and "Reload the WebUI's model now" brings it back. (The stub records those calls and the lock; the stub tests in
test_webui_gpu_handoff.py check them. Here: what a person sees and clicks.)

A1111 injects every extension's ``javascript/*.js`` into its page; the stub has no such page builder, so the test
adds the tab's script to the page the same way, as a script tag.
"""
from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import pytest

from daemon_fixtures import daemon_factory, run_config  # noqa: F401  (fixtures)
from prepare_webui_envs import require
from test_browser_tab import ROOT, browser, browser_prerequisites, free_port, page, section, shot  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.browser]
SERVER = ROOT / "tests" / "webui_stub" / "serve_like_webui.py"


@pytest.fixture
def webui(daemon_factory, tmp_path):
    """The stub A1111 (gradio 3.41) serving the tab with the hand-off set to "ask", beside a real daemon."""
    browser_prerequisites()
    python = require(".venv-gradio3")
    daemon = daemon_factory()
    (tmp_path / "webui" / "models" / "Stable-diffusion").mkdir(parents=True)
    env = {**os.environ, "WEBUI_STUB_ROOT": str(tmp_path / "webui"), "LORA_DAEMON_HOME": str(daemon.home),
           "WEBUI_STUB_DEVICE_ID": "cpu", "PYTHONPATH": "", "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    log = open(tmp_path / "webui.log", "wb")
    proc = subprocess.Popen([str(python), str(SERVER), str(ROOT), "--port", str(port),
                             "--opt", "lora_scripts_gpu_handoff=ask"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=str(tmp_path))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "lora-scripts/v1/live", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the stub WebUI did not start:\n" +
                                         (tmp_path / "webui.log").read_text(errors="replace"))
                time.sleep(0.5)
        yield {"url": url, "daemon": daemon}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_ask_shows_the_question_free_answers_it_and_the_model_reloads_on_request(webui, page, tiny_sd, tiny_data):
    client = webui["daemon"].client(timeout=60)
    page.goto(webui["url"])
    page.add_script_tag(path=str(ROOT / "javascript" / "lora_scripts.js"))  # as A1111 injects extension scripts
    section(page, "Daemon")
    setting = page.locator("#lora_scripts_handoff_setting")
    setting.wait_for(timeout=60_000)
    assert setting.get_attribute("data-setting") == "ask" and "Settings → LoRA Training" in setting.inner_text()

    run = client.submit(run_config(tiny_sd, tiny_data, "wants_gpu", steps=100000))
    question = page.locator("#lora_scripts_handoff_question")
    question.wait_for(timeout=300_000)
    assert "Run wants_gpu wants the GPU: free the WebUI's VRAM now?" in question.inner_text()
    assert question.get_attribute("data-run-id") == run["id"]
    shot(page, "handoff_01_asked")

    question.locator('button[data-handoff="free"]').click()
    question.wait_for(state="detached", timeout=60_000)
    page.locator('#lora_scripts_handoff_setting[data-freed="true"]').wait_for(timeout=60_000)
    assert "off the GPU" in page.locator("#lora_scripts_handoff_setting").inner_text()
    shot(page, "handoff_02_freed")

    page.locator("#lora_scripts_handoff_reload").click()
    page.locator("#lora_scripts_daemon_result").first.get_by_text("back on its GPU").wait_for(timeout=60_000)
    page.locator('#lora_scripts_handoff_setting[data-freed="false"]').wait_for(timeout=60_000)
    shot(page, "handoff_03_reloaded")
    client.cancel(run["id"])
