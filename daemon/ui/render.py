"""Small HTML fragments for the tab: the dataset check report, tag frequency, field errors, daemon status.

Kept apart from the layout so the same text appears in gradio 3 and 4 (both render `gr.HTML` the same way),
and every value from the user or the daemon is escaped.
"""
from __future__ import annotations

from collections import Counter
from html import escape
from typing import Optional


def message(text: str, kind: str = "info") -> str:
    """One status line; ``kind`` is info | ok | error (styled by style.css)."""
    return f'<div class="lora-scripts-msg lora-scripts-{kind}">{escape(text)}</div>' if text else ""


def problems_list(problems: list[str], title: Optional[str] = None) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{escape(p)}</li>" for p in problems)
    head = f"<b>{escape(title)}</b>" if title else ""
    return f'<div class="lora-scripts-msg lora-scripts-error">{head}<ul>{items}</ul></div>'


def count_tags(entries: list[dict]) -> dict[str, int]:
    """Comma-separated tags per caption, counted once per image (what the tag-frequency table shows)."""
    counts: Counter = Counter()
    for entry in entries:
        counts.update({t.strip().lower() for t in (entry.get("caption") or "").split(",") if t.strip()})
    return dict(counts)


def tag_table(frequency: dict[str, int], top: int = 40) -> str:
    if not frequency:
        return message("No tags yet: caption the images first.")
    rows = sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    body = "".join(f"<tr><td>{escape(tag)}</td><td>{n}</td></tr>" for tag, n in rows)
    return (f'<table class="lora-scripts-table lora-scripts-tags"><thead><tr><th>tag ({len(frequency)} distinct)'
            f"</th><th>images</th></tr></thead><tbody>{body}</tbody></table>")


def check_report(report: dict) -> str:
    """The daemon's `check` result: a one-line verdict, then every problem with the file it concerns."""
    s = report.get("summary", {})
    verdict = (f"{s.get('readable_images', 0)} readable images, {s.get('captioned', 0)} captioned, "
               f"{s.get('errors', 0)} errors, {s.get('warnings', 0)} warnings")
    if s.get("min_size"):
        verdict += f"; sizes {s['min_size'][0]}×{s['min_size'][1]} to {s['max_size'][0]}×{s['max_size'][1]}"
    parts = [message(verdict, "ok" if report.get("ok") else "error")]
    problems = report.get("problems") or []
    if problems:
        rows = "".join(
            f"<tr><td>{escape(p.get('severity', ''))}</td><td>{escape(p.get('file', ''))}</td>"
            f"<td>{escape(p.get('kind', ''))}</td><td>{escape(p.get('detail', ''))}</td></tr>" for p in problems)
        parts.append('<table class="lora-scripts-table"><thead><tr><th></th><th>file</th><th>problem</th>'
                     f"<th>detail</th></tr></thead><tbody>{rows}</tbody></table>")
    return "".join(parts)


def _memory_part(plan: dict) -> dict:
    if "estimate_mb" in plan:
        return plan
    return next((v for v in plan.values() if isinstance(v, dict) and "estimate_mb" in v), {})


def vram_plan(plan: dict) -> str:
    """The engine's plan (``lora_core.train --plan``) in one line: steps, estimated peak memory, the suggestion."""
    parts = []
    if plan.get("total_steps"):
        parts.append(f"{plan['total_steps']} steps")
    memory = _memory_part(plan)
    if memory:
        usable = memory.get("capacity_mb", 0) * 0.9
        parts.append(f"estimated peak {memory['estimate_mb']:,.0f} MB of {usable:,.0f} MB usable on "
                     f"{memory.get('device', '?')} ({'fits' if memory.get('fits') else 'does NOT fit'})")
        if memory.get("suggestion"):
            pretty = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in memory["suggestion"].items())
            parts.append(f"suggested: {pretty}")
    if not parts:
        return message("VRAM plan: " + ", ".join(f"{k}={v}" for k, v in plan.items() if not isinstance(v, dict)))
    return message("VRAM plan: " + "; ".join(parts), "ok" if memory.get("fits", True) else "error")


def health_list(events: list[dict]) -> str:
    """A run's training-health warnings (its stored ``run.health`` events), newest last, each with its advice."""
    if not events:
        return ""
    rows = "".join(
        f'<li data-kind="{escape(str(e.get("kind", "")))}"><b>step {escape(str(e.get("step", "?")))}: '
        f'{escape(str(e.get("kind", "")).replace("_", " "))}</b> — {escape(str(e.get("message", "")))}. '
        f'<i>{escape(str(e.get("advice") or ""))}</i></li>' for e in events)
    return f'<div id="lora_scripts_run_health" class="lora-scripts-msg lora-scripts-error"><b>Training health</b>' \
           f"<ul>{rows}</ul></div>"


def recommendation(rec: dict) -> str:
    """The daemon's `recommend` result: every setting with its reason and the source of the rule, what earlier
    runs changed, and the notes (what was skipped or estimated)."""
    rows = "".join(f"<tr><td>{escape(str(r.get('field')))}</td><td>{escape(str(r.get('value')))}</td>"
                   f"<td>{escape(str(r.get('reason')))}</td><td>{escape(str(r.get('source')))}</td></tr>"
                   for r in rec.get("reasons") or [])
    history = "".join(f"<li>{escape(str(h.get('field')))}: {escape(str(h.get('from')))} → {escape(str(h.get('to')))}"
                      f" — {escape(str(h.get('why')))}</li>" for h in rec.get("history") or [])
    notes = "".join(f"<li>{escape(str(n))}</li>" for n in rec.get("notes") or [])
    return (f'<div id="lora_scripts_recommendation"><table class="lora-scripts-table"><thead><tr><th>setting</th>'
            f"<th>value</th><th>why</th><th>source</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f"<b>Adjusted for your earlier runs</b><ul>{history}</ul>" if history else "")
            + (f"<ul>{notes}</ul>" if notes else "") + "</div>")
