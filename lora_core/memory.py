"""Tensor memory accounting that works on any device, CPU included.

`TensorMemoryMeter` counts the bytes of every live tensor storage created while it is active, and the peak of that
count; on CUDA the allocator's own ``max_memory_allocated`` says the same thing, but on a CPU there is no such
counter (process RSS includes the interpreter and libraries), so the memory plan could not be checked against
anything. `saved_for_backward_bytes` measures what autograd keeps for the backward pass — the activation memory that
grows with batch size and resolution.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TensorMemoryMeter(TorchDispatchMode):
    """Live bytes of tensors allocated inside the ``with`` block, and their peak (``peak_bytes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._seen:
            return
        size = storage.nbytes()
        self._seen.add(key)
        self.live += size
        self.peak_bytes = max(self.peak_bytes, self.live)

        def release(k=key, n=size, meter=weakref.ref(self)):
            m = meter()
            if m is not None and k in m._seen:
                m._seen.discard(k)
                m.live -= n

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t)
        return out


@contextmanager
def saved_for_backward(exclude: frozenset | set = frozenset()) -> Iterator[dict]:
    """Sum the distinct storages autograd saves for backward inside the block (``{"bytes": n}``), skipping the
    storages whose data pointers are in ``exclude`` (weights, which are counted elsewhere)."""
    seen: set[int] = set(exclude)
    total = {"bytes": 0}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:  # the same storage saved twice is one allocation
            seen.add(storage.data_ptr())
            total["bytes"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
