"""FLUX.1 in the tab, gradio 4.40 (as Forge serves it), in headless Chromium, trained by a real daemon.

A person picks the tiny FLUX checkpoint in the Base model list (shown with its family), sees the FLUX settings and
presets appear, starts a run, and finds the LoRA in the Lora folder with a card saying Flux. Beside it, the tab's
own handlers in both gradio majors: a FLUX checkpoint is told apart by its header, the FLUX settings are sent only
with it, and in A1111 (which cannot run FLUX) Start says so and queues nothing.
"""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from prepare_webui_envs import ENVS, require
from test_browser_tab import (browser, daemon_client, dropdown_offers, field, page, section, serve_tab,  # noqa: F401
                              shot, start_a_run)

ROOT = Path(__file__).resolve().parent.parent
CPU_SETTINGS = "fp8_base: false\nmixed_precision: 'no'\nflux_blocks_to_swap: 0\ngradient_checkpointing: false\n" \
               "enable_bucket: false\nt5_max_length: 16\nsample_prompts: null\n"


def header_metadata(path: Path) -> dict:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]).get("__metadata__", {})


@pytest.fixture(scope="module")
def world():
    """The tab on gradio 4.40.0 with the tiny SD model and a tiny FLUX.1 dev single file (encoders and AE inside,
    as Forge keeps it) in its checkpoint folder."""
    from lora_core.image.flux_tiny import build_tiny_flux

    with serve_tab(".venv-gradio4") as served:
        served["flux"] = build_tiny_flux(served["models"], single_file=True)
        yield served


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f"#{elem_id} ul.options li", has_text=option).first.click()


@pytest.mark.slow
@pytest.mark.browser
def test_a_flux_checkpoint_picked_in_the_tab_trains_and_is_published_with_a_flux_card(world, page):
    page.goto(world["url"])
    section(page, "Train")
    assert page.locator("#lora_scripts_flux_settings").is_hidden()  # the tiny SD model comes first
    label = f"{world['flux'].name} · FLUX.1 dev"
    dropdown_offers(page, "lora_scripts_base_model", label)
    pick(page, "lora_scripts_base_model", label)
    page.locator("#lora_scripts_flux_settings").wait_for(state="visible", timeout=30_000)
    page.locator("#lora_scripts_family_note").get_by_text("FLUX.1 dev").first.wait_for(timeout=30_000)
    page.wait_for_function("() => document.querySelector('#lora_scripts_preset input').value.startsWith('flux-')",
                           timeout=30_000)
    dropdown_offers(page, "lora_scripts_preset", "flux-lowvram")
    page.wait_for_function("() => document.querySelector('#lora_scripts_timestep_sampling input').value === 'shift'",
                           timeout=30_000)  # the FLUX preset's settings are in the form
    shot(page, "flux_01_flux_settings")
    section(page, "Dataset")
    field(page, "dataset_dir").fill(str(world["captioned"]))
    section(page, "Train")
    page.locator("#lora_scripts_advanced").get_by_text("Advanced").first.click()
    field(page, "extra_yaml").fill(CPU_SETTINGS)  # the 16 GB preset's CUDA settings, off for this CPU
    run_id = start_a_run(page, "tiny_flux", steps=4)

    client = daemon_client(world)
    section(page, "Runs")
    row = page.locator(f'#lora_scripts_runs_table tr[data-run-id="{run_id}"]')
    row.and_(page.locator('[data-status="finished"]')).wait_for(timeout=900_000)
    shot(page, "flux_02_finished")
    run = client.get(run_id)
    assert run["status"] == "finished", run
    published = world["lora_dir"] / "tiny_flux.safetensors"
    meta = header_metadata(published)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    card = json.loads((world["lora_dir"] / "tiny_flux.json").read_text(encoding="utf-8"))
    assert card["sd version"] == "Flux" and world["flux"].name in card["description"]


PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", sys.argv[1])
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)
bootstrap.import_lora_daemon()
from pathlib import Path
from lora_daemon.ui.context import TabContext, UiSettings
from lora_daemon.ui.forms import FIELDS, TEXT_FIELDS
from lora_daemon.ui.tab import IMAGE_KIND, TrainTab

home, sd, flux, parts, data = sys.argv[2:7]
report = {}
for host in ("forge", "a1111"):
    ctx = TabContext(settings=lambda: UiSettings(home=home), lora_dir=lambda: Path(home) / "Lora", host=host,
                     checkpoints=lambda: {"sd [0]": sd, "flux [1]": flux, "parts [2]": parts})
    tab = TrainTab(ctx)
    tab.build()
    titles = sorted(tab._models())
    values = {s.key: s.default for s in FIELDS}
    values.update(guidance_scale=1.0, timestep_sampling="shift")
    row = [values[s.key] for s in FIELDS] + [s.default for s in TEXT_FIELDS]
    flux_title = next(t for t in titles if t.startswith("flux"))
    parts_title = next(t for t in titles if t.startswith("parts"))
    plain = lambda updates: [u if isinstance(u, str) else {k: v for k, v in dict(u).items() if k != "__type__"}
                             for u in updates]
    report[host] = {
        "pick_parts": plain(tab.pick_model(parts_title, "flux-character", "", "/my/own/clip_l.safetensors", None)),
        "titles": titles,
        "pick_flux": plain(tab.pick_model(flux_title, "style")),
        "pick_flux_again": plain(tab.pick_model(flux_title, "flux-style")),
        "pick_sd": plain(tab.pick_model("sd [0]", "flux-character")),
        "flux_config": tab._build_config(IMAGE_KIND, flux_title, data, "", tuple(row)),
        "sd_config": tab._build_config(IMAGE_KIND, "sd [0]", data, "", tuple(row)),
        "start_flux": tab.start(IMAGE_KIND, flux_title, data, "", *row)[-3:] if host == "a1111" else None,
    }
print("REPORT " + json.dumps(report, default=str))
"""


@pytest.mark.parametrize("env_name", list(ENVS))
def test_the_tab_tells_flux_apart_sends_its_settings_only_with_it_and_a1111_refuses_it(env_name, tmp_path):
    """Also: a transformer-only FLUX file in Forge's models/Stable-diffusion gets the T5, CLIP-L and AE files
    Forge keeps in models/text_encoder and models/VAE filled in, where the user has not typed one."""
    from lora_core.image.flux_tiny import build_tiny_flux
    from lora_core.tiny import build_tiny_sd, make_tiny_dataset

    python = require(env_name)
    models = tmp_path / "models" / "Stable-diffusion"
    build_tiny_sd(models, single_file=True)
    sd = next(models.glob("tiny-sd1*.safetensors"))
    flux = build_tiny_flux(models, single_file=True, variant="schnell")
    parts = build_tiny_flux(models / "flux1-dev-parts.safetensors", single_file=True, layout="parts")
    for name, folder in (("t5xxl", "text_encoder"), ("clip_l", "text_encoder"), ("ae", "VAE")):
        (tmp_path / "models" / folder).mkdir(exist_ok=True)
        (models / f"{name}.safetensors").rename(tmp_path / "models" / folder / f"{name}_fp16.safetensors")
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = subprocess.run([str(python), "-c", PROBE, str(ROOT / "daemon" / "bootstrap.py"), str(tmp_path / "home"),
                          str(sd), str(flux), str(parts), str(data)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.split("REPORT ", 1)[1])
    for host, seen in report.items():
        assert "flux [1] · FLUX.1 schnell" in seen["titles"] and "sd [0]" in seen["titles"]
        visible, note, presets, *filled = seen["pick_flux"]
        assert filled == [{}, {}, {}]  # a full file needs no other parts
        assert visible["visible"] is True and presets["value"].startswith("flux-")
        assert all(name.startswith("flux-") for name in presets["choices"])
        visible, note_sd, presets, *_ = seen["pick_sd"]
        t5, clip, vae = seen["pick_parts"][3:]
        assert t5["value"] == str(tmp_path / "models" / "text_encoder" / "t5xxl_fp16.safetensors")
        assert clip == {}  # the user's own choice stays
        assert vae["value"] == str(tmp_path / "models" / "VAE" / "ae_fp16.safetensors")
        assert visible["visible"] is False and note_sd == "" and not any(
            name.startswith("flux-") for name in presets["choices"]) and presets["value"] == "style"
        assert "value" not in seen["pick_flux_again"][2]  # a FLUX preset already chosen is left alone
        assert seen["flux_config"]["training"]["guidance_scale"] == 1.0
        assert seen["flux_config"]["model"]["base_model"] == str(flux)
        assert "guidance_scale" not in seen["sd_config"]["training"]
        assert "timestep_sampling" not in seen["sd_config"]["training"]
    assert "A1111 cannot run FLUX" in report["a1111"]["pick_flux"][1]
    assert "A1111 cannot run FLUX" in json.dumps(report["a1111"]["start_flux"])
    assert "Nothing was queued" in report["a1111"]["start_flux"][-1]
    assert "A1111" not in report["forge"]["pick_flux"][1]
