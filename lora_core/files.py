"""Atomic writes, the one way the project replaces a file or a folder (standard library only: the daemon uses it too).

Why: a LoRA, a checkpoint, a caption or a config that a crash (or a full disk, or a second writer) leaves half
written is worse than none — the WebUI loads a torn LoRA, a resume reads a torn state. Every writer therefore writes
a hidden temporary sibling and moves it into place with `os.replace`, which readers see as all-or-nothing.

The temporary name is ``.<name>.<pid>.<random>.part`` in the target's folder: the same filesystem (so the rename is
atomic), hidden from folder scans and from the WebUI's Lora list, and unique per writer — two processes writing the
same target never write into each other's temporary file; the last rename wins whole. The file is fsynced before the
rename and the folder after it (POSIX only), so a power cut leaves the old content or the new, not an empty file. A
writer that fails leaves no temporary file behind.
"""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]
PART_SUFFIX = ".part"


def temp_path(path: PathLike) -> Path:
    """A fresh hidden sibling name for writing ``path``: ``.<name>.<pid>.<random>.part``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of `temp_path`'s (a scan should skip it; a sweep may remove an old one)."""
    return name.startswith(".") and name.endswith(PART_SUFFIX)


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable. POSIX only: Windows cannot open a folder for fsync (NTFS journals the
    rename itself)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:  # writable: Windows' fsync (_commit) refuses a read-only handle
        os.fsync(fh.fileno())


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, names in os.walk(folder):
        for name in names:
            _fsync_file(Path(root, name))
        fsync_dir(root)


def remove(path: Path) -> None:
    """Remove a file or a folder if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _move_into_place(tmp: Path, path: Path) -> None:
    if tmp.is_dir() and (path.exists() or path.is_symlink()):
        # a folder cannot be renamed over a non-empty one: move the old one aside first, then drop it. Between the
        # two renames the target is briefly absent, never half written.
        aside = temp_path(path)
        os.replace(path, aside)
        os.replace(tmp, path)
        remove(aside)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path for a writer that needs a file name (safetensors ``save_file``, a checkpoint or adapter
    folder, ``save_pretrained``); whatever it created there — a file or a folder — replaces ``path`` when the block
    ends, fsynced. On an error (or when nothing was created) the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if tmp.is_dir():
            _fsync_tree(tmp)
        elif tmp.exists():
            _fsync_file(tmp)
        else:
            raise FileNotFoundError(f"{path}: the writer created nothing at its temporary path {tmp.name}")
        _move_into_place(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        remove(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data``, all or nothing."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8", newline: str | None = None) -> Path:
    """Replace ``path`` with ``text``, all or nothing (``newline`` as for `open`: "" keeps csv's line ends)."""
    with atomic_path(path) as tmp:
        with open(tmp, "x", encoding=encoding, newline=newline) as fh:
            fh.write(text)
    return Path(path)
