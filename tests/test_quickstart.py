"""The README's first command, `python -m lora_core.quickstart`, for both tiny families: a real run that prints the
path of a LoRA file the WebUIs load."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lora_core.quickstart import main


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


@pytest.mark.parametrize("family, first_key, architecture", [
    ("sd1", "lora_unet_", "stable-diffusion-v1/lora"),
    ("flux", "lora_unet_double_blocks_0_img_attn_qkv", "flux-1-dev/lora"),
])
def test_quickstart_trains_on_the_tiny_model_and_prints_the_file(family, first_key, architecture, tmp_path, capsys):
    assert main(["--dir", str(tmp_path / family), "--steps", "4", "--family", family]) == 0
    printed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed.is_file() and printed.parent == (tmp_path / family / "output").resolve()
    header = _header(printed)
    assert any(k.startswith(first_key) for k in header), sorted(header)[:5]
    assert header["__metadata__"]["modelspec.architecture"] == architecture
