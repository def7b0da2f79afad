"""The sample completions of a text run, as the Runs section shows them: the latest one per prompt.

The engine writes each completion to a ``.txt`` under the run's ``output/samples/`` and announces it with a
``sample`` event (``step``, ``path``, ``prompt``) in ``<run_dir>/events.jsonl``; the event is the only place that
pairs a file with its prompt. Paths come from a file the child process wrote, so each is resolved and must stay
inside the run folder, and texts are cut to `MAX_CHARS` so a runaway generation cannot bloat every poll. Plain
JSON parsing only: the WebUI process never imports the engine.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
MAX_CHARS = 2000
MAX_PROMPTS = 16


def _sample_events(events_path: Path) -> list[dict]:
    """The ``sample`` events of a run, in order; a half-written or broken line is skipped, not fatal."""
    events = []
    try:
        with events_path.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"sample"' not in line:  # cheap filter: most lines are step events
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("type") == "sample":
                    events.append(event)
    except OSError as e:
        log.debug("no events for %s: %s", events_path, e)
    return events


def _read_capped(path: Path) -> tuple[str, bool]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        text = f.read(MAX_CHARS + 1)
    return text[:MAX_CHARS].rstrip("\n"), len(text) > MAX_CHARS


def latest_completions(run_dir: Path) -> list[dict[str, Any]]:
    """[{prompt, step, text, truncated, file}] — per prompt (in the order first sampled) its newest completion.

    ``file`` is relative to the run folder. Files outside the run folder, missing or not ``.txt`` are left out.
    """
    root = Path(run_dir).resolve()
    latest: dict[str, dict] = {}
    for event in _sample_events(root / EVENTS_FILE):
        path = Path(str(event.get("path") or ""))
        target = (path if path.is_absolute() else root / path).resolve()
        if target.suffix.lower() != ".txt" or not target.is_relative_to(root):
            continue
        prompt = str(event.get("prompt") or "")
        latest[prompt] = {"event": event, "target": target}
    completions = []
    for prompt, item in list(latest.items())[-MAX_PROMPTS:]:
        target = item["target"]
        if not target.is_file():
            continue
        text, truncated = _read_capped(target)
        completions.append({"prompt": prompt, "step": item["event"].get("step"), "text": text,
                            "truncated": truncated, "file": target.relative_to(root).as_posix()})
    return completions
