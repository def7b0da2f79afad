"""Read and write safetensors files one tensor at a time, so a multi-gigabyte checkpoint never sits in memory.

The reader seeks to each tensor's bytes and copies them into a fresh buffer (no memory map: mapped pages of an
SDXL file would stay counted in the process's resident memory as they are touched). The writer lays out the
header for every tensor up front — shapes and dtypes are known from the source header — then appends each tensor's
bytes as it is produced. The file format is the safetensors spec: 8-byte little-endian header length, JSON header
(``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__`` strings), then the data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from .lora_file import ToolError, read_header

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class TensorReader:
    """``with TensorReader(path) as r: r.get(name)`` — one tensor read per call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self.metadata = read_header(self.path)
        with open(self.path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
        self._data_start = 8 + length
        self._fh: Optional[BinaryIO] = None

    def __enter__(self) -> "TensorReader":
        self._fh = open(self.path, "rb")
        return self

    def __exit__(self, *exc) -> None:
        if self._fh:
            self._fh.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> list[int]:
        return self.header[key]["shape"]

    def get(self, key: str) -> torch.Tensor:
        info = self.header[key]
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        raw = torch.empty(end - start, dtype=torch.uint8)  # read straight into the tensor's memory: no copies
        self._fh.seek(self._data_start + start)
        if self._fh.readinto(raw.numpy()) != end - start:
            raise ToolError(f"{self.path.name}: {key} is cut short — is the file complete?")
        return raw.view(dtype).reshape(info["shape"])


class TensorWriter:
    """Write tensors in the order of ``layout`` (name → (dtype, shape)); each `put` must match its entry."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str]):
        self.layout = layout
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._order = iter(layout)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self._order)
        dtype, shape = self.layout[name]
        if name != expected or tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise RuntimeError(f"stream writer: {name} {tensor.dtype} {tuple(tensor.shape)} out of order or not "
                               f"as laid out ({expected} {dtype} {shape})")
        if tensor.numel():  # the tensor's own bytes through the buffer protocol, not a copy
            self._fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        self._fh.flush()
        self._fh.close()
