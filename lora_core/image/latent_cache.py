"""VAE latents cached on disk next to the dataset, so a second run (or a resumed one) skips the VAE entirely.

Files live in ``<train_data_dir>/.lora_cache/latents/<key>.safetensors`` (a hidden folder, which the image scan
skips). The key is a hash of everything that changes the latent: the image's bytes, the bucket size, the crop mode,
the VAE's encoder weights and the compute dtype — edit an image, change the resolution or the base model, and the
old entry is simply not found. Each file holds the latent distribution's mean and std (not a sample), so the same
entry serves any seed, plus the crop offsets SDXL conditioning needs. Writes are atomic; a damaged file is ignored
and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ..files import atomic_write_bytes

log = logging.getLogger(__name__)


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """Hash of the encoder weights (what produces latents) and the scaling factor."""
    h = hashlib.sha256(str(getattr(vae.config, "scaling_factor", "")).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


class DiskLatentCache:
    def __init__(self, dataset_dir: str | Path, vae: torch.nn.Module, dtype: torch.dtype):
        self.folder = Path(dataset_dir) / ".lora_cache" / "latents"
        self.vae_id = f"{vae_fingerprint(vae)}:{dtype}"
        self.hits = 0
        self.misses = 0

    def key(self, image_digest: str, width: int, height: int, center_crop: bool) -> str:
        raw = f"{image_digest}|{width}x{height}|{'center' if center_crop else 'random'}|{self.vae_id}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def load(self, key: str) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[list]]]:
        from safetensors import safe_open

        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), "pt") as f:
                mean, std = f.get_tensor("mean"), f.get_tensor("std")
                crop = json.loads((f.metadata() or {}).get("crop", "null"))
        except Exception as e:  # a truncated or foreign file: recompute rather than fail the run
            log.warning("ignoring damaged latent cache file %s (%s)", path.name, e)
            self.misses += 1
            return None
        self.hits += 1
        return mean, std, crop

    def save(self, key: str, mean: torch.Tensor, std: torch.Tensor, crop=None) -> None:
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        blob = save({"mean": mean.detach().cpu().contiguous(), "std": std.detach().cpu().contiguous()},
                    metadata={"crop": json.dumps(crop)})
        atomic_write_bytes(self.folder / f"{key}.safetensors", blob)
