"""The Lora-folder watchdog: one refresh per finished LoRA file, never for a half-written one."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from lora_daemon.ui.lora_watch import LoraFeed, LoraWatcher, safetensors_complete


def lora_bytes() -> bytes:
    tensors = {f"lora_unet_block_{i}.lora_down.weight": np.ones((4, 64), dtype=np.float16) for i in range(8)}
    return save(tensors, metadata={"ss_output_name": "my_style"})


def write_in_chunks(path: Path, data: bytes, chunks: int = 4, pause: float = 0.1) -> None:
    step = len(data) // chunks + 1
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(pause)


class Recorder:
    """The WebUI-side refresh: remembers each call and whether the file was complete when it was called."""

    def __init__(self):
        self.calls: list[tuple[Path, bool]] = []
        self.event = threading.Event()

    def __call__(self, path: Path) -> None:
        self.calls.append((path, safetensors_complete(path)))
        self.event.set()


def wait_for(predicate, deadline_s: float = 10.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_truncated_safetensors_is_not_complete(tmp_path):
    data = lora_bytes()
    path = tmp_path / "part.safetensors"
    path.write_bytes(data[: len(data) - 10])
    assert not safetensors_complete(path)
    path.write_bytes(data)
    assert safetensors_complete(path)
    path.write_bytes(b"not a safetensors file at all")
    assert not safetensors_complete(path)


def test_file_published_like_the_daemon_triggers_exactly_one_refresh_after_it_is_complete(tmp_path):
    recorder = Recorder()
    watcher = LoraWatcher(tmp_path, recorder, quiet_s=0.3, poll_s=0.05)
    watcher.start()
    try:
        final = tmp_path / "my_style.safetensors"
        tmp = tmp_path / f".my_style.safetensors.{os.getpid()}.tmp"
        write_in_chunks(tmp, lora_bytes())
        os.replace(tmp, final)
        (tmp_path / "my_style.json").write_text('{"activation text": "my_style"}')
        assert wait_for(lambda: recorder.calls)
        time.sleep(1.0)  # give any duplicate event time to show up
    finally:
        watcher.stop()
    assert recorder.calls == [(final, True)]


def test_file_copied_in_slowly_by_hand_is_reported_once_when_whole(tmp_path):
    recorder = Recorder()
    watcher = LoraWatcher(tmp_path, recorder, quiet_s=0.2, poll_s=0.05)
    watcher.start()
    try:
        path = tmp_path / "sub" / "hand_copied.safetensors"
        path.parent.mkdir()
        # pauses longer than the quiet time: the watcher sees a settled but incomplete file and must keep waiting
        write_in_chunks(path, lora_bytes(), chunks=3, pause=0.5)
        assert wait_for(lambda: recorder.calls)
        time.sleep(1.0)
    finally:
        watcher.stop()
    assert recorder.calls == [(path, True)]


def test_stopped_watcher_leaves_no_threads(tmp_path):
    watcher = LoraWatcher(tmp_path, Recorder())
    watcher.start()
    watcher.start()
    assert [t.name for t in threading.enumerate()].count("lora-scripts-watch") == 1
    watcher.stop()
    assert not any(t.name.startswith("lora-scripts-watch") for t in threading.enumerate())


def test_feed_tells_a_new_page_where_it_stands_and_an_old_page_what_is_new(tmp_path):
    feed = LoraFeed()
    feed.add(tmp_path / "a.safetensors")
    assert feed.since(-1) == {"latest": 1, "items": []}
    feed.add(tmp_path / "b.safetensors")
    page = feed.since(1)
    assert page["latest"] == 2 and [i["name"] for i in page["items"]] == ["b"]
