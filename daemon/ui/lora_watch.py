"""Notice finished LoRA files in the WebUI's Lora folder, so new cards appear without a WebUI restart.

`<lora:NAME:w>` in a prompt already finds a new file by name; what stays stale is the WebUI's card list, built from
`networks.available_networks`. This watcher (a watchdog observer on the Lora folder) waits until a `.safetensors`
file is complete — the daemon copies to a temp name and renames, but a user may also copy a file in by hand —
and then calls ``on_ready(path)`` exactly once per file. The caller refreshes the WebUI's list and records the
file in a `LoraFeed`, which the tab's JavaScript polls to refresh the cards and show a toast.

Threads are started by `LoraWatcher.start` and stopped by `LoraWatcher.stop`, never at import: the WebUI's
"Reload UI" re-imports scripts in the same process, and threads started at import would pile up.
"""
from __future__ import annotations

import collections
import json
import logging
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

THREAD_NAME = "lora-scripts-watch"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def safetensors_complete(path: Path) -> bool:
    """True when the file holds a whole safetensors payload: header length, header JSON and every tensor's bytes.

    A half-copied file has a valid header but is shorter than the header says, which is what this checks; the
    WebUI would otherwise cache a broken card (or fail to load the LoRA) for a file still being written.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                return False
            header = json.loads(fh.read(n))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return size == 8 + n + max(ends, default=0)


@dataclass
class LoraReady:
    seq: int
    name: str
    path: str
    time: float


class LoraFeed:
    """The recently finished LoRA files, numbered, so a browser can ask "anything new since N?" when it polls."""

    def __init__(self, keep: int = 50):
        self._lock = threading.Lock()
        self._items: collections.deque[LoraReady] = collections.deque(maxlen=keep)
        self._seq = 0

    def add(self, path: Path) -> LoraReady:
        with self._lock:
            self._seq += 1
            item = LoraReady(seq=self._seq, name=path.stem, path=str(path), time=round(time.time(), 3))
            self._items.append(item)
            return item

    def since(self, seq: int) -> dict:
        """Items newer than ``seq`` and the newest number (a page loads with since=-1 to learn where it stands)."""
        with self._lock:
            items = [asdict(i) for i in self._items if i.seq > seq] if seq >= 0 else []
            return {"latest": self._seq, "items": items}


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "LoraWatcher"):
        self._watcher = watcher

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._watcher.touch(Path(event.src_path), new=True)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._watcher.touch(Path(event.dest_path), new=True)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._watcher.touch(Path(event.src_path), new=False)


class LoraWatcher:
    """Watch ``folder`` (recursively) and call ``on_ready(path)`` once per new, complete `.safetensors` file.

    A file counts as settled after ``quiet_s`` seconds without events; it is then reported if
    `safetensors_complete` says so, and otherwise checked again until it is (or until it disappears).
    """

    def __init__(self, folder: Path, on_ready: Callable[[Path], None], quiet_s: float = 1.0, poll_s: float = 0.25):
        self.folder = Path(folder)
        self._on_ready = on_ready
        self._quiet_s = quiet_s
        self._poll_s = poll_s
        self._pending: dict[Path, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer: Optional[Observer] = None
        self._checker: Optional[threading.Thread] = None

    @property
    def running(self) -> bool:
        return self._observer is not None

    def touch(self, path: Path, new: bool) -> None:
        """Note an event for ``path``; modifications only extend the wait of files already pending."""
        if path.suffix.lower() != ".safetensors":
            return
        with self._lock:
            if new or path in self._pending:
                self._pending[path] = time.monotonic()

    def start(self) -> None:
        if self.running:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        observer = Observer()
        observer.name = THREAD_NAME
        observer.daemon = True
        observer.schedule(_Handler(self), str(self.folder), recursive=True)
        observer.start()
        self._observer = observer
        self._checker = threading.Thread(target=self._check_loop, name=f"{THREAD_NAME}-settle", daemon=True)
        self._checker.start()
        log.info("watching %s for new LoRA files", self.folder)

    def stop(self) -> None:
        if not self.running:
            return
        self._stop.set()
        self._observer.stop()
        self._observer.join(timeout=5)
        self._checker.join(timeout=5)
        self._observer = None
        self._checker = None
        with self._lock:
            self._pending.clear()

    def _settled(self) -> list[Path]:
        now = time.monotonic()
        with self._lock:
            return [p for p, t in self._pending.items() if now - t >= self._quiet_s]

    def _check_loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            for path in self._settled():
                if not path.exists():
                    with self._lock:
                        self._pending.pop(path, None)
                elif safetensors_complete(path):
                    with self._lock:
                        self._pending.pop(path, None)
                    self._report(path)

    def _report(self, path: Path) -> None:
        try:
            self._on_ready(path)
        except Exception:  # a failing WebUI refresh must not kill the watcher thread
            log.exception("handling new LoRA file %s failed", path)
