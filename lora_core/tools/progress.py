"""Progress of a long tool command, reported in one place: a tqdm bar at the terminal and/or JSON-lines events.

The daemon runs tool jobs as ``python -m lora_core.tools … --events FILE`` and shows the ``progress`` events
(done, total, what) like a run's steps; the ``end`` event carries the output file, as training's does.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional


class Progress:
    """``update(done, total, what)`` from the work loop; ``close()`` at the end. Events are throttled to ~10/s."""

    def __init__(self, bar: bool = False, events: Optional[str | Path] = None, desc: str = ""):
        self.desc = desc
        self._bar = None
        self._want_bar = bar
        self._writer = None
        self._last = 0.0
        if events:
            from ..events import EventWriter

            self._writer = EventWriter(events)

    def update(self, done: int, total: int, what: str = "") -> None:
        if self._want_bar:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=self.desc, unit="tensor", dynamic_ncols=True, leave=False)
            self._bar.n = done
            self._bar.refresh()
        now = time.monotonic()
        if self._writer is not None and (now - self._last > 0.1 or done >= total):
            self._last = now
            self._writer.emit("progress", done=done, total=total, what=what or self.desc)

    def emit(self, type: str, **fields: Any) -> None:
        if self._writer is not None:
            self._writer.emit(type, **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


NO_PROGRESS = Progress()
