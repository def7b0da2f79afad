"""REST routes under ``/lora-scripts/v1/``: what the tab's JavaScript polls, and an API for scripts.

Every route goes through `lora_daemon.client`, so the REST API, the tab and the CLI share one schema. Routes are plain
functions on an `APIRouter` with no pydantic models (bodies are read as JSON), which keeps them identical under
fastapi 0.94 + pydantic 1 (A1111) and fastapi 0.104 + pydantic 2 (Forge).

Protection mirrors the WebUI: when it runs with ``--api-auth`` the same HTTP Basic credentials are accepted, and
when it runs with ``--gradio-auth`` the browser's gradio login cookie is accepted too (that is how the tab's own
JavaScript gets in). Without either, the routes are as open as the WebUI itself.
"""
from __future__ import annotations

import base64
import binascii
import logging
import mimetypes
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..client import DaemonError, DaemonNotRunning

from . import lora_info
from . import render
from .completions import latest_completions
from .context import TabContext, signed_in
from .datasets import DatasetPathError, confined

log = logging.getLogger(__name__)

PREFIX = "/lora-scripts/v1"
SAMPLE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
# The run buttons of the Runs section; each is the `DaemonClient` method of the same name.
RUN_ACTIONS = ("cancel", "resume", "retry", "pause")  # POST /runs/{id}/pause: a user pause (reason "user")
RATE_ACTIONS = {"rate_up": "up", "rate_down": "down", "rate_clear": None}  # 👍/👎 in the Runs view (`rate`)
HTTP_STATUS = {"not_found": 404, "config_invalid": 422, "invalid_state": 409, "bad_request": 400,
               "unauthorized": 403, "unavailable": 503, "forbidden": 403}


@dataclass
class AuthPolicy:
    """Who may call the routes: HTTP Basic users (``--api-auth``) and/or holders of a gradio login cookie."""

    users: dict[str, str] = field(default_factory=dict)
    gradio_tokens: Optional[Callable[[], dict]] = None  # the gradio app's live token table, when it has a login

    @property
    def required(self) -> bool:
        return bool(self.users) or self.gradio_tokens is not None

    def allows(self, request: Request) -> bool:
        return not self.required or self.user_of(request) is not None

    def user_of(self, request: Request) -> Optional[str]:
        """Who is calling: the ``--api-auth`` user of valid HTTP Basic credentials, else the user the gradio login
        cookie belongs to (gradio's own token table: ``access-token``/``-unsecure``, with gradio 4's app suffix);
        None when nobody is (or, without a login, need be) signed in. Sent to the daemon with each request."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic ") and self.users:
            try:
                user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            expected = self.users.get(user)
            if expected is not None and secrets.compare_digest(expected, password):
                return user
        if self.gradio_tokens is not None:
            tokens = self.gradio_tokens() or {}
            for name, value in request.cookies.items():
                if name.startswith("access-token") and value in tokens:
                    return tokens[value]
        return None


def parse_credentials(text: Optional[str]) -> dict[str, str]:
    """``"user:pass,user2:pass2"`` (the WebUI's ``--api-auth``/``--gradio-auth`` format) → {user: password}."""
    users = {}
    for pair in (text or "").split(","):
        if ":" in pair:
            user, _, password = pair.strip().partition(":")
            users[user] = password
    return users


def _error(e: Exception) -> JSONResponse:
    if isinstance(e, DaemonNotRunning):
        return JSONResponse({"error": {"code": "unavailable", "message": str(e)}}, status_code=503)
    if isinstance(e, DaemonError):
        return JSONResponse({"error": {"code": e.code, "message": e.message, "details": e.details}},
                            status_code=HTTP_STATUS.get(e.code, 400))
    raise e


def run_view(ctx: TabContext, run_id: str, log_tail: int = 200, metrics_since: int = 0) -> dict:
    """One run as the Runs section shows it: record, log tail, new metrics and its sample images — or, for a text
    run, its latest sample completion per prompt."""
    client = ctx.client()
    run = client.get(run_id)
    samples = []
    run_dir = Path(run.get("run_dir") or "")
    if run.get("run_dir") and run_dir.is_dir():
        for path in sorted(run_dir.rglob("*")):
            if path.suffix.lower() in SAMPLE_EXTS and "sample" in path.relative_to(run_dir).as_posix():
                samples.append(path.relative_to(run_dir).as_posix())
    view = {"run": run, "log": client.logs(run["id"], tail=log_tail),
            "metrics": client.metrics(run["id"], since_step=metrics_since), "samples": samples[-24:]}
    if run.get("kind") in ("image", "text"):  # training health warnings, each with its advice
        view["health"] = client.run_events(run["id"], last=50, types=["run.health"])
        view["health_html"] = render.health_list(view["health"])
    if run.get("kind") == "text":
        view["completions"] = latest_completions(run_dir) if run_dir.is_dir() else []
    view.update(file_views(ctx, run))
    return view


def file_views(ctx: TabContext, run: dict) -> dict:
    """A finished run's file as the Runs view shows it: the inspect summary of the LoRA it published (or a
    toolbox job wrote), and a toolbox job's report (errors, retained energy). Inspect answers are cached per file
    state, so polling a finished run asks the daemon once."""
    if run.get("status") != "finished":
        return {}
    out: dict[str, str] = {}
    tool = run.get("kind") == "tools"
    command = (run.get("config") or {}).get("command") if tool else None
    if tool:
        report = lora_info.report_from_log(ctx.client().logs(run["id"], tail=lora_info.REPORT_TAIL))
        if report:
            out["report_html"] = lora_info.report_html(report)
    target = run.get("output_file") if tool else run.get("published_file")
    if target and str(target).endswith(".safetensors") and command != "bake":
        out["inspect_html"] = lora_info.CACHE.summary_html(ctx.client, str(target), Path(str(target)))
    return out


def live_view(ctx: TabContext, since: int, run_id: Optional[str], metrics_since: int) -> dict:
    """Everything one poll of the tab needs, in one request: daemon status, runs, the selected run, new LoRAs."""
    view: dict[str, Any] = {"loras": ctx.feed.since(since), "lora_dir": str(ctx.lora_dir())}
    if ctx.handoff is not None:  # inside a WebUI: the GPU hand-off's setting, and its question when it has one
        view["handoff"] = ctx.handoff.view()
    if ctx.setup is not None:
        view["setup"] = {"status": ctx.setup.status}
    try:
        client = ctx.client()
        view["daemon"] = {**client.status(), "up": True}
        view["runs"] = client.list_runs(all=True)
        if run_id:
            view["selected"] = run_view(ctx, run_id, metrics_since=metrics_since)
    except DaemonNotRunning:
        view["daemon"] = {"up": False, "message": ctx.start_advice()}
        view["runs"] = []
    except DaemonError as e:
        view["daemon"] = view.get("daemon") or {"up": False}
        view["error"] = {"code": e.code, "message": e.message}
    return view


def make_router(ctx: TabContext, auth: AuthPolicy) -> APIRouter:
    """The routes, bound to one tab context; the WebUI and standalone mode include the same router."""

    def guard(request: Request) -> None:
        if not auth.allows(request):
            raise HTTPException(status_code=401, detail="Not authenticated",
                                headers={"WWW-Authenticate": "Basic"})

    router = APIRouter(prefix=PREFIX, dependencies=[Depends(guard)])

    def call(request: Request, fn: Callable[[], Any]) -> Any:
        """`fn` run as the caller (`AuthPolicy.user_of`): a shared daemon shows each user only their own runs."""
        try:
            with signed_in(auth.user_of(request)):
                return fn()
        except (DaemonNotRunning, DaemonError) as e:
            return _error(e)

    @router.get("/status")
    def status(request: Request):
        return call(request, lambda: ctx.client().status())

    @router.get("/live")
    def live(request: Request, since: int = -1, run: Optional[str] = None, metrics_since: int = 0):
        with signed_in(auth.user_of(request)):
            return live_view(ctx, since, run, metrics_since)

    @router.get("/runs")
    def runs(request: Request, all: bool = False):
        return call(request, lambda: {"runs": ctx.client().list_runs(all=all)})

    @router.post("/runs")
    async def submit(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"code": "bad_json", "message": "body: must be JSON"}}, status_code=400)
        if not isinstance(body, dict) or "config" not in body:
            return JSONResponse({"error": {"code": "bad_request", "message": "body: give {\"config\": {...}}"}},
                                status_code=400)
        extra = {k: body[k] for k in ("priority", "name", "lora_dir") if body.get(k) is not None}
        extra.setdefault("lora_dir", str(ctx.lora_dir()))
        return await run_in_threadpool(call, request, lambda: ctx.client().submit(body["config"], **extra))

    @router.get("/runs/{run_id}")
    def get_run(request: Request, run_id: str, log_tail: int = 200, metrics_since: int = 0):
        return call(request, lambda: run_view(ctx, run_id, log_tail, metrics_since))

    @router.get("/runs/{run_id}/log")
    def run_log(request: Request, run_id: str, tail: int = 200):
        return call(request, lambda: {"lines": ctx.client().logs(run_id, tail=tail)})

    @router.get("/runs/{run_id}/metrics")
    def run_metrics(request: Request, run_id: str, since_step: int = 0):
        return call(request, lambda: {"metrics": ctx.client().metrics(run_id, since_step=since_step)})

    @router.post("/recommend")
    async def recommend(request: Request):
        """Recommended settings for a dataset folder: body {folder, base_model?, kind?, optimizer?}."""
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"code": "bad_json", "message": "body: must be JSON"}}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("folder"), str):
            return JSONResponse({"error": {"code": "bad_request", "message": "body: give {\"folder\": \"...\"}"}},
                                status_code=400)
        args = {k: body.get(k) for k in ("base_model", "kind", "optimizer")}
        return await run_in_threadpool(call, request, lambda: ctx.client().recommend(body["folder"], **args))

    @router.post("/runs/{run_id}/{action}")
    def run_action(request: Request, run_id: str, action: str):
        if action in RATE_ACTIONS:
            return call(request, lambda: ctx.client().rate(run_id, RATE_ACTIONS[action]))
        if action not in RUN_ACTIONS:
            return JSONResponse({"error": {"code": "not_found", "message": f"action: one of "
                                           f"{', '.join(RUN_ACTIONS)}, got {action!r}"}}, status_code=404)
        return call(request, lambda: getattr(ctx.client(), action)(run_id))

    @router.get("/runs/{run_id}/file")
    def run_file(request: Request, run_id: str, path: str):
        """A sample image of a run, confined to the run's folder."""
        result = call(request, lambda: ctx.client().get(run_id))
        if isinstance(result, JSONResponse):
            return result
        try:
            target = confined(Path(result["run_dir"]), path)
        except DatasetPathError as e:
            return JSONResponse({"error": {"code": "bad_request", "message": str(e)}}, status_code=400)
        if target.suffix.lower() not in SAMPLE_EXTS or not target.is_file():
            return JSONResponse({"error": {"code": "not_found", "message": f"{path}: no such sample"}},
                                status_code=404)
        return FileResponse(str(target), media_type=mimetypes.guess_type(target.name)[0])

    @router.post("/handoff/{answer}")
    def handoff(answer: str):
        """The GPU hand-off from the tab: "free" / "keep" answer its question, "reload" brings the WebUI's model
        back at once. Each waits for a generation in progress (the WebUI's generation lock)."""
        if ctx.handoff is None:
            return JSONResponse({"error": {"code": "unavailable", "message": "the GPU hand-off works inside "
                                           "A1111/Forge only"}}, status_code=503)
        try:
            return ctx.handoff.answer(answer)
        except ValueError as e:
            return JSONResponse({"error": {"code": "not_found", "message": str(e)}}, status_code=404)

    @router.get("/queue")
    def queue(request: Request):
        """The queue in the scheduler's order, each run with why it waits (`lora-daemon queue`)."""
        return call(request, lambda: ctx.client().queue())

    @router.get("/whoami")
    def whoami(request: Request):
        """Who the daemon takes the caller for: user, role and limits on a shared daemon (users.yaml)."""
        return call(request, lambda: ctx.client().whoami())

    @router.get("/loras")
    def loras(since: int = -1):
        return ctx.feed.since(since)

    @router.get("/setup")
    def setup_log(since: int = 0):
        if ctx.setup is None:
            return {"status": "unavailable", "lines": [], "next": 0}
        return ctx.setup.snapshot(since)

    return router


def mount(app: Any, ctx: TabContext, auth: AuthPolicy) -> bool:
    """Add the routes to a FastAPI app once (the WebUI calls on_app_started again after a Reload UI)."""
    if getattr(app.state, "lora_scripts_routes", False):
        return False
    app.include_router(make_router(ctx, auth))
    app.state.lora_scripts_routes = True
    return True
