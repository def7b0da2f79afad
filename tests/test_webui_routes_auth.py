"""The REST routes are as protected as the WebUI's own API: a real gradio app under --api-auth and --gradio-auth.

The extension is served the way A1111 (gradio 3.41.2) and Forge (gradio 4.40.0) serve it, and this test talks to it
over HTTP on 127.0.0.1 like the tab's JavaScript or a script would: no credentials and wrong ones are refused, the
API user's HTTP Basic credentials and the browser's gradio login cookie are let in.
"""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookies import SimpleCookie
from pathlib import Path

import pytest

from prepare_webui_envs import ENVS, require

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "webui_stub" / "serve_like_webui.py"
API_USER, GRADIO_USER = ("alice", "s3cret"), ("bob", "hunter2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k: v for k, v in e.headers.items()}, e.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def login_cookie(url: str, user: str, password: str) -> str:
    """Log in through gradio's own /login form; returns the Cookie header a browser would send back."""
    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url + "login", data=urllib.parse.urlencode(
        {"username": user, "password": password}).encode(), method="POST")
    try:
        with opener.open(request, timeout=10) as r:
            set_cookies = r.headers.get_all("set-cookie") or []
    except urllib.error.HTTPError as e:
        set_cookies = e.headers.get_all("set-cookie") or []
    jar = SimpleCookie()
    for header in set_cookies:
        jar.load(header)
    return "; ".join(f"{name}={morsel.value}" for name, morsel in jar.items())


@pytest.fixture(params=list(ENVS))
def webui(request, tmp_path):
    python = require(request.param)
    (tmp_path / "webui" / "models" / "Stable-diffusion").mkdir(parents=True)
    env = {**os.environ, "WEBUI_STUB_ROOT": str(tmp_path / "webui"), "LORA_DAEMON_HOME": str(tmp_path / "home"),
           "PYTHONPATH": "", "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    log = open(tmp_path / "webui.log", "wb")
    proc = subprocess.Popen([str(python), str(SERVER), str(ROOT), "--port", str(port),
                             "--api-auth", ":".join(API_USER), "--gradio-auth", ":".join(GRADIO_USER)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while "READY" not in (tmp_path / "webui.log").read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "webui.log").read_text()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_routes_refuse_strangers_and_let_in_the_api_user_and_the_logged_in_browser(webui):
    live = webui + "lora-scripts/v1/live"
    status, headers, _ = http(live)
    assert status == 401 and {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Basic"
    assert http(live, headers=basic(API_USER[0], "wrong"))[0] == 401
    assert http(live, headers=basic(*GRADIO_USER))[0] == 401  # a UI login is not an API user
    assert http(live, headers={"Cookie": "access-token=forged"})[0] == 401
    submit = http(webui + "lora-scripts/v1/runs", data=b'{"config": {}}',
                  headers={"Content-Type": "application/json"})
    assert submit[0] == 401

    status, _, body = http(live, headers=basic(*API_USER))
    assert status == 200 and b'"daemon"' in body

    assert login_cookie(webui, GRADIO_USER[0], "wrong") == ""
    cookie = login_cookie(webui, *GRADIO_USER)
    assert "access-token" in cookie
    status, _, body = http(live, headers={"Cookie": cookie})
    assert status == 200 and b'"daemon"' in body
