"""A run's log as the tab's log pane and `lora-daemon logs` show it: no terminal escapes, one line per bar."""
from __future__ import annotations

from lora_daemon.worker import read_new_lines, readable, tail_lines


def test_progress_bar_redraws_and_escapes_become_one_readable_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_bytes("INFO start\n"
                    "Writing model shards:   0%|   | 0/1\rWriting model shards: 100%|###| 1/1\n"
                    "\x1b[A\x1b[2K\x1b[32mtraining 5/10\x1b[0m\r\n"
                    "done\r\n".encode("utf-8"))
    assert tail_lines(log, 10) == ["INFO start", "Writing model shards: 100%|###| 1/1", "training 5/10", "done"]
    lines, offset = read_new_lines(log, 0)
    assert len(lines) == 4 and offset == log.stat().st_size  # the bar's redraws stay one line
    assert [readable(line) for line in lines] == tail_lines(log, 10)
    assert readable("\x1b]0;title\x07plain") == "plain"
