"""`python -m lora_core.tiny`: a single file where the user names it, and a demo tagger that auto-label runs."""
from __future__ import annotations

import subprocess
import sys

from safetensors import safe_open

from lora_core.dataset.auto_label import main as auto_label_main
from lora_core.tiny import make_tiny_dataset


def tiny(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_core.tiny", *args], capture_output=True, text=True,
                          timeout=300)


def test_single_file_takes_the_file_path_and_a_safetensors_folder_is_refused(tmp_path):
    target = tmp_path / "models" / "x.safetensors"
    done = tiny("--out", str(target), "--single-file")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(target)
    assert target.is_file()
    with safe_open(str(target), "pt") as f:
        assert any(k.startswith("model.diffusion_model.") for k in f.keys())
    refused = tiny("--out", str(tmp_path / "y.safetensors"))
    assert refused.returncode == 2 and "add --single-file" in refused.stderr
    assert not (tmp_path / "y.safetensors").exists()


def test_the_demo_tagger_captions_the_tiny_dataset(tmp_path):
    done = tiny("--tagger", str(tmp_path / "wd14"), "--dataset", str(tmp_path / "shapes"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "wd14" / "model.onnx").is_file() and (tmp_path / "wd14" / "selected_tags.csv").is_file()
    images = make_tiny_dataset(tmp_path / "plain", n=3, sidecars=False)
    assert auto_label_main(["--input", str(images), "--captioner", "wd14", "--model", str(tmp_path / "wd14"),
                            "--format", "txt", "--device", "cpu"]) == 0
    captions = [p.read_text(encoding="utf-8") for p in sorted(images.glob("*.txt"))]
    assert len(captions) == 3 and all("simple background" in c for c in captions)
