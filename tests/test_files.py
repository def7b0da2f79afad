"""The one atomic-write helper: two real processes writing the same file never leave a torn one, a failing writer
leaves neither a temporary file nor a changed target, and every writer gets its own temporary name."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_core.files import atomic_path, atomic_write_bytes, atomic_write_text, is_temp_name, temp_path

SIZE = 1 << 20  # 1 MiB: big enough that a non-atomic write would be seen half done
WRITES = 60

WRITER = textwrap.dedent("""
    import sys
    from lora_core.files import atomic_write_bytes
    path, letter, n, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])
    for i in range(n):
        atomic_write_bytes(path, letter * size)
""")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_two_processes_writing_one_path_never_leave_a_torn_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    atomic_write_bytes(target, b"0" * SIZE)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), letter, str(WRITES), str(SIZE)],
                                env=_env()) for letter in ("A", "B")]
    seen = set()
    reads = 0
    while any(w.poll() is None for w in writers) or reads < 5:
        data = target.read_bytes()  # a reader (the WebUI loading the LoRA) in a third process
        reads += 1
        assert len(data) == SIZE and data == data[:1] * SIZE, f"torn file: {set(data[:: SIZE // 64])}"
        seen.add(data[:1])
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    final = target.read_bytes()
    assert final in (b"A" * SIZE, b"B" * SIZE)
    assert reads >= 5 and seen <= {b"0", b"A", b"B"}
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary file left by either writer


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old: 1\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("new: half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_writer_that_creates_nothing_is_an_error_and_changes_nothing(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write_text(target, "kept")
    with pytest.raises(FileNotFoundError, match="created nothing"):
        with atomic_path(target):
            pass
    assert target.read_text() == "kept"


def test_a_folder_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "adapter"
    for version in ("v1", "v2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "adapter_config.json").write_text(version)
            if version == "v1":
                (tmp / "only_in_v1.bin").write_bytes(b"1")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json"]
    assert (target / "adapter_config.json").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_failing_folder_writer_keeps_the_old_folder(tmp_path):
    target = tmp_path / "step-00000002"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "state.json").write_text("{}")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "lora.safetensors").write_bytes(b"half")
            raise OSError("no space left on device")
    assert [p.name for p in target.iterdir()] == ["state.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def test_temporary_names_are_hidden_unique_siblings_naming_the_writer(tmp_path):
    target = tmp_path / "metadata.csv"
    names = {temp_path(target) for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert name.parent == tmp_path and is_temp_name(name.name)
        assert name.name.startswith(".metadata.csv.") and f".{os.getpid()}." in name.name
    assert not is_temp_name("metadata.csv")


def test_text_keeps_newlines_as_asked(tmp_path):
    path = atomic_write_text(tmp_path / "m.csv", "a,b\r\n", newline="")
    assert path.read_bytes() == b"a,b\r\n"
