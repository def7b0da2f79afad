"""Two people share one tab behind a login (issue 16, "Done when"): each signs in, starts a run from the Train form,
and sees only their own run in the Runs table — in a real headless Chromium, on gradio 3.41 (A1111) and 4.40 (Forge).

Real parts: the daemon in the engine's Python with a users.yaml in its home, the standalone tab served with gradio's
own login (``auth=`` on launch, what ``--gradio-auth`` does in the WebUI), the tab's JavaScript polling the REST
routes with the browser's login cookie, tiny runs. Screenshots land in test-artifacts/browser/.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from prepare_webui_envs import CHROMIUM, ENVS, require
from test_browser_tab import CHROMIUM_ARGS, ROOT, browser_prerequisites, free_port, section, shot

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PEOPLE = {"alice": "wonderland", "bob": "builder"}
USERS_YAML = "roles:\n  member: {queued_runs: 3, max_steps: 100000}\nusers:\n  alice: member\n  bob: member\n"


@contextlib.contextmanager
def shared_tab(env_name: str):
    """A daemon whose home holds users.yaml, and the tab from ``env_name`` behind a two-person login."""
    browser_prerequisites()
    python = require(env_name)
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    holder = tempfile.TemporaryDirectory(prefix="lora-scripts-users-")
    base = Path(holder.name)
    models, home, lora_dir = base / "models", base / "home", base / "Lora"
    build_tiny_sd(models, single_file=True)
    captioned = make_tiny_dataset(base / "captioned", n=4, size=64)
    home.mkdir()
    (home / "users.yaml").write_text(USERS_YAML, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "start", "--lora-dir",
                    str(lora_dir), "--gpus", "cpu"], check=True, env=env, timeout=120)
    port = free_port()
    ui_log = open(base / "ui.log", "wb")
    auth = ",".join(f"{user}:{password}" for user, password in PEOPLE.items())
    ui = subprocess.Popen([str(python), str(ROOT / "daemon"), "--home", str(home), "ui", "--port", str(port),
                           "--checkpoints", str(models), "--lora-dir", str(lora_dir), "--auth", auth],
                          cwd=str(base), env=env, stdout=ui_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "login_check", timeout=2).read()
            except urllib.error.HTTPError:
                break  # gradio answers (401: nobody signed in yet)
            except OSError:
                if ui.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the tab did not start:\n" + (base / "ui.log").read_text(errors="replace"))
                time.sleep(0.5)
            else:
                break
        yield {"url": url, "home": home, "lora_dir": lora_dir, "captioned": captioned}
    finally:
        ui.terminate()
        ui.wait(timeout=30)
        ui_log.close()
        stop_as_token_holder(home)
        holder.cleanup()


def stop_as_token_holder(home: Path) -> None:
    """Stop the shared daemon as the token holder itself (no user: an admin). `lora-daemon stop` would send the OS
    user, whom this users.yaml does not list, and be refused — the daemon then outlived the test."""
    from lora_daemon.client import DaemonClient

    pid = json.loads((home / "daemon.json").read_text())["pid"]
    DaemonClient(home=str(home), timeout=30).shutdown()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"the daemon (pid {pid}) did not stop within 60 s")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def sign_in(browser, url: str, user: str):
    """A browser of one's own (its own cookies), signed in through gradio's login page as a person would."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.locator("input[type=text], input:not([type])").first.fill(user)
    page.locator("input[type=password]").first.fill(PEOPLE[user])
    page.get_by_role("button", name=re.compile("login", re.I)).first.click()
    page.locator("#lora_scripts_sections").wait_for(timeout=120_000)
    return context, page


def start_run(page, dataset: Path, output_name: str) -> str:
    """Dataset folder, then the Train form at 64 px for a long run; Start; the queued run's id."""
    section(page, "Dataset")
    page.locator("#lora_scripts_dataset_dir textarea, #lora_scripts_dataset_dir input").fill(str(dataset))
    section(page, "Train")
    for key, value in (("output_name", output_name), ("resolution", "64"), ("batch_size", "1"),
                       ("max_train_steps", "100000")):
        page.locator(f"#lora_scripts_{key} input, #lora_scripts_{key} textarea").first.fill(value)
    page.locator("#lora_scripts_start").click()
    status = page.locator("#lora_scripts_train_status").first
    status.get_by_text("Queued run").wait_for(timeout=60_000)
    return re.search(r"Queued run (\S+)", status.inner_text()).group(1)


@pytest.mark.parametrize("env_name", list(ENVS))
def test_two_signed_in_users_each_see_only_their_own_runs(browser, env_name):
    label = "g3" if "3" in env_name else "g4"
    with shared_tab(env_name) as world:
        from lora_daemon.client import DaemonClient

        owner = DaemonClient(home=world["home"], timeout=10)  # the token holder: sees everyone's runs
        alice_ctx, alice = sign_in(browser, world["url"], "alice")
        bob_ctx, bob = sign_in(browser, world["url"], "bob")
        alice_run = bob_run = None
        try:
            alice_run = start_run(alice, world["captioned"], "alice_style")
            bob_run = start_run(bob, world["captioned"], "bob_style")
            runs = {r["id"]: r for r in owner.list_runs(all=True)}
            assert (runs[alice_run]["user"], runs[bob_run]["user"]) == ("alice", "bob")

            for page, mine, theirs, who in ((alice, alice_run, bob_run, "alice"), (bob, bob_run, alice_run, "bob")):
                section(page, "Runs")
                page.locator(f'#lora_scripts_runs_table tr[data-run-id="{mine}"]').wait_for(timeout=60_000)
                assert page.locator(f'#lora_scripts_runs_table tr[data-run-id="{theirs}"]').count() == 0
                table = page.locator("#lora_scripts_runs_table").inner_text()
                assert f"{who}_style" in table and ("bob_style" if who == "alice" else "alice_style") not in table
                shot(page, f"users_{label}_{who}_runs")
            # the routes answer each browser as its own user: another's run is not there, not even by id
            answer = bob.request.get(world["url"] + f"lora-scripts/v1/runs/{alice_run}")
            assert answer.status == 404, answer.text()
            who = bob.request.get(world["url"] + "lora-scripts/v1/whoami").json()
            assert (who["user"], who["role"], who["admin"]) == ("bob", "member", False)
            queue = bob.request.get(world["url"] + "lora-scripts/v1/queue").json()
            assert {r["id"] for r in queue["running"] + queue["queue"]} <= {bob_run, None}
            assert bob_run in {r["id"] for r in queue["running"] + queue["queue"]}
            # each run's folder is its user's
            assert Path(runs[alice_run]["run_dir"]).parent == world["home"] / "runs" / "alice"
            assert Path(runs[bob_run]["run_dir"]).parent == world["home"] / "runs" / "bob"
        finally:
            for run_id in (alice_run, bob_run):
                if run_id:
                    with contextlib.suppress(Exception):
                        owner.cancel(run_id)
            alice_ctx.close()
            bob_ctx.close()
