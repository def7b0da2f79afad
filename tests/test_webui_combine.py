"""The tab's Combine section under gradio 3.41 (A1111) and 4.40 (Forge): it builds inside the whole tab, lists
the Lora folder, previews LoRAs through a real daemon (`tools.inspect`) and queues merge and bake jobs that the
daemon runs to real files."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from daemon_fixtures import ROOT, daemon_factory  # noqa: F401  (fixture)
from prepare_webui_envs import ENVS, require
from test_tools import make_lora

PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.import_lora_daemon()
from pathlib import Path
import gradio as gr
from lora_daemon.ui.context import TabContext, UiSettings
from lora_daemon.ui.tab import TrainTab
from lora_daemon.ui.combine import BAKE, MERGE

home, lora_dir, base = sys.argv[2], Path(sys.argv[3]), sys.argv[4]
ctx = TabContext(settings=lambda: UiSettings(home=home), checkpoints=lambda: {"base.safetensors [0]": base},
                 lora_dir=lambda: lora_dir)
tab = TrainTab(ctx)
blocks = tab.build()
c = tab.combine
ids = sorted(getattr(b, "elem_id", None) or "" for b in blocks.blocks.values())
def plain(update):
    return {k: v for k, v in update.items() if k in ("choices", "value")}
report = {"gradio": gr.__version__, "combine_ids": [i for i in ids if "combine" in i],
          "choices": c.c["loras"].choices}
report["refresh"] = [plain(u) for u in c.refresh(["style.safetensors", "gone.safetensors"], None)]
report["preview"] = c.preview(["style.safetensors", "character.safetensors"], "0.8")
report["preview_mixed"] = c.preview(["style.safetensors", "xl.safetensors"], "")
report["preview_bad_weight"] = c.preview(["style.safetensors"], "lots")
report["merge"] = c.run(MERGE, ["style.safetensors", "character.safetensors"], "0.8, 0.5", 0, None, "combo", "fp32")[0]
report["bake"] = c.run(BAKE, ["style.safetensors"], "0.5", 0, "base.safetensors [0]", "baked", "fp16")[0]
report["bake_no_base"] = c.run(BAKE, ["style.safetensors"], "", 0, None, "baked2", "fp16")[0]
report["escape"] = c.run(MERGE, ["style.safetensors"], "", 0, None, "../../escape", "fp16")[0]
started_by_tab = TabContext(settings=lambda: UiSettings(home=home, daemon_python=sys.executable),
                            checkpoints=lambda: {}, lora_dir=lambda: lora_dir, checkpoint_dir=lambda: Path(base).parent)
report["start_command"] = started_by_tab.start_command()
print("REPORT " + json.dumps(report, default=str))
"""


def _wait_files(paths: list[Path], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(p.is_file() for p in paths):
        time.sleep(0.5)


@pytest.mark.parametrize("env_name", list(ENVS))
def test_combine_section_previews_and_queues_merge_and_bake_jobs(env_name, daemon_factory, tmp_path):
    from lora_core.tiny import build_tiny_sd

    python = require(env_name)
    checkpoints = tmp_path / "Stable-diffusion"
    lora_dir = tmp_path / "Lora"
    base = build_tiny_sd(checkpoints, single_file=True)
    make_lora(lora_dir / "style.safetensors", "sd1", seed=1, text=False)
    make_lora(lora_dir / "character.safetensors", "sd1", seed=2, rank=2, text=False)
    make_lora(lora_dir / "xl.safetensors", "sdxl", seed=1, text=False)
    daemon = daemon_factory("--checkpoint-dir", str(checkpoints))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    done = subprocess.run([str(python), str(probe), str(ROOT / "daemon" / "bootstrap.py"), str(daemon.home),
                           str(lora_dir), str(base)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])

    assert {"lora_scripts_combine_loras", "lora_scripts_combine_run", "lora_scripts_combine_base"} <= \
        set(report["combine_ids"])
    choices = [c[0] if isinstance(c, list) else c for c in report["choices"]]
    assert choices == ["character.safetensors", "style.safetensors", "xl.safetensors"]
    assert report["refresh"][0]["value"] == ["style.safetensors"]
    assert "<td>style.safetensors</td><td>0.8</td><td>sd1</td><td>lora</td><td>4</td>" in report["preview"]
    assert "an exact merge has rank 6" in report["preview"]
    assert "different model families (sd1, sdxl)" in report["preview_mixed"]
    assert "Weights: entry 1" in report["preview_bad_weight"]
    assert "Queued merge combo.safetensors" in report["merge"]
    assert "Queued bake baked.safetensors" in report["bake"]
    assert "Base model: choose" in report["bake_no_base"]
    assert "outside the daemon" in report["escape"]
    start = report["start_command"]  # a daemon the tab starts may read and write the WebUI's checkpoints
    assert start[start.index("--checkpoint-dir") + 1] == str(checkpoints)

    merged, baked = lora_dir / "combo.safetensors", checkpoints / "baked.safetensors"
    _wait_files([merged, baked])
    runs = {r["name"]: r for r in daemon.client().list_runs(all=True)}
    assert merged.is_file() and baked.is_file(), runs
    from lora_core.tools.inspect import inspect_file

    info = inspect_file(merged)
    assert info["rank"] == 6 and [s["weight"] for s in info["training"]["merged_from"]] == [0.8, 0.5]
    assert not (tmp_path / "escape.safetensors").exists()


TOOLS_PROBE = r"""
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.import_lora_daemon()
from pathlib import Path
from lora_daemon.ui import routes
from lora_daemon.ui.context import TabContext, UiSettings
from lora_daemon.ui.tab import TrainTab
from lora_daemon.ui.combine import EXTRACT, RESIZE

home, lora_dir, checkpoints = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
models = lambda: {f"{p.name} [0]": str(p) for p in sorted(checkpoints.glob("*.safetensors"))}
ctx = TabContext(settings=lambda: UiSettings(home=home), checkpoints=models, lora_dir=lambda: lora_dir)
tab = TrainTab(ctx)
tab.build()
c = tab.combine
client = ctx.client(timeout=30)
def queued(result):
    status, _, job = result
    assert job, status
    return job
def wait(job):
    deadline = time.monotonic() + 400
    while client.get(job)["status"] not in ("finished", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
report = {}
# the form's mistakes, named before anything is queued
report["resize_two"] = c.run(RESIZE, ["style.safetensors", "other.safetensors"], "", 2, None, "x", "fp32")[0]
report["resize_no_rank"] = c.run(RESIZE, ["style.safetensors"], "", 0, None, "x", "fp32", 0)[0]
report["resize_bad_fro"] = c.run(RESIZE, ["style.safetensors"], "", 0, None, "x", "fp32", 1.5)[0]
report["extract_same"] = c.run(EXTRACT, [], "", 4, "base.safetensors [0]", "x", "fp32", 0,
                               "base.safetensors [0]", False)[0]
jobs = {
    "rank": queued(c.run(RESIZE, ["style.safetensors"], "", 2, None, "small", "fp32")),
    "fro": queued(c.run(RESIZE, ["style.safetensors"], "", 0, None, "fro", "fp32", 0.9)),
    "extract": queued(c.run(EXTRACT, [], "", 4, "base.safetensors [0]", "extracted", "fp32", 0,
                            "tuned.safetensors [0]", True)),
}
for job in jobs.values():
    wait(job)
report["runs"] = {k: {f: client.get(j).get(f) for f in ("status", "error", "step", "total_steps", "output_file")}
                  for k, j in jobs.items()}
refreshed = c.refresh([], None, None, jobs["rank"])
report["choices"] = refreshed[0]["choices"]
report["status"] = {k: c.refresh([], None, None, j)[3] for k, j in jobs.items()}
report["continue_pick"] = tab.inspect_pick("small.safetensors")
report["pick"] = c.preview(["extracted.safetensors"], "")
report["runs_view"] = {k: routes.run_view(ctx, j) for k, j in jobs.items()}
report["runs_view"] = {k: {f: v.get(f) for f in ("report_html", "inspect_html")} for k, v in report["runs_view"].items()}
print("REPORT " + json.dumps(report, default=str))
"""


@pytest.mark.parametrize("env_name", list(ENVS))
def test_resize_and_extract_from_the_section_land_in_the_lora_list_with_their_report(env_name, daemon_factory,
                                                                                   tmp_path):
    """Resize (a rank, and a fro-ratio) and extract (tuned vs base checkpoint, conv layers as LoCon) queued from
    the Combine section run as daemon jobs; Refresh lists the new files and shows each job's report (retained
    energy, relative error) and the new file's inspect summary, and so do the Runs view and the continue-from pick."""
    from lora_core.tiny import build_tiny_sd
    from lora_core.tools.bake import bake
    from lora_core.tools.inspect import inspect_file

    python = require(env_name)
    checkpoints = tmp_path / "Stable-diffusion"
    lora_dir = tmp_path / "Lora"
    base = build_tiny_sd(checkpoints / "base.safetensors", single_file=True)
    style = make_lora(lora_dir / "style.safetensors", "sd1", seed=1, rank=4, text=False)
    make_lora(lora_dir / "other.safetensors", "sd1", seed=2, text=False)
    bake(base, [(style, 1.0)], checkpoints / "tuned.safetensors", precision="fp32")
    daemon = daemon_factory("--checkpoint-dir", str(checkpoints))
    probe = tmp_path / "probe.py"
    probe.write_text(TOOLS_PROBE, encoding="utf-8")
    done = subprocess.run([str(python), str(probe), str(ROOT / "daemon" / "bootstrap.py"), str(daemon.home),
                           str(lora_dir), str(checkpoints)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])

    assert "Resize: choose exactly one LoRA (2 chosen)" in report["resize_two"]
    assert "Rank: give the new rank, or a fro-ratio" in report["resize_no_rank"]
    assert "Fro-ratio: a share between 0 and 1" in report["resize_bad_fro"]
    assert "choose another checkpoint than the base model" in report["extract_same"]
    for name, run in report["runs"].items():
        assert run["status"] == "finished", (name, run)
        assert run["total_steps"] and run["step"] == run["total_steps"], (name, run)  # progress like a run
    choices = [c[0] if isinstance(c, list) else c for c in report["choices"]]
    assert {"small.safetensors", "fro.safetensors", "extracted.safetensors"} <= set(choices)

    small, fro, extracted = (inspect_file(lora_dir / f"{n}.safetensors") for n in ("small", "fro", "extracted"))
    assert small["rank"] == 2 and extracted["family"] == "sd1"
    # the report shown is the job's own: resize by rank keeps less than all of a rank-4 update's energy
    status = report["status"]
    assert "retained energy: lowest" in status["rank"] and "rank 2" in status["rank"]
    assert "module (least retained)" in status["rank"] and "4 → 2" in status["rank"]
    assert "sv_fro 0.9" in status["fro"] and "retained energy" in status["fro"]
    assert "relative error: mean" in status["extract"] and "conv rank 4" in status["extract"]
    # ... and the new file's inspect summary, in the section, the Runs view and the continue-from pick
    assert 'data-rank="2"' in status["rank"] and "small.safetensors" in status["rank"]
    assert 'data-family="sd1"' in report["pick"] and "extracted.safetensors" in report["pick"]
    assert 'data-rank="2"' in report["continue_pick"] and "<th>block</th>" in report["continue_pick"]
    views = report["runs_view"]
    assert "retained energy" in views["rank"]["report_html"] and 'data-rank="2"' in views["rank"]["inspect_html"]
    assert "relative error" in views["extract"]["report_html"] and 'data-family="sd1"' in views["extract"]["inspect_html"]
    assert fro["rank"] and max(fro["rank"] if isinstance(fro["rank"], list) else [fro["rank"]]) <= 4


RUN_VIEW_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.import_lora_daemon()
from pathlib import Path
from lora_daemon.ui import routes
from lora_daemon.ui.context import TabContext, UiSettings

home, lora_dir, run_id = sys.argv[2], Path(sys.argv[3]), sys.argv[4]
ctx = TabContext(settings=lambda: UiSettings(home=home), checkpoints=lambda: {}, lora_dir=lambda: lora_dir)
first = routes.run_view(ctx, run_id)
again = routes.run_view(ctx, run_id)  # a poll of the same finished run: the cached summary
print("REPORT " + json.dumps({"first": first.get("inspect_html"), "again": again.get("inspect_html"),
                              "report": first.get("report_html")}, default=str))
"""


def test_the_runs_view_shows_the_inspect_summary_of_a_finished_runs_published_lora(daemon_factory, tiny_sd,
                                                                                   tiny_data, tmp_path):
    """A training run that finished and published its LoRA: the Runs view (the routes' run view the tab's script
    polls) carries that file's inspect summary — family, adapter, rank/alpha per block, its training steps."""
    from daemon_fixtures import run_config, wait_until

    python = require(list(ENVS)[0])
    daemon = daemon_factory()
    client = daemon.client(timeout=60)
    run = client.submit(run_config(tiny_sd, tiny_data, "published", steps=2))
    wait_until(lambda: client.get(run["id"])["status"] in ("finished", "failed"), 600, 0.5, "the run")
    finished = client.get(run["id"])
    assert finished["status"] == "finished" and finished["published_file"], finished.get("error")
    probe = tmp_path / "probe.py"
    probe.write_text(RUN_VIEW_PROBE, encoding="utf-8")
    done = subprocess.run([str(python), str(probe), str(ROOT / "daemon" / "bootstrap.py"), str(daemon.home),
                           str(daemon.lora_dir), run["id"]], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    shown = report["first"]
    assert 'data-family="sd1"' in shown and 'data-rank="4"' in shown and "<th>block</th>" in shown, shown
    assert Path(finished["published_file"]).name in shown and "steps: 2" in shown
    assert report["again"] == shown and report["report"] is None  # a training run has no toolbox report


def test_the_report_shown_for_an_svd_merge_names_its_worst_modules_and_is_found_in_a_log(tmp_path):
    """An SVD merge's own report (the engine's, as the job prints it last with --json) rendered for the tab: the
    mean/max relative error and the modules with the largest error, the largest first; found in a log whose last
    lines are warnings."""
    from lora_core.tools.merge import merge_loras
    from lora_daemon.ui import lora_info

    a = make_lora(tmp_path / "a.safetensors", "sd1", seed=1, text=False)
    b = make_lora(tmp_path / "b.safetensors", "sd1", seed=2, text=False)
    report = merge_loras([(a, 1.0), (b, 0.5)], tmp_path / "m.safetensors", rank=2, precision="fp32")
    log_lines = ["loading…", json.dumps(report, default=str), "UserWarning: something", ""]
    found = lora_info.report_from_log(log_lines)
    assert found == json.loads(json.dumps(report, default=str))
    shown = lora_info.report_html(found)
    assert "module (largest error)" in shown and f"max {report['max_relative_error']:.4g}" in shown
    worst = max(report["error_per_module"], key=report["error_per_module"].get)
    assert shown.index(worst) < min(shown.index(n) for n in report["error_per_module"] if n != worst and n in shown)
    assert lora_info.report_from_log(["no report here", "{not json"]) is None


USER_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.import_lora_daemon()
from pathlib import Path
import gradio as gr
from lora_daemon.ui.context import TabContext, UiSettings
from lora_daemon.ui.tab import TrainTab
from lora_daemon.ui.combine import MERGE

home, lora_dir = sys.argv[2], Path(sys.argv[3])
ctx = TabContext(settings=lambda: UiSettings(home=home), checkpoints=lambda: {}, lora_dir=lambda: lora_dir)
tab = TrainTab(ctx)
blocks = tab.build()
run_id = tab.combine.c["run"]._id
# the function gradio itself calls for the Combine button, found through its own dependency table
if hasattr(blocks, "dependencies"):  # gradio 3: a list of dicts beside a list of functions
    index = next(i for i, d in enumerate(blocks.dependencies) if run_id in [t if isinstance(t, int) else t[0]
                                                                            for t in d["targets"]])
    fn = blocks.fns[index].fn
else:  # gradio 4: functions by id, each with its (block id, event) targets
    fn = next(f.fn for f in blocks.fns.values() if any(t[0] == run_id for t in f.targets))
status = fn(gr.Request(username="alice"), MERGE, ["style.safetensors", "character.safetensors"], "0.8, 0.5", 0,
            None, "alices_combo", "fp32", 0.0, None, False)[0]
print("REPORT " + json.dumps({"status": status, "request_param": str(list(fn.__annotations__.values()))}))
"""


@pytest.mark.parametrize("env_name", list(ENVS))
def test_combine_jobs_are_the_signed_in_users_on_a_shared_daemon(env_name, daemon_factory, tmp_path):
    """On a daemon with users.yaml, a Combine job started by a signed-in user is that user's (their limits, their
    Runs list), not the token holder's."""
    python = require(env_name)
    lora_dir = tmp_path / "Lora"
    make_lora(lora_dir / "style.safetensors", "sd1", seed=1, text=False)
    make_lora(lora_dir / "character.safetensors", "sd1", seed=2, rank=2, text=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "users.yaml").write_text("roles:\n  admin: {admin: true}\n  member: {queued_runs: 3}\n"
                                     "users:\n  root: admin\n  alice: member\n", encoding="utf-8")
    daemon = daemon_factory()
    probe = tmp_path / "probe.py"
    probe.write_text(USER_PROBE, encoding="utf-8")
    done = subprocess.run([str(python), str(probe), str(ROOT / "daemon" / "bootstrap.py"), str(daemon.home),
                           str(lora_dir)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert "Queued merge alices_combo.safetensors" in report["status"], report
    assert "Request" in report["request_param"]
    jobs = daemon.client(user="root").list_runs(all=True)
    assert [j["user"] for j in jobs if j["kind"] == "tools"] == ["alice"], jobs
    assert [j["user"] for j in daemon.client(user="alice").list_runs(all=True)] == ["alice"]
