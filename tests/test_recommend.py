"""Recommended settings: datasets of different shapes get different, explained settings that validate and fit the
memory plan; earlier runs change the proposal and say how; the CLI entry point."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_core.config import config_from_dict
from lora_core.plan import make_plan
from lora_core.recommend import SOURCES, recommend
from lora_core.tiny import make_tiny_dataset
from lora_core.train import main as train_main

LONG_TAGS = ("masterpiece, a shape, flat colour, thick outline, centred, pastel background, soft shadow, "
             "vector art, minimal, geometric")


def reasons(rec) -> dict:
    return {r.field: r for r in rec.reasons}


def assert_explained_and_valid(rec, tmp_path: Path) -> None:
    """Every value has a reason and a known source; the settings validate and fit the memory plan."""
    for r in rec.reasons:
        assert r.reason.strip() and r.source in SOURCES, r
        assert rec.settings[r.field] == r.value
    assert rec.validated, rec.problems
    cfg = config_from_dict({**rec.settings, "output_dir": str(tmp_path / "out")})
    plan = make_plan(cfg)
    assert plan.fits, plan.describe()
    assert rec.plan["source"] == "estimate" and rec.plan["fits"]
    assert any("not a measured" in n for n in rec.notes)


@pytest.fixture
def few(tmp_path):
    return make_tiny_dataset(tmp_path / "few", n=6)


@pytest.fixture
def many(tmp_path):
    return make_tiny_dataset(tmp_path / "many", n=40, seed=1)


def test_few_and_many_images_get_different_rank_epochs_and_validation(few, many, tiny_sd, tmp_path):
    small = recommend(few, base_model=str(tiny_sd), kind="character")
    large = recommend(many, base_model=str(tiny_sd), kind="character")
    s, l = small.settings, large.settings
    assert s["lora_rank"] < l["lora_rank"] and "only 6 unique images" in reasons(small)["lora_rank"].reason
    assert s["epochs"] > l["epochs"]  # fewer images: each needs more passes for its views
    assert s["validation_split"] == 0.0 and l["validation_split"] == 0.1 and l["validation_every"] >= 1
    assert s["batch_size"] == 1 and l["batch_size"] > 1  # a quarter of the unique images at most
    assert l["learning_rate"] > s["learning_rate"]  # sqrt batch scaling
    for rec in (small, large):
        assert_explained_and_valid(rec, tmp_path)
        assert rec.settings["resolution"] == 64  # the images are 64 px: not upscaled to SD1's 512
        assert rec.settings["trigger_word"] and rec.settings["train_text_encoder"] is True


def test_mixed_aspect_ratios_turn_buckets_on_with_their_figures(tmp_path, tiny_sd):
    square = recommend(make_tiny_dataset(tmp_path / "square", n=12), base_model=str(tiny_sd))
    mixed = recommend(make_tiny_dataset(tmp_path / "mixed", n=12, sizes=[(192, 64), (64, 192), (128, 128)]),
                      base_model=str(tiny_sd))
    assert square.settings["enable_bucket"] is False
    assert mixed.settings["enable_bucket"] is True
    why = reasons(mixed)["enable_bucket"].reason
    assert "67%" in why and "buckets" in why and mixed.dataset.buckets["count"] >= 2
    assert mixed.dataset.buckets["mean_img_ar_error"] < mixed.dataset.buckets["square_crop_error"]
    assert mixed.settings["min_bucket_reso"] <= mixed.settings["resolution"] <= mixed.settings["max_bucket_reso"]
    assert_explained_and_valid(mixed, tmp_path)


def test_long_tag_captions_are_shuffled_and_short_ones_are_not(tmp_path, tiny_sd):
    short = make_tiny_dataset(tmp_path / "short", n=8)
    long_ = make_tiny_dataset(tmp_path / "long", n=8)
    for txt in long_.glob("*.txt"):
        txt.write_text(LONG_TAGS, encoding="utf-8")
    a = recommend(short, base_model=str(tiny_sd), kind="style")
    b = recommend(long_, base_model=str(tiny_sd), kind="style")
    assert a.settings["shuffle_caption"] is False and b.settings["shuffle_caption"] is True
    assert "10.0 tags" in reasons(b)["shuffle_caption"].reason
    assert b.dataset.captions["mean_tags"] == 10 and a.dataset.captions["mean_tags"] == 2
    # a style: LoCon, no trigger word
    assert b.settings["network_type"] == "locon" and b.settings["trigger_word"] is None
    assert b.settings["conv_rank"] <= b.settings["lora_rank"]
    assert_explained_and_valid(b, tmp_path)


def test_duplicates_are_counted_once_and_named(tmp_path, tiny_sd):
    data = make_tiny_dataset(tmp_path / "dupes", n=8)
    for src in sorted(data.glob("*.png"))[:3]:
        shutil.copy(src, src.with_name(src.stem + "_copy.png"))
        shutil.copy(src.with_suffix(".txt"), src.with_name(src.stem + "_copy.txt"))
    rec = recommend(data, base_model=str(tiny_sd))
    assert rec.dataset.images == 11 and rec.dataset.unique_images == 8
    assert any("3 duplicate" in n and "_copy.png" in n for n in rec.notes)
    assert_explained_and_valid(rec, tmp_path)


def test_history_changes_the_recommendation_and_says_how(many, tiny_sd):
    plain = recommend(many, base_model=str(tiny_sd), kind="character")
    assert plain.history == [] and any("no earlier runs" in n for n in plain.notes)
    overfit = {"id": "r1", "name": "first try", "status": "finished", "rating": "down", "health": ["overfit"],
               "config": {"training": {"epochs": 10, "learning_rate": 1e-4}, "model": {"lora_rank": 16}}}
    rec = recommend(many, base_model=str(tiny_sd), kind="character", history=[overfit])
    changed = {h["field"]: h for h in rec.history}
    assert changed["epochs"]["to"] == 7 and "overfit" in changed["epochs"]["why"] and changed["epochs"]["run"] == "r1"
    assert rec.settings["lora_rank"] == 8 and reasons(rec)["lora_rank"].source == "history"
    liked = {"id": "r2", "name": "good one", "status": "finished", "rating": "up", "health": [],
             "config": {"training": {"optimizer": "adamw", "learning_rate": 3e-4}, "model": {"lora_rank": 32}}}
    rec = recommend(many, base_model=str(tiny_sd), kind="character", history=[liked, overfit])
    assert rec.settings["learning_rate"] == 3e-4 and rec.settings["lora_rank"] == 32
    assert "good one" in reasons(rec)["learning_rate"].reason
    spiky = {"id": "r3", "status": "finished", "rating": None, "health": ["loss_spike"],
             "config": {"training": {"learning_rate": 2e-4}}}
    rec = recommend(many, base_model=str(tiny_sd), kind="character", history=[spiky])
    assert rec.settings["learning_rate"] == pytest.approx(min(2e-4, plain.settings["learning_rate"]) / 2)
    assert rec.validated


def test_without_a_base_model_it_still_recommends_and_says_what_it_skipped(few):
    rec = recommend(few)
    assert rec.plan is None and rec.validated and rec.settings["batch_size"] >= 1
    assert any("no base model" in n for n in rec.notes)
    assert any("tagger" in n for n in rec.notes)  # the face/character share needs a tagger


def test_a_configured_tagger_measures_the_person_share_and_picks_the_kind(tmp_path, few):
    from lora_core.tiny import build_tiny_tagger

    people = build_tiny_tagger(tmp_path / "people", tags=[("general", 9, 2.0, (0, 0, 0)),
                                                          ("1girl", 0, 3.0, (0, 0, 0)),
                                                          ("simple_background", 0, 3.0, (0, 0, 0))])
    shapes = build_tiny_tagger(tmp_path / "shapes")  # colour tags only: no person in any image
    with_people = recommend(few, tagger=str(people))
    without = recommend(few, tagger=str(shapes))
    assert with_people.kind == "character" and "100% of 6 image(s)" in with_people.dataset.tagger
    assert without.kind == "style" and "0% of 6 image(s)" in without.dataset.tagger
    assert any(n.startswith("kind style: 0%") for n in without.notes)
    assert without.settings["network_type"] == "locon" and with_people.settings["network_type"] == "lora"
    assert recommend(few, kind="character", tagger=str(shapes)).kind == "character"  # a given kind wins
    from lora_core.errors import InputError

    with pytest.raises(InputError, match="tagger"):
        recommend(few, tagger=str(tmp_path / "no-tagger"))


def test_bad_input_names_what_to_fix(tmp_path):
    from lora_core.errors import InputError

    with pytest.raises(InputError, match="kind"):
        recommend(tmp_path, kind="landscape")
    with pytest.raises(InputError, match="no such folder"):
        recommend(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no readable images"):
        recommend(tmp_path / "empty")


def test_lora_train_recommend_prints_json_and_text(few, tiny_sd, capsys):
    assert train_main(["--recommend", "--data", str(few), "--base", str(tiny_sd), "--kind", "concept",
                       "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "concept" and out["validated"] and out["settings"]["lora_rank"] == 8
    assert train_main(["--recommend", "--data", str(few)]) == 0
    text = capsys.readouterr().out
    assert "lora_rank" in text and "[kohya-guide]" in text
    assert train_main(["--recommend", "--data", str(few / "nope")]) == 2


# ---- through the daemon ----------------------------------------------------------------------------------------------
from daemon_fixtures import daemon, daemon_factory, run_config, wait_until  # noqa: E402,F401  (fixtures)
from lora_daemon.client import DaemonError  # noqa: E402


def test_daemon_recommend_learns_from_a_rated_run(daemon, tiny_sd, tiny_data, many):
    client = daemon.client()
    first = client.recommend(str(many), base_model=str(tiny_sd), kind="character")
    assert first["validated"] and first["history"] == [] and first["settings"]["lora_rank"] == 16
    run = client.submit(run_config(tiny_sd, tiny_data, "liked", steps=3), name="liked")
    done = wait_until(lambda: (r := client.get(run["id"]))["status"] in ("finished", "failed") and r, timeout=300,
                      what="the run to end")
    assert done["status"] == "finished", done.get("error")
    assert client.rate(run["id"], "up")["rating"] == "up"
    with pytest.raises(DaemonError, match="rating"):
        client.rate(run["id"], "sideways")
    rec = client.recommend(str(many), base_model=str(tiny_sd), kind="character")
    changed = {h["field"]: h for h in rec["history"]}
    assert changed["lora_rank"]["to"] == 4 and changed["lora_rank"]["run"] == run["id"]
    assert rec["settings"]["learning_rate"] == 1e-3 and "👍" in changed["learning_rate"]["why"]
    assert rec["validated"]
    assert client.rate(run["id"], None)["rating"] is None
    assert client.recommend(str(many), base_model=str(tiny_sd))["history"] == []
    with pytest.raises(DaemonError, match="no such folder"):
        client.recommend(str(many / "missing"))


def test_lora_daemon_cli_recommend_and_rate(daemon, few, tiny_sd):
    import subprocess
    import sys

    from daemon_fixtures import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(daemon.home), *args],
                              capture_output=True, text=True, cwd=str(ROOT), timeout=300)

    done = cli("recommend", str(few), "--base", str(tiny_sd), "--kind", "style")
    assert done.returncode == 0, done.stderr
    assert "network_type" in done.stdout and "locon" in done.stdout and "[lycoris]" in done.stdout
    done = cli("rate", "nope", "up")
    assert done.returncode != 0 and "nope" in (done.stderr + done.stdout)


# ---- the tab's Recommend button (gradio 3.41 and 4.40) --------------------------------------------------------------
TAB_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.import_lora_daemon()
from pathlib import Path
from lora_daemon.ui.context import TabContext, UiSettings
from lora_daemon.ui.forms import FIELDS, TEXT_FIELDS
from lora_daemon.ui.tab import TrainTab

home, base, data = sys.argv[2], sys.argv[3], sys.argv[4]
ctx = TabContext(settings=lambda: UiSettings(home=home), checkpoints=lambda: {"tiny [0]": base},
                 lora_dir=lambda: Path(home) / "Lora")
tab = TrainTab(ctx)
tab.build()
out = tab.recommend("style", "tiny [0]", data)
fields = {s.key: u.get("value") for s, u in zip(FIELDS, out[4:4 + len(FIELDS)]) if isinstance(u, dict) and "value" in u}
empty = tab.recommend("style", "tiny [0]", "")
print("REPORT " + json.dumps({"n": len(out), "expected": 4 + len(FIELDS) + len(TEXT_FIELDS) + 2, "fields": fields,
                              "extra": out[3].get("value"), "status": out[-2], "html": out[-1],
                              "folder_kept": out[2] == {"__type__": "update"} or out[2].get("value") is None,
                              "empty_status": empty[-2]}, default=str))
"""


@pytest.mark.parametrize("env_name", [".venv-gradio3", ".venv-gradio4"])
def test_the_tabs_recommend_button_fills_the_form_and_explains(env_name, daemon, tiny_sd, tmp_path):
    import os
    import subprocess

    from daemon_fixtures import ROOT
    from prepare_webui_envs import require

    python = require(env_name)
    data = make_tiny_dataset(tmp_path / "styled", n=8)
    for txt in data.glob("*.txt"):
        txt.write_text(LONG_TAGS, encoding="utf-8")
    probe = tmp_path / "probe.py"
    probe.write_text(TAB_PROBE, encoding="utf-8")
    done = subprocess.run([str(python), str(probe), str(ROOT / "daemon" / "bootstrap.py"), str(daemon.home),
                           str(tiny_sd), str(data)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["n"] == report["expected"]
    fields, extra = report["fields"], report["extra"] or ""
    assert fields.get("resolution") == 64 and fields.get("shuffle_caption") is True, fields
    assert "network_type: locon" in extra or fields.get("network_type") == "locon", (fields, extra)
    assert "recommended settings" in report["status"]
    assert "lora_scripts_recommendation" in report["html"]
    assert "locon" in report["html"] and "lycoris" in report["html"]
    assert "dataset folder" in report["empty_status"] and report["folder_kept"]
