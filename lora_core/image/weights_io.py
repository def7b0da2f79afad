"""Read safetensors files tensor by tensor, straight into the dtype each tensor will be trained in.

Why not ``safetensors.torch.load_file`` + ``module.to(dtype)``: that holds the whole file in its stored dtype *and*
the model in fp32 at the same time — about 14 GB of RAM for an SDXL checkpoint that trains in 7 GB of bf16. Here each
tensor is read with one ``readinto`` into its own buffer, cast if its dtype differs, and the file-dtype buffer is
dropped before the next one is read, so the peak is the model in its training dtype plus one tensor. Plain reads
(not a memory map) keep the file's pages out of the process's resident set; they live in the OS page cache, which
the kernel can drop. Modules are then built without storage (`empty_module`) and take the tensors as their
parameters (``load_state_dict(assign=True)``) — no second copy.
"""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..files import atomic_path

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # the format's own limit


class WeightsFileError(ValueError):
    """The file is not a readable safetensors file; the message names it."""


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries by name, ``__metadata__``, byte offset where the data starts) — nothing but the header read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise WeightsFileError(f"{path.name}: too short to be a safetensors file")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER:
                raise WeightsFileError(f"{path.name}: header of {size} bytes is not a safetensors header")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFileError(f"{path.name}: cannot read as safetensors ({e})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path.name}: the safetensors header is not a mapping")
    metadata = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + size


def iter_tensors(path: str | Path, dtype_for: Callable[[str, torch.dtype], Optional[torch.dtype]],
                 keep: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in file order for the names ``keep`` accepts, each cast to ``dtype_for(name, stored
    dtype)`` (None keeps the stored dtype). Skipped tensors are never read (an EMA copy costs nothing)."""
    path = Path(path)
    entries, _meta, start = read_header(path)
    order = sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, entry in order:
            if not keep(name):
                continue
            stored = DTYPES.get(entry.get("dtype"))
            if stored is None:
                raise WeightsFileError(f"{path.name}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if end > begin and f.readinto(memoryview(buf.numpy())) != end - begin:
                raise WeightsFileError(f"{path.name}: tensor {name} is cut short — is the file complete?")
            tensor = buf.view(stored).reshape(entry["shape"]) if end > begin else \
                torch.empty(entry["shape"], dtype=stored)
            target = dtype_for(name, stored)
            if target is not None and target != stored and stored.is_floating_point:
                tensor = tensor.to(target)
            yield name, tensor


def read_tensors(path: str | Path, dtype_for: Callable[[str, torch.dtype], Optional[torch.dtype]],
                 keep: Callable[[str], bool] = lambda name: True) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path, dtype_for, keep))


def float_dtype(dtype: torch.dtype) -> Callable[[str, torch.dtype], Optional[torch.dtype]]:
    """``dtype_for`` that casts every floating tensor to ``dtype`` (integer tensors such as position ids stay)."""
    return lambda name, stored: dtype


@contextmanager
def empty_module():
    """Build modules whose parameters have no storage yet (the meta device); buffers, which hold computed values
    such as position ids and are small, are made normally."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def assign_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Make ``state``'s tensors the module's parameters (dtype included); returns (missing, unexpected) names.
    A parameter the state does not provide stays on the meta device and is reported missing."""
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    still_empty = [n for n, p in module.named_parameters() if p.is_meta]
    return sorted(set(missing) | set(still_empty)), list(unexpected)


NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_tensors(path: str | Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                  make: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor],
                  metadata: Optional[dict[str, str]] = None) -> Path:
    """Write a safetensors file whose tensors are made one at a time by ``make(name, shape, dtype)``: a model of
    any size is written with one tensor in memory (the benchmarks' full-size random checkpoints). Atomic."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, (shape, dtype) in shapes.items():
        size = dtype.itemsize
        for n in shape:
            size *= int(n)
        header[name] = {"dtype": NAMES[dtype], "shape": [int(n) for n in shape], "data_offsets": [offset,
                                                                                                    offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in shapes.items():
            tensor = make(name, tuple(shape), dtype).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return path
