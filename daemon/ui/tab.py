"""The LoRA Training tab: Dataset, Train, Runs, Combine (`combine.py`) and Daemon sections, as one gradio Blocks.

Built the same way inside A1111 (gradio 3.41) and Forge (gradio 4.40) and in standalone mode, so it uses only what
both gradio majors share: no ``.style()``, ``gr.update(...)`` for every change, ``gr.Group`` rather than
``gr.Box``, uploads read with ``getattr(f, "name", f)``, and no timers — live run updates come from
``javascript/lora_scripts.js`` polling the REST routes in `lora_daemon.ui.routes`. Handlers only talk to the daemon
(short ZeroMQ requests) or copy uploaded files, so they never block the WebUI for long.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import yaml

from ..client import DaemonError, DaemonNotRunning

from . import gpu_handoff, lora_info, render
from .checkpoint_family import LABELS as FAMILY_LABELS, family_of, forge_parts
from .combine import CombineSection, list_loras
from .context import TabContext, as_signed_in, signed_in
from .datasets import DatasetPathError, confined, dataset_folder, list_images, save_uploads
from .forms import (FIELDS, FLUX_KEYS, TEXT_FIELDS, config_to_form, form_to_config, is_text_config, parse_extra_yaml,
                    problems_by_field, text_form_to_config)
from .presets import get_preset, list_presets, preset_form_values, text_form_start
from .setup_env import installed_torch

log = logging.getLogger(__name__)

TITLE = "LoRA Training"
ELEM_ID = "lora_scripts"
CAPTION_WAIT_S = 600.0
CAPTIONER_LIST_WAIT_S = 20.0  # a just-started daemon learns its captioners in the background
IMAGE_KIND = "Image LoRA"
TEXT_KIND = "Text LoRA (language model)"
KINDS = (IMAGE_KIND, TEXT_KIND)
DAEMON_DOWN = "The training daemon is not running: start it in the Daemon section."
PART_FIELDS = ("t5_path", "clip_path", "vae_path")  # a transformer-only FLUX file's other parts
A1111_NO_FLUX = ("model.base_model: {name} is a FLUX.1 checkpoint, and A1111 cannot run FLUX: a LoRA trained "
                 "here could not be used here. Train it from Forge (this tab), `lora-daemon ui` or `lora-train`, "
                 "and load it in Forge or ComfyUI.")
PLAN_NOTE = render.message("The memory plan is worked out as the run's first step; it shows in the run's row in Runs.")


def _daemon_message(error: Exception) -> str:
    if isinstance(error, DaemonNotRunning):
        return DAEMON_DOWN
    return str(getattr(error, "message", None) or error)


class Section:
    """Holds one section's components by name, so handlers can list their outputs in order."""

    def __init__(self):
        self.c: dict[str, Any] = {}

    def add(self, name: str, component: Any) -> Any:
        self.c[name] = component
        return component


def _field_component(spec, value: Any, prefix: str = "lora_scripts_") -> Any:
    kwargs = dict(label=spec.label, elem_id=f"{prefix}{spec.key}")
    if spec.info:
        kwargs["info"] = spec.info
    if spec.kind == "int":
        return gr.Number(value=value, precision=0, **kwargs)
    if spec.kind == "number":
        return gr.Number(value=value, **kwargs)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), value=value, **kwargs)
    if spec.kind == "lora_pick":  # the Lora folder's files, filled at page load; a typed path is kept as well
        return gr.Dropdown(choices=[], value=value or None, allow_custom_value=True, **kwargs)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=bool(value), **kwargs)
    return gr.Textbox(value=value, lines=3 if spec.kind == "lines" else 1, **kwargs)


class TrainTab:
    """Builds the Blocks and owns the handlers; one instance per built tab (a Reload UI builds a new one)."""

    def __init__(self, ctx: TabContext):
        self.ctx = ctx
        self.ds = Section()
        self.train = Section()
        self.fields: dict[str, Any] = {}
        self.errors: dict[str, Any] = {}
        self.text_fields: dict[str, Any] = {}
        self.text_errors: dict[str, Any] = {}

    # ---------------------------------------------------------------- layout
    def build(self) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False, title=TITLE) as blocks:
            gr.HTML('<div id="lora_scripts_toasts"></div>', elem_id="lora_scripts_toast_host")
            # the GPU hand-off's "ask" question, filled by the tab's script from the live poll (any section)
            gr.HTML('<div id="lora_scripts_handoff_ask"></div>', elem_id="lora_scripts_handoff_host")
            with gr.Tabs(elem_id="lora_scripts_sections"):
                with gr.Tab("Dataset", elem_id="lora_scripts_dataset_section"):
                    self._dataset_section()
                with gr.Tab("Train", elem_id="lora_scripts_train_section"):
                    self._train_section()
                with gr.Tab("Runs", elem_id="lora_scripts_runs_section"):
                    self._runs_section()
                with gr.Tab("Combine", elem_id="lora_scripts_combine_section"):
                    self.combine = CombineSection(self.ctx)
                    self.combine.build()
                with gr.Tab("Daemon", elem_id="lora_scripts_daemon_section"):
                    self._daemon_section()
            self._wire_dataset()
            self._wire_train()
            captioner = self.ds.c["captioner"]
            blocks.load(self.refresh_captioners, inputs=[captioner], outputs=[captioner])
            base_model = self.train.c["base_model"]
            blocks.load(self.refresh_models, inputs=[base_model], outputs=[base_model])
            continue_from = self.fields["network_weights"]
            blocks.load(self.refresh_loras, inputs=[continue_from], outputs=[continue_from])
            continue_from.change(self.inspect_pick, inputs=[continue_from], outputs=[self.train.c["continue_info"]])
        return blocks

    def _dataset_section(self) -> None:
        d = self.ds
        with gr.Row():
            d.add("name", gr.Textbox(label="Dataset name", value="my_dataset", elem_id="lora_scripts_dataset_name"))
            d.add("folder", gr.Textbox(label="Dataset folder (or point to an existing folder)",
                                       elem_id="lora_scripts_dataset_dir"))
        d.add("files", gr.File(label="Drop images, caption .txt files or a .zip here", file_count="multiple",
                               elem_id="lora_scripts_upload"))
        with gr.Row():
            d.add("add", gr.Button("Add to dataset", variant="primary", elem_id="lora_scripts_add_files"))
            d.add("open", gr.Button("Open folder", elem_id="lora_scripts_open_folder"))
            d.add("check", gr.Button("Check dataset", elem_id="lora_scripts_check"))
        d.add("status", gr.HTML(elem_id="lora_scripts_dataset_status"))
        d.add("report", gr.HTML(elem_id="lora_scripts_check_report"))
        with gr.Group():
            with gr.Row():
                names = self._captioners()
                d.add("captioner", gr.Dropdown(label="Captioner", choices=names, value=(names or [None])[0],
                                               elem_id="lora_scripts_captioner"))
                d.add("overwrite", gr.Checkbox(label="Replace existing captions", value=False,
                                               elem_id="lora_scripts_caption_overwrite"))
                d.add("caption", gr.Button("Auto-caption", elem_id="lora_scripts_autocaption"))
        d.add("gallery", gr.Gallery(label="Images (click one to edit its caption)", columns=6, height=320,
                                    allow_preview=False, elem_id="lora_scripts_gallery"))
        d.add("entries", gr.State([]))
        with gr.Row():
            d.add("file", gr.Textbox(label="Image", interactive=False, elem_id="lora_scripts_caption_file"))
            d.add("text", gr.Textbox(label="Caption", lines=2, elem_id="lora_scripts_caption_text"))
            d.add("save", gr.Button("Save caption", elem_id="lora_scripts_save_caption"))
        with gr.Row():
            d.add("trigger", gr.Textbox(label="Trigger word", elem_id="lora_scripts_trigger_word"))
            d.add("add_trigger", gr.Button("Add to every caption", elem_id="lora_scripts_add_trigger"))
            d.add("find", gr.Textbox(label="Find", elem_id="lora_scripts_find"))
            d.add("replace", gr.Textbox(label="Replace with", elem_id="lora_scripts_replace"))
            d.add("do_replace", gr.Button("Replace in every caption", elem_id="lora_scripts_do_replace"))
        d.add("tags", gr.HTML(elem_id="lora_scripts_tag_frequency"))

    def _train_section(self) -> None:
        t = self.train
        titles = sorted(self._models())
        first = titles[0] if titles else None
        presets = list_presets(family=self._family(first))
        default = self.ctx.settings().default_preset
        preset_name = default if any(p.name == default for p in presets) else (presets[0].name if presets else None)
        values = preset_form_values(preset_name, FIELDS) if preset_name else {}
        t.add("kind", gr.Radio(label="Kind of run", choices=list(KINDS), value=IMAGE_KIND,
                               elem_id="lora_scripts_run_kind"))
        with t.add("image_form", gr.Column(elem_id="lora_scripts_image_form")):
            with gr.Row():
                t.add("base_model", gr.Dropdown(label="Base model", choices=titles,
                                                value=first, elem_id="lora_scripts_base_model"))
                t.add("refresh_models", gr.Button("Refresh", elem_id="lora_scripts_refresh_models"))
                t.add("preset", gr.Dropdown(label="Preset", choices=[p.name for p in presets], value=preset_name,
                                            elem_id="lora_scripts_preset"))
            t.add("preset_info", gr.Markdown(self._preset_text(preset_name)))
            t.add("family_note", gr.HTML(self._family_note(first), elem_id="lora_scripts_family_note"))
            self._fields(FIELDS, advanced=False, values=values)
            with t.add("flux_settings", gr.Column(visible=self._family(first) == "flux",
                                                  elem_id="lora_scripts_flux_settings")):
                self._fields(FIELDS, advanced=None, values=values, family="flux")
        with t.add("text_form", gr.Column(visible=False, elem_id="lora_scripts_text_form")):
            gr.Markdown("A LoRA for a causal language model (LLaMA, Qwen, Mistral, …) in a local folder; the adapter "
                        "is published to the daemon's adapters folder, not to the WebUI's Lora folder.")
            self._fields(TEXT_FIELDS, advanced=None, values=text_form_start(TEXT_FIELDS))
        t.add("plan", gr.HTML(elem_id="lora_scripts_plan"))
        t.add("continue_info", gr.HTML(elem_id="lora_scripts_continue_info"))  # the picked LoRA's inspect summary
        with gr.Accordion("Advanced", open=False, elem_id="lora_scripts_advanced"):
            with t.add("image_advanced", gr.Column(elem_id="lora_scripts_image_advanced")):
                self._fields(FIELDS, advanced=True, values=values)
            t.add("extra", gr.Textbox(label="Other settings (YAML, any config key)", lines=4,
                                      elem_id="lora_scripts_extra_yaml"))
            self.errors["extra"] = gr.HTML(elem_id="lora_scripts_err_extra", elem_classes=["lora-scripts-field-error"])
        t.add("general", gr.HTML(elem_id="lora_scripts_train_errors"))
        with gr.Row():
            t.add("validate", gr.Button("Validate", elem_id="lora_scripts_validate"))
            t.add("start", gr.Button("Start training", variant="primary", elem_id="lora_scripts_start"))
            t.add("show_yaml", gr.Button("Show YAML", elem_id="lora_scripts_show_yaml"))
            t.add("load_yaml", gr.Button("Load YAML", elem_id="lora_scripts_load_yaml"))
        with gr.Row():  # recommended settings from the dataset (and this user's rated runs) fill the form
            t.add("rec_kind", gr.Dropdown(label="Recommend for", choices=["character", "style", "concept"],
                                          value="character", elem_id="lora_scripts_recommend_kind"))
            t.add("recommend", gr.Button("Recommend", elem_id="lora_scripts_recommend"))
        t.add("status", gr.HTML(elem_id="lora_scripts_train_status"))
        t.add("yaml", gr.Textbox(label="Config YAML", lines=10, elem_id="lora_scripts_yaml"))

    def _fields(self, specs: tuple, advanced: Optional[bool], values: dict, family: Optional[str] = None) -> None:
        """Three fields a row, each with its error box; the text form's ids carry ``text_`` so both forms coexist.
        ``family``: only that family's own fields (the FLUX settings), which the other calls leave out."""
        text = specs is TEXT_FIELDS
        fields, errors = (self.text_fields, self.text_errors) if text else (self.fields, self.errors)
        prefix = "lora_scripts_text_" if text else "lora_scripts_"
        shown = [s for s in specs if (advanced is None or s.advanced == advanced) and s.family == family]
        for start in range(0, len(shown), 3):
            with gr.Row():
                for spec in shown[start:start + 3]:
                    with gr.Column(min_width=200):
                        fields[spec.key] = _field_component(spec, values.get(spec.key, spec.default), prefix)
                        errors[spec.key] = gr.HTML(elem_id=f"{prefix}err_{spec.key}",
                                                   elem_classes=["lora-scripts-field-error"])

    def _runs_section(self) -> None:
        gr.HTML('<div id="lora_scripts_runs_live" class="lora-scripts-runs">Loading runs…</div>',
                elem_id="lora_scripts_runs_host")
        with gr.Row():
            # The run the JS selected, for "Load this config": a textbox the JS writes into, hidden with its form
            # wrapper by style.css (visible=False would leave nothing in the page for the JS to write into).
            with gr.Column(elem_id="lora_scripts_selected_run_box", min_width=0):
                run = self.train.add("selected_run", gr.Textbox(label="Selected run", interactive=True,
                                                                elem_id="lora_scripts_selected_run"))
            load = gr.Button("Load this config", elem_id="lora_scripts_load_run_config")
        load.click(as_signed_in(self.load_run_config), inputs=[run], outputs=self._form_outputs())

    def _daemon_section(self) -> None:
        gr.HTML('<div id="lora_scripts_daemon_live">Checking the daemon…</div>', elem_id="lora_scripts_daemon_host")
        gr.Markdown(f"State folder: `{self.ctx.home()}` · Lora folder: `{self.ctx.lora_dir()}`",
                    elem_id="lora_scripts_state_folder")
        with gr.Row():
            start = gr.Button("Start daemon", elem_id="lora_scripts_daemon_start")
            stop = gr.Button("Stop daemon", elem_id="lora_scripts_daemon_stop")
            setup = gr.Button("Set up the training engine", elem_id="lora_scripts_daemon_setup")
        # the GPU hand-off (inside A1111/Forge): its setting and where the WebUI's model is, from the live poll
        gr.HTML('<div id="lora_scripts_handoff_live"></div>', elem_id="lora_scripts_handoff_setting_host")
        reload = gr.Button("Reload the WebUI's model now", elem_id="lora_scripts_handoff_reload",
                           visible=getattr(self.ctx.handoff, "host", None) is not None)
        result = gr.HTML(elem_id="lora_scripts_daemon_result")
        reload.click(self.reload_webui_model, outputs=[result])
        gr.HTML('<pre id="lora_scripts_setup_log" class="lora-scripts-log"></pre>', elem_id="lora_scripts_setup_host")
        start.click(lambda: render.message(self.ctx.start_daemon()), outputs=[result])
        stop.click(as_signed_in(self.stop_daemon), outputs=[result])
        setup.click(self.start_setup, outputs=[result])

    # ---------------------------------------------------------------- dataset handlers
    def _wire_dataset(self) -> None:
        d = self.ds.c
        refresh_outputs = [d["folder"], d["status"], d["gallery"], d["entries"], d["tags"]]
        d["add"].click(as_signed_in(self.add_files), inputs=[d["files"], d["name"], d["folder"]],
                       outputs=refresh_outputs)
        d["open"].click(as_signed_in(self.open_folder), inputs=[d["name"], d["folder"]], outputs=refresh_outputs)
        d["check"].click(as_signed_in(self.check), inputs=[d["folder"], self.fields["resolution"]],
                         outputs=[d["report"]])
        d["caption"].click(as_signed_in(self.autocaption), inputs=[d["folder"], d["captioner"], d["overwrite"]],
                           outputs=refresh_outputs)
        d["gallery"].select(self.select_image, inputs=[d["entries"]], outputs=[d["file"], d["text"]])
        d["save"].click(as_signed_in(self.save_caption), inputs=[d["folder"], d["file"], d["text"]],
                        outputs=refresh_outputs)
        d["add_trigger"].click(as_signed_in(self.add_trigger), inputs=[d["folder"], d["trigger"]],
                               outputs=refresh_outputs)
        d["do_replace"].click(as_signed_in(self.replace), inputs=[d["folder"], d["find"], d["replace"]],
                              outputs=refresh_outputs)

    def _captioners(self) -> list[str]:
        """The engine's captioners as the daemon reports them, those with weights in place first, then the
        WebUI's own interrogators. None from the engine while the daemon is down (the page load asks again)."""
        engine: list[dict] = []
        try:
            engine = self.ctx.client(timeout=1.0).status().get("captioners") or []
        except (DaemonNotRunning, DaemonError, OSError) as e:
            log.info("captioner list from the daemon unavailable: %s", e)
        names = [c["name"] for c in sorted(engine, key=lambda c: not c.get("ready"))]
        return names + [n for n in self.ctx.interrogators if n not in names]

    def _first_captioner(self) -> Optional[str]:
        """The captioner to use when none is chosen: the list may have been empty when the page loaded, because a
        daemon that has just started learns its captioners in the background for a few seconds."""
        deadline = time.monotonic() + CAPTIONER_LIST_WAIT_S
        while True:
            names = self._captioners()
            if names or time.monotonic() > deadline:
                return names[0] if names else None
            time.sleep(0.5)

    def refresh_captioners(self, current: Optional[str]):
        """On page load: the daemon may have started (or weights arrived) since the tab was built."""
        names = self._captioners()
        return gr.update(choices=names, value=current if current in names else (names or [None])[0])

    def _folder(self, name: str, folder: str) -> Path:
        if folder and folder.strip():
            return Path(folder.strip()).expanduser().resolve()
        return dataset_folder(self.ctx.datasets_root(), name or "my_dataset")

    def _refresh(self, folder: Path, status: str, kind: str = "info") -> list:
        """Folder, status, gallery, entries, tags for a dataset folder, captions read through the daemon."""
        entries: list[dict] = []
        tags = ""
        try:
            entries = self.ctx.client().captions_get(str(folder)).get("entries", [])
            tags = render.tag_table(render.count_tags(entries))
        except (DaemonNotRunning, DaemonError) as e:
            entries = [{"file": p.relative_to(folder).as_posix(), "caption": None} for p in list_images(folder)]
            tags = render.message(_daemon_message(e), "error")
        gallery = [(str(folder / e["file"]), e.get("caption") or "(no caption)") for e in entries]
        return [gr.update(value=str(folder)), render.message(status, kind), gallery, entries, tags]

    def add_files(self, files: Optional[list], name: str, folder: str) -> list:
        if not files:
            return self._refresh(self._folder(name, folder), "Drop some images or a zip first.", "error")
        try:
            target = self._folder(name, folder)
        except DatasetPathError as e:
            return [gr.update(), render.message(str(e), "error"), gr.update(), gr.update(), gr.update()]
        report = save_uploads(files, target)
        return self._refresh(target, report.summary(), "error" if report.skipped else "ok")

    def open_folder(self, name: str, folder: str) -> list:
        target = self._folder(name, folder)
        return self._refresh(target, f"{len(list_images(target))} images in {target}")

    def check(self, folder: str, resolution: Any = None) -> str:
        """The daemon's dataset check at the resolution set in the Train section (small images are flagged
        against what this run will train at, not a fixed 512)."""
        if not folder:
            return render.message("Add images or choose a dataset folder first.", "error")
        options = {}
        try:
            if resolution not in (None, "") and int(float(resolution)) > 0:
                options["resolution"] = int(float(resolution))
        except (TypeError, ValueError):
            pass  # a bad number is the Train form's to report; the check uses the engine's default meanwhile
        try:
            return render.check_report(self.ctx.client().check(folder, **options))
        except (DaemonNotRunning, DaemonError) as e:
            return render.message(_daemon_message(e), "error")

    def autocaption(self, folder: str, captioner: Optional[str], overwrite: bool) -> list:
        if not folder:
            return self._refresh(self._folder("my_dataset", ""), "Choose a dataset folder first.", "error")
        path = Path(folder)
        captioner = captioner or self._first_captioner()
        if not captioner:
            return self._refresh(path, "No captioner is available: put a captioner's weights in place (see the "
                                       "README's auto-label section) or start the daemon.", "error")
        if captioner in self.ctx.interrogators:
            return self._caption_here(path, captioner, overwrite)
        try:
            client = self.ctx.client()
            run = client.caption(str(path), captioner=captioner, overwrite=bool(overwrite))
            deadline = time.monotonic() + CAPTION_WAIT_S
            while run.get("status") not in ("finished", "failed", "cancelled") and time.monotonic() < deadline:
                time.sleep(0.5)
                run = client.get(run["id"])
        except (DaemonNotRunning, DaemonError) as e:
            return self._refresh(path, _daemon_message(e), "error")
        if run.get("status") == "finished":
            return self._refresh(path, f"Captioned with {captioner}.", "ok")
        return self._refresh(path, f"Captioning is {run.get('status')}: {run.get('error') or 'see the Runs section'}",
                             "error")

    def _caption_here(self, folder: Path, captioner: str, overwrite: bool) -> list:
        """Caption with one of the WebUI's own interrogators (they run in the WebUI process, on its models)."""
        interrogate: Callable[[Path], str] = self.ctx.interrogators[captioner]
        try:
            client = self.ctx.client()
            entries = client.captions_get(str(folder)).get("entries", [])
            done = 0
            for entry in entries:
                if entry.get("caption") and not overwrite:
                    continue
                caption = interrogate(folder / entry["file"])
                client.captions_set(str(folder), entry["file"], caption)
                done += 1
        except (DaemonNotRunning, DaemonError) as e:
            return self._refresh(folder, _daemon_message(e), "error")
        return self._refresh(folder, f"Captioned {done} image(s) with {captioner}.", "ok")

    def select_image(self, entries: list, evt: gr.SelectData) -> tuple:
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        if not entries or index >= len(entries):
            return "", ""
        entry = entries[index]
        return entry["file"], entry.get("caption") or ""

    def save_caption(self, folder: str, file: str, text: str) -> list:
        if not folder or not file:
            return self._refresh(Path(folder or "."), "Click an image first.", "error")
        try:
            confined(Path(folder), file)
            self.ctx.client().captions_set(folder, file, text)
        except DatasetPathError as e:
            return self._refresh(Path(folder), str(e), "error")
        except (DaemonNotRunning, DaemonError) as e:
            return self._refresh(Path(folder), _daemon_message(e), "error")
        return self._refresh(Path(folder), f"Saved the caption of {file}.", "ok")

    def _edit(self, folder: str, op: str, params: dict) -> list:
        if not folder:
            return self._refresh(self._folder("my_dataset", ""), "Choose a dataset folder first.", "error")
        try:
            report = self.ctx.client().captions_edit(folder, op, params)
        except (DaemonNotRunning, DaemonError) as e:
            return self._refresh(Path(folder), _daemon_message(e), "error")
        return self._refresh(Path(folder), f"{op}: {len(report.get('changed', []))} caption(s) changed.", "ok")

    def add_trigger(self, folder: str, word: str) -> list:
        return self._edit(folder, "add_trigger", {"word": (word or "").strip()})

    def replace(self, folder: str, find: str, replacement: str) -> list:
        return self._edit(folder, "replace", {"find": find or "", "replace": replacement or ""})

    # ---------------------------------------------------------------- train handlers
    def _field_list(self) -> list:
        return [self.fields[s.key] for s in FIELDS] + [self.text_fields[s.key] for s in TEXT_FIELDS]

    def _config_inputs(self) -> list:
        t = self.train.c
        return [t["kind"], t["base_model"], self.ds.c["folder"], t["extra"]] + self._field_list()

    def _error_outputs(self) -> list:
        return [self.errors[s.key] for s in FIELDS] + [self.text_errors[s.key] for s in TEXT_FIELDS] + \
            [self.errors["extra"], self.train.c["general"]]

    def _form_outputs(self) -> list:
        t = self.train.c
        return [t["kind"], t["base_model"], self.ds.c["folder"], t["extra"]] + self._field_list() + [t["status"]]

    def _wire_train(self) -> None:
        t = self.train.c
        inputs = self._config_inputs()
        errors = self._error_outputs()
        # One status line says what is happening; no per-field "processing" overlay (gradio 3.41 and 4.40 both
        # take show_progress="hidden"). Both steps skip the queue: each is one short daemon request, and the
        # queue's round trips would be most of the time a Start takes.
        for button, handler, note in ((t["validate"], self.validate, "checking…"),
                                      (t["start"], self.start, "queuing…")):
            button.click(lambda note=note: render.message(note), outputs=[t["status"]], queue=False,
                         show_progress="hidden") \
                .then(as_signed_in(handler), inputs=inputs, outputs=errors + [t["plan"], t["status"]],
                      show_progress="hidden", queue=False)
        t["show_yaml"].click(self.show_yaml, inputs=inputs, outputs=[t["yaml"]] + errors)
        t["load_yaml"].click(self.load_yaml, inputs=[t["yaml"]], outputs=self._form_outputs())
        t["recommend"].click(as_signed_in(self.recommend), inputs=[t["rec_kind"], t["base_model"], self.ds.c["folder"]],
                             outputs=self._form_outputs() + [t["plan"]])
        t["preset"].change(self.apply_preset, inputs=[t["preset"]],
                           outputs=[self.fields[s.key] for s in FIELDS] + [t["preset_info"]])
        t["refresh_models"].click(self.refresh_models, inputs=[t["base_model"]], outputs=[t["base_model"]])
        parts = [self.fields[k] for k in PART_FIELDS]
        t["base_model"].change(self.pick_model, inputs=[t["base_model"], t["preset"]] + parts,
                               outputs=[t["flux_settings"], t["family_note"], t["preset"]] + parts)
        t["kind"].change(self.show_kind, inputs=[t["kind"]],
                         outputs=[t["image_form"], t["image_advanced"], t["text_form"]])

    def show_kind(self, kind: str) -> list:
        """One form at a time; the other keeps its values, so switching back loses nothing."""
        text = kind == TEXT_KIND
        return [gr.update(visible=not text), gr.update(visible=not text), gr.update(visible=text)]

    def _preset_text(self, name: Optional[str]) -> str:
        if not name:
            return ""
        try:
            return f"*{get_preset(name).description}*"
        except KeyError as e:
            return str(e)

    def _models(self) -> dict[str, str]:
        """The Base model list: the host's checkpoints by title, a FLUX.1 one with its family after the title
        (read from the file's header, `checkpoint_family`)."""
        out = {}
        for title, path in self.ctx.checkpoints().items():
            family = family_of(path)
            out[f"{title} · {FAMILY_LABELS[family]}" if family else title] = path
        return out

    def _model_path(self, title: Optional[str]) -> Optional[str]:
        if not title:
            return None
        return self._models().get(title) or self.ctx.checkpoints().get(title, title)

    def _family(self, title: Optional[str]) -> str:
        """``flux`` or ``sd``: which settings and presets the picked base model takes."""
        path = self._model_path(title)
        return "flux" if path and family_of(path) else "sd"

    def _family_note(self, title: Optional[str]) -> str:
        if self._family(title) != "flux":
            return ""
        if self.ctx.host == "a1111":
            return render.message(A1111_NO_FLUX.format(name=title).split(": ", 1)[1], "error")
        label = FAMILY_LABELS[family_of(self._model_path(title))]
        return render.message(f"{label}: the FLUX settings are below; the LoRA loads in Forge and ComfyUI.")

    def _family_refusal(self, kind: str, base_model: Optional[str]) -> Optional[str]:
        """A1111 cannot run FLUX: say so before anything is queued (Forge and the standalone UI train it)."""
        if kind == TEXT_KIND or self.ctx.host != "a1111" or self._family(base_model) != "flux":
            return None
        return A1111_NO_FLUX.format(name=base_model)

    def pick_model(self, title: Optional[str], preset: Optional[str], *part_paths: Optional[str]) -> list:
        """A base model picked: the FLUX settings shown for FLUX only, its family said, the presets of its family
        listed (the default or first one chosen when the current preset is of the other family), and for a
        transformer-only FLUX file the T5/CLIP-L/AE files Forge keeps filled in where those fields are empty."""
        presets = [p.name for p in list_presets(family=self._family(title))]
        default = self.ctx.settings().default_preset
        if preset in presets:  # same family: the preset (and what the user typed since) stays as it is
            preset_update = gr.update(choices=presets)
        else:
            preset_update = gr.update(choices=presets, value=default if default in presets else
                                      (presets[0] if presets else None))
        path = self._model_path(title)
        found = forge_parts(path) if path and self._family(title) == "flux" else {}
        parts = [gr.update(value=found[k]) if k in found and not (current or "").strip() else gr.update()
                 for k, current in zip(PART_FIELDS, part_paths or [None] * len(PART_FIELDS))]
        return [gr.update(visible=self._family(title) == "flux"), self._family_note(title), preset_update] + parts

    def _build_config(self, kind: str, base_model: Optional[str], folder: str, extra_text: str,
                      values: tuple) -> dict:
        """The chosen form → config dict; raises ValueError for a bad Other settings box. The FLUX settings are
        sent only with a FLUX base model (hidden for SD, they must not carry a FLUX preset's values into it)."""
        extra = parse_extra_yaml(extra_text)
        if kind == TEXT_KIND:
            return text_form_to_config(dict(zip([s.key for s in TEXT_FIELDS], values[len(FIELDS):])), None, extra)
        chosen = dict(zip([s.key for s in FIELDS], values[:len(FIELDS)]))
        if self._family(base_model) != "flux":
            chosen = {k: v for k, v in chosen.items() if k not in FLUX_KEYS}
        model_path = self._model_path(base_model)
        chosen["network_weights"] = self._lora_path(chosen.get("network_weights"))
        return form_to_config(chosen, model_path, folder or None, None, extra)

    def _lora_path(self, picked: Optional[str]) -> Optional[str]:
        """A LoRA picked from the Lora folder list as the full path the engine reads; a typed path stays as it is."""
        if picked and picked in list_loras(self.ctx.lora_dir()):
            return str(self.ctx.lora_dir() / picked)
        return picked or None

    def inspect_pick(self, picked: Optional[str]) -> str:
        """"Continue from a LoRA": what the picked file is (family, adapter, rank/alpha per block, metadata)."""
        if not picked:
            return ""
        local = self.ctx.lora_dir() / picked if picked in list_loras(self.ctx.lora_dir()) else Path(picked)
        return lora_info.CACHE.summary_html(self.ctx.client, picked, local)

    def refresh_loras(self, current: Optional[str]):
        """Page load: the Lora folder's files for "Continue from a LoRA" (a run published since shows at once)."""
        return gr.update(choices=list_loras(self.ctx.lora_dir()), value=current or None)

    def _errors(self, problems: list[str], extra_error: str = "", kind: str = IMAGE_KIND) -> list:
        """Each problem next to its field in the form of ``kind``; the other form's error boxes are cleared."""
        shown = TEXT_FIELDS if kind == TEXT_KIND else FIELDS
        by_field, general = problems_by_field(problems, shown)
        out = [render.problems_list(by_field.get(s.key, []) if shown is FIELDS else []) for s in FIELDS]
        out += [render.problems_list(by_field.get(s.key, []) if shown is TEXT_FIELDS else []) for s in TEXT_FIELDS]
        out.append(render.message(extra_error, "error") if extra_error else "")
        out.append(render.problems_list(general, "Fix these before training:") if general else "")
        return out

    def validate(self, kind, base_model, folder, extra_text, *values) -> list:
        """One validation pass in the daemon (the engine's schema); the memory plan is left to the run itself."""
        try:
            config = self._build_config(kind, base_model, folder, extra_text, values)
        except ValueError as e:
            return self._errors([], str(e), kind) + ["", render.message("Fix the Other settings box.", "error")]
        refusal = self._family_refusal(kind, base_model)
        if refusal:
            return self._errors([refusal], kind=kind) + ["", render.message("Pick another base model.", "error")]
        try:
            result = self.ctx.client(timeout=30.0).validate(config)
        except (DaemonNotRunning, DaemonError) as e:
            return self._errors([_daemon_message(e)], kind=kind) + ["", ""]
        if not result.get("ok"):
            return self._errors(list(result.get("problems") or []), kind=kind) + \
                ["", render.message("Fix the fields marked in red.", "error")]
        return self._errors([], kind=kind) + [PLAN_NOTE, render.message("The settings are valid.", "ok")]

    def start(self, kind, base_model, folder, extra_text, *values) -> list:
        """Queue at once: the daemon's submit is the one validation pass, and the memory plan is the run's first
        phase (its result shows in the run's row). A second Start with the same settings while the first run is
        still queued or running gets that run back instead of a duplicate."""
        try:
            config = self._build_config(kind, base_model, folder, extra_text, values)
        except ValueError as e:
            return self._errors([], str(e), kind) + ["", render.message("Nothing was queued.", "error")]
        empty = self._family_refusal(kind, base_model) or (None if kind == TEXT_KIND else self._empty_dataset(folder))
        if empty:
            return self._errors([empty], kind=kind) + ["", render.message("Nothing was queued.", "error")]
        freed = gpu_handoff.webui_vram_mb()  # the plan counts the VRAM the hand-off frees as free
        if freed and isinstance(config.get("training"), dict) and not config["training"].get("webui_vram_mb"):
            config["training"]["webui_vram_mb"] = freed
        try:
            run = self.ctx.client(timeout=30.0).submit(config, lora_dir=str(self.ctx.lora_dir()), dedupe=True)
        except DaemonError as e:
            problems = (e.details or {}).get("problems") or [e.message]
            return self._errors(list(problems), kind=kind) + \
                ["", render.message("Nothing was queued: fix the fields marked in red.", "error")]
        except DaemonNotRunning as e:
            return self._errors([], kind=kind) + ["", render.message(_daemon_message(e), "error")]
        if run.get("duplicate"):
            return self._errors([], kind=kind) + [PLAN_NOTE, render.message(
                f"Already {run.get('status')}: run {run['id']} ({run.get('name')}) has these settings; nothing new "
                f"was queued. Follow it in Runs.", "info")]
        return self._errors([], kind=kind) + [PLAN_NOTE, render.message(
            f"Queued run {run['id']} ({run.get('name')}): follow it in Runs.", "ok")]

    def _empty_dataset(self, folder: str) -> Optional[str]:
        """Why the dataset folder cannot be trained on, found without a child: it holds no images at all. (A missing
        folder is the engine's to name; a deeper look — corrupt files, sizes — is the Check button's.)"""
        path = Path(folder.strip()).expanduser() if folder and folder.strip() else None
        if path is None or not path.is_dir() or list_images(path):
            return None
        return (f"data.train_data_dir: {path} holds no images: add some in the Dataset section (or choose another "
                f"folder) before training")

    def show_yaml(self, kind, base_model, folder, extra_text, *values) -> list:
        try:
            config = self._build_config(kind, base_model, folder, extra_text, values)
        except ValueError as e:
            return [gr.update()] + self._errors([], str(e), kind)
        return [yaml.safe_dump(config, sort_keys=False, allow_unicode=True)] + self._errors([], kind=kind)

    def _fill(self, config: dict, status: str) -> list:
        """A config into the form of its kind (image or text); the other form and the kind radio follow."""
        text = is_text_config(config)
        form, rest = config_to_form(config, TEXT_FIELDS if text else FIELDS)
        base = None if text else rest.pop("base_model", None)
        folder = None if text else rest.pop("train_data_dir", None)
        for key in ("output_dir", "config_dir", "task_type", "logging_dir"):
            rest.pop(key, None)
        if text:
            model_update = gr.update()
        else:
            titles = self._models()
            title = next((t for t, p in titles.items() if p == base), base)
            model_update = gr.update(choices=sorted(set(titles) | ({title} if title else set())), value=title)
        extra = yaml.safe_dump(rest, sort_keys=False, allow_unicode=True) if rest else ""
        image_form = {} if text else form
        text_form = form if text else {}
        return [gr.update(value=TEXT_KIND if text else IMAGE_KIND), model_update,
                gr.update() if text else gr.update(value=folder or ""), gr.update(value=extra)] + \
            [gr.update(value=image_form[s.key]) if s.key in image_form else gr.update() for s in FIELDS] + \
            [gr.update(value=text_form[s.key]) if s.key in text_form else gr.update() for s in TEXT_FIELDS] + \
            [render.message(status, "ok")]

    def _unchanged(self, status: str) -> list:
        return [gr.update() for _ in range(4 + len(FIELDS) + len(TEXT_FIELDS))] + [render.message(status, "error")]

    def load_yaml(self, text: str) -> list:
        try:
            config = yaml.safe_load(text or "")
        except yaml.YAMLError as e:
            return self._unchanged(f"Config YAML: not valid YAML: {e}")
        if not isinstance(config, dict):
            return self._unchanged("Config YAML: paste a mapping of settings (key: value per line).")
        return self._fill(config, "Loaded the YAML into the form.")

    def recommend(self, kind: str, base_model: Optional[str], folder: str) -> list:
        """The daemon's recommendation for the dataset folder (and base model) into the form; each value's reason
        in the table under it."""
        if not folder:
            return self._unchanged("Add images or choose a dataset folder first.") + [gr.update()]
        model_path = self._model_path(base_model)
        try:
            rec = self.ctx.client().recommend(folder, base_model=model_path, kind=kind)
        except (DaemonNotRunning, DaemonError) as e:
            return self._unchanged(_daemon_message(e)) + [gr.update()]
        settings = dict(rec.get("settings") or {})
        settings.pop("base_model", None)  # the Base model menu and the dataset folder keep their choice
        settings.pop("train_data_dir", None)
        filled = self._fill(settings, f"Filled {len(rec.get('reasons') or [])} recommended settings for a {kind} "
                                      f"LoRA; why each, below.")
        filled[1], filled[2] = gr.update(), gr.update()
        return filled + [render.recommendation(rec)]

    def load_run_config(self, run_id: str) -> list:
        if not run_id:
            return self._unchanged("Select a run in the table first.")
        try:
            run = self.ctx.client().get(run_id.strip())
        except (DaemonNotRunning, DaemonError) as e:
            return self._unchanged(_daemon_message(e))
        return self._fill(run.get("config") or {}, f"Loaded the config of run {run_id} into the Train section.")

    def apply_preset(self, name: str) -> list:
        try:
            values = preset_form_values(name, FIELDS)
        except KeyError as e:
            return [gr.update() for _ in FIELDS] + [str(e)]
        return [gr.update(value=values[s.key]) if s.key in values else gr.update() for s in FIELDS] + \
            [self._preset_text(name)]

    def refresh_models(self, current: Optional[str]):
        """Refresh and page load: rescan the checkpoint folders (a model added since the tab was built shows at
        once) and keep the current choice when it is still there."""
        if self.ctx.rescan_checkpoints is not None:
            self.ctx.rescan_checkpoints()
        titles = sorted(self._models())
        return gr.update(choices=titles, value=current if current in titles else (titles[0] if titles else None))

    # ---------------------------------------------------------------- daemon handlers
    def reload_webui_model(self) -> str:
        """The GPU hand-off moved the WebUI's model off the card for training; bring it back now (after a
        generation in progress), instead of at the next generation."""
        handoff = self.ctx.handoff
        if handoff is None or not handoff.reload_now():
            return render.message("There is no WebUI model to reload here (only inside A1111/Forge).", "error")
        return render.message("The WebUI's model is back on its GPU.", "ok")

    def stop_daemon(self) -> str:
        try:
            self.ctx.client().shutdown()
        except DaemonNotRunning:
            return render.message("The daemon is not running.")
        except DaemonError as e:
            return render.message(e.message, "error")
        return render.message("The daemon is stopping; running jobs save a checkpoint and resume next start.", "ok")

    def start_setup(self) -> str:
        if self.ctx.setup is None:
            return render.message("Setup is not available here: install lora-scripts with pip instead.", "error")
        if not self.ctx.setup.start(installed_torch()):
            return render.message("Setup is already running.")
        return render.message(f"Setting up the training engine in {self.ctx.setup.venv_dir} — log below.")


def build_tab(ctx: TabContext) -> gr.Blocks:
    """The tab as a Blocks; the WebUI puts it under the title `TITLE` with elem_id `ELEM_ID`."""
    return TrainTab(ctx).build()
