"""The tab's Combine section: pick LoRAs from the Lora folder with weights, see what they are, and merge them into
one LoRA, bake them into a checkpoint, resize one to a lower rank, or extract one from two checkpoints — each a
daemon job that shows progress in Runs like a training run, its report (error, retained energy) shown here on
Refresh and in Runs.

Only the daemon touches the files (``tools.inspect`` and ``tools`` requests; `lora_daemon.tools_job` confines
them to its Lora/checkpoint folders), so the WebUI process never loads a tensor. LoRAs are sent by their name
relative to the Lora folder, which the daemon resolves in its own Lora folder. Works on gradio 3.41 and 4.40:
``gr.update`` for every change, no ``.style()``, multiselect dropdowns only.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from ..client import DaemonError, DaemonNotRunning
from . import lora_info
from .context import TabContext, as_signed_in

log = logging.getLogger(__name__)

MERGE = "Merge into one LoRA"
BAKE = "Bake into a checkpoint"
RESIZE = "Resize one LoRA (lower rank)"
EXTRACT = "Extract a LoRA from two checkpoints"
ACTIONS = (MERGE, BAKE, RESIZE, EXTRACT)
COMMANDS = {MERGE: "merge", BAKE: "bake", RESIZE: "resize", EXTRACT: "extract"}
FINAL = ("finished", "failed", "cancelled")
PRECISIONS = ("fp16", "bf16", "fp32")
MAX_LISTED = 500
DAEMON_DOWN = "The training daemon is not running: start it in the Daemon section."


def list_loras(folder: Path) -> list[str]:
    """LoRA files under the Lora folder as relative names (subfolders as the WebUI shows them), hidden and
    half-written files left out."""
    if not folder.is_dir():
        return []
    names = []
    for path in sorted(folder.rglob("*.safetensors")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        names.append(rel.as_posix())
        if len(names) >= MAX_LISTED:
            break
    return names


def parse_weights(text: str, count: int) -> list[float]:
    """``"0.8, 1"`` → one weight per chosen LoRA; missing ones are 1.0, a bad entry is named."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if len(parts) > count:
        raise ValueError(f"Weights: {len(parts)} given for {count} LoRAs")
    weights = []
    for i, part in enumerate(parts):
        try:
            weights.append(float(part))
        except ValueError:
            raise ValueError(f"Weights: entry {i + 1} ({part!r}) is not a number") from None
    return weights + [1.0] * (count - len(weights))


def _message(error: Exception) -> str:
    if isinstance(error, DaemonNotRunning):
        return DAEMON_DOWN
    return str(getattr(error, "message", None) or error)


def _status(text: str, kind: str = "info") -> str:
    return f'<div class="lora-scripts-status lora-scripts-{kind}">{html.escape(text)}</div>'


def preview_html(infos: list[tuple[str, float, dict]]) -> str:
    """One row per LoRA (family, adapter, rank/alpha, steps, top tags) and a verdict on combining them."""
    rows = []
    for name, weight, info in infos:
        t = info.get("training") or {}
        tags = ", ".join(str(tag[0]) for tag in (t.get("top_tags") or [])[:5])
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            name, weight, info.get("family"), ", ".join(info.get("adapter_types") or []), info.get("rank"),
            info.get("alpha"), info.get("modules"), t.get("steps") or "", tags)) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("LoRA", "weight", "family", "adapter", "rank", "alpha", "modules",
                                             "steps", "top tags"))
    families = sorted({str(info.get("family")) for _, _, info in infos})
    if len(families) > 1:
        verdict = _status(f"These LoRAs are of different model families ({', '.join(families)}): they cannot be "
                          f"combined.", "error")
    else:
        exact = sum(int(r) if isinstance(r, int) else max(r or [0]) for r in
                    (info.get("rank") for _, _, info in infos))
        verdict = _status(f"One family ({families[0] if families else '?'}); an exact merge has rank {exact}.")
    if len(infos) == 1:
        verdict = ""
    details = "".join(lora_info.inspect_html(info, name) for name, _, info in infos)
    return (f'<table class="lora-scripts-combine-preview"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>{verdict}{details}')


class CombineSection:
    """Builds the section's components (inside the tab's Blocks) and owns its handlers."""

    def __init__(self, ctx: TabContext):
        self.ctx = ctx
        self.c: dict[str, Any] = {}

    def build(self) -> None:
        c = self.c
        names = list_loras(self.ctx.lora_dir())
        models = sorted(self.ctx.checkpoints())
        with gr.Row():
            c["loras"] = gr.Dropdown(choices=names, value=[], multiselect=True, label="LoRAs (from the Lora folder)",
                                     elem_id="lora_scripts_combine_loras")
            c["refresh"] = gr.Button("Refresh", elem_id="lora_scripts_combine_refresh")
        c["weights"] = gr.Textbox(label="Weights, one per LoRA in order (e.g. 0.8, 0.5; missing ones are 1)",
                                  elem_id="lora_scripts_combine_weights")
        c["preview"] = gr.Button("Preview", elem_id="lora_scripts_combine_preview_button")
        c["info"] = gr.HTML(elem_id="lora_scripts_combine_info")
        with gr.Row():
            c["action"] = gr.Radio(choices=list(ACTIONS), value=MERGE, label="Combine by",
                                   elem_id="lora_scripts_combine_action")
            c["rank"] = gr.Number(value=0, precision=0, label="Rank (merge: 0 is exact, the ranks concatenated; "
                                                              "resize: the new rank; extract: 0 is 16)",
                                  elem_id="lora_scripts_combine_rank")
            c["precision"] = gr.Dropdown(choices=list(PRECISIONS), value="fp16", label="Precision",
                                         elem_id="lora_scripts_combine_precision")
        with gr.Row():
            c["fro_ratio"] = gr.Number(value=0, label="Resize by fro-ratio: keep this share (0-1) of each module's "
                                                      "Frobenius norm, rank at most the one above (0: off)",
                                       elem_id="lora_scripts_combine_fro_ratio")
            c["conv"] = gr.Checkbox(value=False, label="Extract: the 3×3 convolutions too, as LoCon",
                                    elem_id="lora_scripts_combine_conv")
        with gr.Row():
            c["base"] = gr.Dropdown(choices=models, label="Base model (bake, extract)",
                                    elem_id="lora_scripts_combine_base")
            c["tuned"] = gr.Dropdown(choices=models, label="Fine-tuned model (extract)",
                                     elem_id="lora_scripts_combine_tuned")
            c["out"] = gr.Textbox(label="Output name", value="combined", elem_id="lora_scripts_combine_out")
        c["run"] = gr.Button("Combine", variant="primary", elem_id="lora_scripts_combine_run")
        c["status"] = gr.HTML(elem_id="lora_scripts_combine_status")
        c["job"] = gr.State("")
        form = [c["action"], c["loras"], c["weights"], c["rank"], c["base"], c["out"], c["precision"],
                c["fro_ratio"], c["tuned"], c["conv"]]
        c["refresh"].click(as_signed_in(self.refresh), inputs=[c["loras"], c["base"], c["tuned"], c["job"]],
                           outputs=[c["loras"], c["base"], c["tuned"], c["status"]])
        c["preview"].click(as_signed_in(self.preview), inputs=[c["loras"], c["weights"]], outputs=[c["info"]])
        # A pick shows what the files are. gradio 3.41 drops a change that fires while the last one still runs (a
        # summary is a daemon child, seconds), so a follow-up step shows the choice again if it moved meanwhile.
        c["shown"] = gr.State([])
        c["loras"].change(as_signed_in(self.preview_pick), inputs=[c["loras"], c["weights"]],
                          outputs=[c["info"], c["shown"]]) \
            .then(as_signed_in(self.preview_again), inputs=[c["loras"], c["weights"], c["shown"]],
                  outputs=[c["info"], c["shown"]])
        c["run"].click(as_signed_in(self.run), inputs=form, outputs=[c["status"], c["loras"], c["job"]])

    # ---------------------------------------------------------------- handlers
    def refresh(self, chosen: Optional[list], base: Optional[str], tuned: Optional[str] = None,
                job: Optional[str] = None):
        """The Lora folder and checkpoint lists again (a finished job's file shows), and the last job's state:
        progress while it runs, its report and the new file's summary once it is done."""
        names = list_loras(self.ctx.lora_dir())
        models = sorted(self.ctx.checkpoints())
        return (gr.update(choices=names, value=[n for n in (chosen or []) if n in names]),
                gr.update(choices=models, value=base if base in models else None),
                gr.update(choices=models, value=tuned if tuned in models else None),
                self.job_status(job) if job else gr.update())

    def preview(self, chosen: Optional[list], weights_text: str) -> str:
        chosen = list(chosen or [])
        if not chosen:
            return _status("Choose one or more LoRAs first.", "error")
        try:
            weights = parse_weights(weights_text, len(chosen))
            infos = [(name, w, self.inspect(name)) for name, w in zip(chosen, weights)]
        except (ValueError, DaemonError, DaemonNotRunning) as e:
            return _status(_message(e), "error")
        return preview_html(infos)

    def preview_pick(self, chosen: Optional[list], weights_text: str):
        """`preview` of a pick, with the choice it shows (for `preview_again`)."""
        chosen = list(chosen or [])
        return (self.preview(chosen, weights_text) if chosen else ""), chosen

    def preview_again(self, chosen: Optional[list], weights_text: str, shown: Optional[list]):
        """After a pick's preview: the choice as it is now, if it is not the one shown (a pick made meanwhile)."""
        chosen = list(chosen or [])
        if chosen == list(shown or []):
            return gr.update(), shown
        return self.preview_pick(chosen, weights_text)

    def inspect(self, name: str) -> dict:
        """The daemon's inspect summary of a file in the Lora folder (kept while the file is unchanged)."""
        return lora_info.CACHE.inspect(self.ctx.client, name, self.ctx.lora_dir() / name)

    def _checkpoint(self, title: Optional[str], label: str) -> str:
        models = self.ctx.checkpoints()
        if not title or title not in models:
            raise ValueError(f"{label}: choose it in the list.")
        return str(models[title])

    def request(self, action: str, chosen: list, weights_text: str, rank: Any, base: Optional[str], out: str,
                precision: str, fro_ratio: Any = 0, tuned: Optional[str] = None,
                conv: bool = False) -> tuple[str, dict]:
        """The daemon request the form describes (command, arguments); a form mistake raises ValueError."""
        if action not in COMMANDS:
            raise ValueError(f"Combine by: one of {', '.join(ACTIONS)}")
        out = (out or "").strip()
        if not out:
            raise ValueError("Output name: give the new file a name.")
        rank = int(rank or 0)
        if rank < 0:
            raise ValueError("Rank: 0 or a positive rank")
        args: dict[str, Any] = {"out": out, "precision": precision or "fp16"}
        if action == EXTRACT:
            args["tuned"] = self._checkpoint(tuned, "Fine-tuned model (extract)")
            args["base"] = self._checkpoint(base, "Base model (the checkpoint it was tuned from)")
            if args["tuned"] == args["base"]:
                raise ValueError("Fine-tuned model: choose another checkpoint than the base model.")
            args["rank"] = rank or 16
            if conv:
                args["conv_rank"] = args["rank"]
            return "extract", args
        if not chosen:
            raise ValueError("Choose one or more LoRAs first.")
        if action == RESIZE:
            if len(chosen) != 1:
                raise ValueError(f"Resize: choose exactly one LoRA ({len(chosen)} chosen).")
            args["file"] = chosen[0]
            fro = float(fro_ratio or 0)
            if not 0 <= fro <= 1:
                raise ValueError(f"Fro-ratio: a share between 0 and 1, got {fro:g}")
            if fro:
                args.update(dynamic="sv_fro", param=fro)
            elif not rank:
                raise ValueError("Rank: give the new rank, or a fro-ratio.")
            if rank:
                args["rank"] = rank
            return "resize", args
        weights = parse_weights(weights_text, len(chosen))
        args["loras"] = [{"path": n, "weight": w} for n, w in zip(chosen, weights)]
        if action == BAKE:
            args["base"] = self._checkpoint(base, "Base model")
            return "bake", args
        if rank:
            args["rank"] = rank
        return "merge", args

    def run(self, action: str, chosen: Optional[list], weights_text: str, rank: Any, base: Optional[str],
            out: str, precision: str, fro_ratio: Any = 0, tuned: Optional[str] = None, conv: bool = False):
        names = list_loras(self.ctx.lora_dir())
        try:
            command, args = self.request(action, list(chosen or []), weights_text, rank, base, out, precision,
                                         fro_ratio, tuned, conv)
            job = self.ctx.client(timeout=10.0).tools(command, **args)
        except (ValueError, DaemonError, DaemonNotRunning) as e:
            return _status(_message(e), "error"), gr.update(choices=names), gr.update()
        where = "the checkpoint folder" if command == "bake" else "the Lora folder"
        return (_status(f"Queued {job['name']} as job {job['id']}: follow it in Runs; the file appears in {where} "
                        f"when it finishes (press Refresh to see it and the job's report)."),
                gr.update(choices=names), job["id"])

    def job_status(self, job_id: str) -> str:
        """The last job in words: its progress, or its failure, or its report and the new LoRA's summary."""
        try:
            client = self.ctx.client(timeout=10.0)
            run = client.get(job_id)
            if run["status"] not in FINAL:
                step, total = run.get("step") or 0, run.get("total_steps") or "?"
                return _status(f"Job {job_id} ({run.get('name')}): {run['status']}, {step}/{total}.")
            if run["status"] != "finished":
                return _status(f"Job {job_id} ({run.get('name')}) {run['status']}: {run.get('error') or ''}",
                               "error")
            report = lora_info.report_from_log(client.logs(job_id, tail=lora_info.REPORT_TAIL))
            parts = [_status(f"Job {job_id} finished: {run.get('output_file')}", "ok")]
            if report:
                parts.append(lora_info.report_html(report))
            output = Path(str(run.get("output_file") or ""))
            lora_dir = self.ctx.lora_dir()
            if run.get("config", {}).get("command") != "bake" and output.name in list_loras(lora_dir):
                parts.append(lora_info.inspect_html(self.inspect(output.name)))
            return "".join(parts)
        except (DaemonError, DaemonNotRunning) as e:
            return _status(_message(e), "error")
