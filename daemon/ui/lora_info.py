"""What a LoRA file is and what a toolbox job reported, as the tab shows them (Combine picks, the continue-from
pick, the Runs view): the ``lora-tools inspect`` summary and the merge/resize/extract report, in HTML.

Both come from the daemon — ``tools.inspect`` runs in a child there, and a toolbox job prints its report as the
last JSON line of its log (``lora-tools … --json``) — so the WebUI process reads no tensor and imports no engine.
An inspect costs a child process (seconds on a busy machine), so answers are kept per file state (size + mtime):
picking the same file again, or polling a finished run, asks once.
"""
from __future__ import annotations

import html
import json
import threading
from pathlib import Path
from typing import Any, Callable, Optional

INSPECT_TIMEOUT_S = 120.0
MAX_CACHED = 256
REPORT_TAIL = 40  # the report is the child's last stdout line; a warning or two may follow it on stderr


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _join(values: Any) -> str:
    if isinstance(values, (list, tuple)):
        return ", ".join(str(v) for v in values) or "-"
    return "-" if values is None else str(values)


def inspect_html(info: dict, title: Optional[str] = None) -> str:
    """One file's summary: family, adapter, rank/alpha, modules, then rank/alpha per block and the training
    metadata (steps, images, base model and hash, trigger, top tags, what it was merged from)."""
    t = info.get("training") or {}
    size = info.get("size_bytes")
    head = (f"<b>{_e(title or Path(str(info.get('file') or '?')).name)}</b>: {_e(info.get('family'))} "
            f"· {_e(_join(info.get('adapter_types')))} · rank {_e(_join(info.get('rank')))} · alpha "
            f"{_e(_join(info.get('alpha')))} · {_e(info.get('modules'))} modules ({_e(info.get('unet_modules'))} "
            f"UNet, {_e(info.get('text_encoder_modules'))} text encoder)"
            + (f" · {size / 2**20:.1f} MB" if isinstance(size, (int, float)) else ""))
    rows = "".join(f"<tr><td>{_e(name)}</td><td>{_e(b.get('modules'))}</td><td>{_e(_join(b.get('rank')))}</td>"
                   f"<td>{_e(_join(b.get('alpha')))}</td><td>{_e(_join(b.get('types')))}</td></tr>"
                   for name, b in (info.get("blocks") or {}).items())
    blocks = ('<table class="lora-scripts-table lora-scripts-inspect-blocks"><thead><tr><th>block</th>'
              f"<th>modules</th><th>rank</th><th>alpha</th><th>type</th></tr></thead><tbody>{rows}</tbody></table>"
              if rows else "")
    facts = [(label, t.get(key)) for label, key in (
        ("steps", "steps"), ("epochs", "epochs"), ("images", "images"), ("resolution", "resolution"),
        ("base model", "base_model"), ("base model hash", "base_model_hash"), ("trigger", "trigger"))]
    facts = [(label, value) for label, value in facts if value not in (None, "")]
    tags = ", ".join(f"{tag} ({n})" for tag, n in (t.get("top_tags") or [])[:10])
    if tags:
        facts.append(("top tags", tags))
    if t.get("merged_from"):
        facts.append(("merged from", json.dumps(t["merged_from"])))
    meta = "".join(f"<li>{_e(label)}: {_e(value)}</li>" for label, value in facts)
    return (f'<div class="lora-scripts-inspect" data-family="{_e(info.get("family"))}" '
            f'data-rank="{_e(_join(info.get("rank")))}"><div>{head}</div>{blocks}'
            + (f"<ul>{meta}</ul>" if meta else "") + "</div>")


def report_from_log(lines: list[str]) -> Optional[dict]:
    """A toolbox job's report: the last log line that is a JSON object naming its ``output``."""
    for line in reversed(lines or []):
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            report = json.loads(text)
        except ValueError:
            continue
        if isinstance(report, dict) and "output" in report:
            return report
    return None


def _worst(per_module: dict, key: str, lowest: bool, n: int = 8) -> list[tuple[str, float]]:
    items = [(name, float(m[key] if isinstance(m, dict) else m)) for name, m in per_module.items()
             if (m.get(key) if isinstance(m, dict) else m) is not None]
    return sorted(items, key=lambda kv: kv[1], reverse=not lowest)[:n]


def report_html(report: dict) -> str:
    """What a merge/resize/extract did, in numbers: rank, the retained energy (resize) and the relative error
    (SVD merge, resize, extract) overall and for the modules that lost the most."""
    parts = [f"<b>{_e(Path(str(report.get('output') or '?')).name)}</b>"]
    for label, key in (("family", "family"), ("method", "method"), ("rank", "rank"), ("conv rank", "conv_rank"),
                       ("modules", "modules")):
        if report.get(key) not in (None, ""):
            parts.append(f"{label} {_e(_join(report[key]))}")
    lines = [" · ".join(parts)]
    if report.get("min_retained") is not None:
        lines.append(f"retained energy: lowest {100 * float(report['min_retained']):.2f}% of a module's")
    if report.get("max_relative_error") is not None:
        lines.append(f"relative error: mean {float(report.get('mean_relative_error') or 0):.4g}, "
                     f"max {float(report['max_relative_error']):.4g}")
    per_module = report.get("per_module") or {}
    errors = report.get("error_per_module") or {}
    rows = ""
    if per_module and any(isinstance(m, dict) and "retained" in m for m in per_module.values()):
        rows = "".join(f"<tr><td>{_e(name)}</td><td>{_e(per_module[name].get('rank_before'))} → "
                       f"{_e(per_module[name].get('rank'))}</td><td>{100 * value:.2f}%</td>"
                       f"<td>{float(per_module[name].get('relative_error') or 0):.4g}</td></tr>"
                       for name, value in _worst(per_module, "retained", lowest=True))
        head = "<th>module (least retained)</th><th>rank</th><th>retained</th><th>relative error</th>"
    elif errors or per_module:
        source = errors or per_module
        key = "relative_error"
        rows = "".join(f"<tr><td>{_e(name)}</td><td>{value:.4g}</td></tr>"
                       for name, value in _worst(source, key, lowest=False))
        head = "<th>module (largest error)</th><th>relative error</th>"
    table = (f'<table class="lora-scripts-table lora-scripts-tool-report-modules"><thead><tr>{head}</tr></thead>'
             f"<tbody>{rows}</tbody></table>" if rows else "")
    return ('<div class="lora-scripts-tool-report">' + "".join(f"<div>{line}</div>" for line in lines) + table
            + "</div>")


class InspectCache:
    """``tools.inspect`` answers per file state; a file that changed (a forced overwrite) is asked again."""

    def __init__(self, limit: int = MAX_CACHED):
        self._lock = threading.Lock()
        self._answers: dict[tuple, Any] = {}  # a summary, or the DaemonError
        self._limit = limit

    @staticmethod
    def _state(path: Optional[Path]) -> Optional[tuple]:
        try:
            st = path.stat() if path is not None else None
        except OSError:
            return None
        return (str(path), st.st_size, st.st_mtime_ns) if st else None

    def inspect(self, client: Callable[..., Any], name: str, local: Optional[Path] = None) -> dict:
        """The daemon's summary of ``name`` (relative to its Lora folder, or a path in its folders); ``local`` is
        the same file as this process sees it, whose size and mtime key the cache (None: always asked)."""
        from ..client import DaemonError

        key = self._state(local)
        with self._lock:
            if key is not None and key in self._answers:
                answer = self._answers[key]
                if isinstance(answer, Exception):
                    raise answer
                return answer
        try:
            answer = client(timeout=INSPECT_TIMEOUT_S).tools_inspect(name, timeout=INSPECT_TIMEOUT_S)
        except DaemonError as e:  # the file is not a LoRA it can read: the same answer until the file changes
            answer = e
        if key is not None:
            with self._lock:
                if len(self._answers) >= self._limit:
                    self._answers.pop(next(iter(self._answers)))
                self._answers[key] = answer
        if isinstance(answer, Exception):
            raise answer
        return answer

    def summary_html(self, client: Callable[..., Any], name: str, local: Optional[Path] = None) -> str:
        """`inspect_html` of the file, or why it could not be read (the daemon down, not a LoRA)."""
        from ..client import DaemonError, DaemonNotRunning

        try:
            return inspect_html(self.inspect(client, name, local))
        except DaemonNotRunning:
            return ""
        except DaemonError as e:
            return f'<div class="lora-scripts-msg lora-scripts-error">{_e(Path(name).name)}: {_e(e.message)}</div>'


CACHE = InspectCache()  # one per WebUI process: the tab's pickers and the Runs view share it
