"""Stable Diffusion LoRA training: the image side of the one loop (`lora_core.loop`).

Why caching matters: on a CPU or a small GPU the VAE encode and the text encoder cost more than the UNet step of a
LoRA run. Latents are encoded once per image (mean + noise drawn from a per-image seeded generator, so a cached and an
uncached run see the same latents) and text embeddings once per caption whenever captions are fixed and the text
encoder is frozen. Every random choice — batch order, caption shuffle/dropout, latent sampling, noise, timesteps — is
a pure function of the seed and the position, or comes from a generator the loop checkpoints: that is what makes
resume exact.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..dataset.buckets import Bucket, bucket_info, format_bucket_table
from ..config import TrainConfig
from ..dataset.scan import (DatasetScan, ImageItem, assign_buckets, load_image_with_crop, process_caption, scan_dataset)
from .adapters import (AdapterSpec, adapter_parameters, adapter_state, add_network, export_modules,
                       is_adapter_param, load_adapter_state, place_adapters)
from .export import kohya_network_tensors, save_diffusers_lora, save_lora_file, training_metadata
from ..speed import SpeedSettings, resolve
from .fp8 import is_fp8, to_fp8
from .latent_cache import DiskLatentCache
from .sample_prompts import SamplePrompt, parse_sample_prompts
from .sd_models import SDModel, can_reload, load_sd_model, release_weights, reload_weights

log = logging.getLogger(__name__)


def _seed_for(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), per example: min(SNR, gamma) / SNR for epsilon prediction,
    min(SNR, gamma) / (SNR + 1) for v-prediction (whose target already carries a factor SNR + 1) — as diffusers'
    and sd-scripts' trainers weight it. SNR(t) = alphas_cumprod[t] / (1 - alphas_cumprod[t]), from diffusers."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


@dataclass
class Example:
    item: ImageItem
    item_index: int


class ImageTask:
    """A Stable Diffusion LoRA (SD1/SD2/SDXL) as a `lora_core.task.TrainingTask`.

    All state is declared here; `setup` fills it in named steps: scan the data, load the model, add the LoRA, place
    the weights, cache latents/text, hand the trained modules to accelerate."""

    kind = "image"

    def __init__(self, cfg: TrainConfig, progress: Optional[Callable[[str, int, int], None]] = None):
        self.cfg = cfg
        self.progress = progress  # callable(what, done, total) for caching progress; may raise to cancel
        self.started_at = 0.0  # set by the loop before the first step (recorded in the file's metadata)
        self.total_steps = 0
        # _use_accelerator
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32  # the frozen base weights' dtype (LoRA weights stay fp32)
        self.speed = SpeedSettings()  # compile, channels_last, pin_memory as they apply on this device
        # _scan_data
        self.scan: Optional[DatasetScan] = None
        self.reg_scan: Optional[DatasetScan] = None
        self.items: list[ImageItem] = []  # training then regularisation images, each once
        self.examples: list[Example] = []  # items repeated `repeats` times: what an epoch visits
        self.val_items: list[ImageItem] = []  # held out by data.validation_split: never trained on
        self.val_data: list[dict] = []  # per held-out image: latents, fixed noise and timesteps, text (`_cache`)
        self.bucket_table: Optional[dict] = None
        # _load_model, _add_lora
        self.model: Optional[SDModel] = None
        self.alpha = 0.0
        self.spec = AdapterSpec()  # the adapter type, rank and alpha trained (`_add_lora`)
        self.te_targets: list[str] = []  # text-encoder modules holding LoRA layers (empty: UNet only)
        # the modules training runs through: the model's own until _prepare wraps them (DDP on several GPUs)
        self.unet: Any = None
        self.text_encoder: Any = None
        self.text_encoder_2: Any = None  # SDXL only
        # _cache
        self.cache_latents = False
        self.cache_text = False
        self.latent_cache: dict[int, torch.Tensor] = {}
        self.text_cache: dict[str, torch.Tensor] = {}
        self.pooled_cache: dict[str, torch.Tensor] = {}  # SDXL: the second encoder's pooled embedding per caption
        self.crops: dict[int, tuple[int, int]] = {}  # SDXL: (top, left) of each item's latest crop, for time ids
        self.disk_cache_stats: Optional[dict] = None

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self, accelerator) -> None:
        self._use_accelerator(accelerator)
        self._scan_data()
        self._load_model()
        # LoRA init draws from the global RNG; seed it here so the model's source (folder or single file, which
        # consume different amounts of randomness while loading) never changes the run
        torch.manual_seed(self.cfg.training.seed + accelerator.process_index)
        self._add_lora()
        self._place_weights()
        self._cache()
        self._prepare(accelerator)

    def _use_accelerator(self, accelerator) -> None:
        self.device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                 torch.float32)
        self.speed = resolve(self.cfg, accelerator.device)

    def _scan_data(self) -> None:
        """Scan the training (and regularisation) folders and assign every image its bucket."""
        d = self.cfg.data
        self.scan = scan_dataset(d.train_data_dir, d.metadata_path, d.caption_extension, d.default_caption)
        items = list(self.scan.items)
        if d.reg_data_dir:
            self.reg_scan = scan_dataset(d.reg_data_dir, None, d.caption_extension, d.default_caption, is_reg=True)
            items += self.reg_scan.items
        for name, reason in self.scan.skipped:
            log.warning("skipped %s: %s", name, reason)
        assign_buckets(items, d.resolution, d.enable_bucket, d.min_bucket_reso, d.max_bucket_reso,
                       d.bucket_reso_steps)
        if d.enable_bucket:
            self.bucket_table = bucket_info([i.bucket for i in items], [i.width / i.height for i in items])
            log.info("%s", format_bucket_table(self.bucket_table))
        items, self.val_items = split_validation(items, d.validation_split, self.cfg.training.seed)
        self.items = items
        self.examples = [Example(item, idx) for idx, item in enumerate(items) for _ in range(item.repeats)]

    def _load_model(self) -> None:
        """Load the base model from its local path, every base weight frozen; the VAE on the device for encoding."""
        m = self.cfg.model
        # frozen weights straight into the training dtype (never an fp32 copy of the model); the VAE too, unless
        # model.no_half_vae keeps it fp32
        model = load_sd_model(m.base_model, m.model_family, m.prediction_type, m.allow_pickle,
                              dtype=self.weight_dtype, vae_dtype=torch.float32 if m.no_half_vae else self.weight_dtype)
        if model.family == "sdxl" and m.clip_skip > 1:
            log.warning("model.clip_skip %d is ignored for SDXL, which always uses the penultimate layer", m.clip_skip)
        self.model = model
        model.vae.requires_grad_(False).to(self.device).eval()
        for encoder in self._base_text_encoders():
            encoder.requires_grad_(False)
        model.unet.requires_grad_(False)
        self.unet, self.text_encoder, self.text_encoder_2 = model.unet, model.text_encoder, model.text_encoder_2

    def _base_text_encoders(self) -> list:
        return [e for e in (self.model.text_encoder, self.model.text_encoder_2) if e is not None]

    def _add_lora(self) -> None:
        """peft LoRA layers in the UNet (and the text encoders when they are trained)."""
        m, model = self.cfg.model, self.model
        if m.network_weights:  # continue from an existing LoRA: its layers, type and tensors
            from .network_weights import continue_from

            self.spec, self.te_targets = continue_from(model, self.cfg)
            self.alpha = self.spec.alpha
            return
        self.spec = AdapterSpec.from_model_config(m)  # model.network_type: lora, locon, loha, lokr, dora
        self.alpha = self.spec.alpha
        add_network(model.unet, self.spec, m.unet_target_modules)
        if m.train_text_encoder:
            self.te_targets = add_network(model.text_encoder, self.spec, m.text_encoder_target_modules,
                                          field="model.text_encoder_target_modules", conv=False)
            if model.text_encoder_2 is not None:  # SDXL: both encoders, one learning rate (text_encoder_lr)
                add_network(model.text_encoder_2, self.spec, m.text_encoder_target_modules,
                            field="model.text_encoder_target_modules", conv=False)

    def _place_weights(self) -> None:
        """Base weights in the compute dtype on the device, LoRA weights fp32 (they are what the optimizer updates);
        gradient checkpointing and train/eval modes as configured."""
        m, model = self.cfg.model, self.model
        text_encoders = self._base_text_encoders()
        if m.fp8_base:  # frozen Linear/Conv weights in fp8 (image/fp8.py), converted before they reach the device
            for module in (model.unet, *text_encoders):
                to_fp8(module, self.weight_dtype)
        for module in (model.unet, *text_encoders):
            for name, param in module.named_parameters():
                param.data = param.data.to(self.device, param.dtype if is_fp8(param) else
                                           torch.float32 if is_adapter_param(name) else self.weight_dtype)
            place_adapters(module, self.device)
        if self.speed.channels_last:  # NHWC for the UNet's convolutions (training.channels_last)
            model.unet.to(memory_format=torch.channels_last)
        if self.cfg.training.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if m.train_text_encoder:
                for encoder in text_encoders:
                    encoder.gradient_checkpointing_enable()
        for encoder in text_encoders:
            encoder.train(m.train_text_encoder)
        model.unet.train()

    def _cache(self) -> None:
        """Encode latents and captions once when nothing about them changes between epochs."""
        d, m = self.cfg.data, self.cfg.model
        self.cache_latents = d.cache_latents and not d.flip_aug and d.center_crop
        self.cache_text = (d.cache_text_encoder_outputs and not m.train_text_encoder and not d.shuffle_caption
                           and d.caption_dropout == 0)
        if self.cache_latents:
            self._cache_all_latents()
        if self.cache_text:
            self._cache_all_text()
        self._cache_validation()
        self._offload_frozen()

    def _cache_validation(self) -> None:
        """Latents, fixed noise and fixed timesteps of each held-out image, encoded once: the validation loss is
        then a deterministic function of the LoRA alone, so its rise means overfitting, not a different draw."""
        d, sched = self.cfg.data, self.model.noise_scheduler
        steps = sched.config.num_train_timesteps
        timesteps = torch.tensor([min(steps - 1, int(f * steps)) for f in VALIDATION_TIMESTEPS])
        for k, item in enumerate(self.val_items):
            mean, std = self._latent_dist(("val", k), item, epoch=0, index=0)
            gen = torch.Generator().manual_seed(_seed_for(self.cfg.training.seed, "validation", k))
            latent = ((mean + std * torch.randn(mean.shape, generator=gen).to(mean.device, mean.dtype))
                      * self.model.vae.config.scaling_factor).float().cpu()
            noise = torch.randn((len(timesteps), *latent.shape), generator=gen)
            caption = process_caption(item.caption, d.trigger_word, False, d.keep_tokens, 0.0, random.Random(0))
            entry = {"latents": latent, "noise": noise, "timesteps": timesteps, "caption": caption,
                     "time_ids": (item.height, item.width, *self.crops[("val", k)], item.bucket.height,
                                  item.bucket.width)}
            if not self.te_targets:  # a frozen text encoder: its output for the caption never changes
                with torch.no_grad():
                    embeds, pooled = self._encode_text(self._tokenize([caption]))
                entry["text"], entry["pooled"] = embeds[0].cpu(), None if pooled is None else pooled[0].cpu()
            self.val_data.append(entry)

    def _frozen_names(self) -> list[str]:
        """The frozen parts caching left idle until the next sample: the VAE once latents are cached, the text
        encoders once their outputs are (when they are not trained)."""
        names = ["vae"] if self.cache_latents else []
        if self.cache_text and not self.cfg.model.train_text_encoder:
            names += [n for n in ("text_encoder", "text_encoder_2") if getattr(self.model, n) is not None]
        return names

    def _frozen_parts(self) -> list:
        return [getattr(self.model, name) for name in self._frozen_names()]

    def _releases_frozen(self) -> bool:
        """With data.cache_latents_to_disk the idle frozen parts leave RAM too, read back from the base model for
        each sample (seconds) — not for fp8 base weights (converted layers) or a pickle base model (read whole)."""
        return bool(self.cfg.data.cache_latents_to_disk and not self.cfg.model.fp8_base and self._frozen_names()
                    and can_reload(self.model))

    def _offload_frozen(self) -> None:
        """Idle frozen modules leave the GPU for the CPU's RAM (sampling brings them back), or leave memory
        altogether (`_releases_frozen`); with neither, nothing to do on a CPU."""
        if self._releases_frozen():
            for part in self._frozen_parts():
                release_weights(part)
            _return_freed_memory()
        elif self.device.type == "cuda":
            for part in self._frozen_parts():
                part.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _onload_frozen(self) -> None:
        if self._releases_frozen():
            reload_weights(self.model, self._frozen_names())
        if self.device.type == "cuda" or self._releases_frozen():
            for part in self._frozen_parts():
                part.to(self.device)

    def _prepare(self, accelerator) -> None:
        """Hand the modules that train to accelerate (DDP-wrapped on several GPUs); frozen ones stay as they are."""
        model = self.model
        self.unet = accelerator.prepare_model(model.unet)
        if self.speed.compile:  # training.compile: the first steps wait for the compiler (minutes for a full UNet)
            self.unet.compile()
        if self.cfg.model.train_text_encoder:
            self.text_encoder = accelerator.prepare_model(model.text_encoder)
            if model.text_encoder_2 is not None:
                self.text_encoder_2 = accelerator.prepare_model(model.text_encoder_2)

    def _cache_all_latents(self) -> None:
        d = self.cfg.data
        disk = DiskLatentCache(d.train_data_dir, self.model.vae, self.model.vae.dtype) \
            if d.cache_latents_to_disk else None
        total = len(self.items)
        for i, item in enumerate(self.items):
            key = disk.key(item.digest, item.bucket.width, item.bucket.height, d.center_crop) if disk else None
            cached = disk.load(key) if disk else None
            if cached is not None:
                mean, std, crop = cached
                self.crops[i] = tuple(crop) if crop else (0, 0)
            else:
                mean, std = self._latent_dist(i, item, epoch=0, index=0)
                if disk:
                    disk.save(key, mean, std, list(self.crops[i]))
            self.latent_cache[i] = self._sample_latent(i, mean, std)
            if self.progress:
                self.progress("latents", i + 1, total)
        if disk:
            self.disk_cache_stats = {"reused": disk.hits, "encoded": disk.misses, "folder": str(disk.folder)}

    def _cache_all_text(self) -> None:
        captions = sorted({self._caption(ex, epoch=0, index=0) for ex in self.examples})
        for i in range(0, len(captions), 16):
            chunk = captions[i:i + 16]
            with torch.no_grad():
                embeds, pooled = self._encode_text(self._tokenize(chunk))
            for j, caption in enumerate(chunk):
                self.text_cache[caption] = embeds[j].cpu()
                if pooled is not None:
                    self.pooled_cache[caption] = pooled[j].cpu()
            if self.progress:
                self.progress("text", min(i + 16, len(captions)), len(captions))

    def dataset_summary(self) -> dict:
        """What the user should know about the data before the run: counts, skipped and duplicate files by name."""
        return {"images": len(self.scan.items), "examples": len(self.examples),
                "skipped": [{"file": n, "reason": r} for n, r in self.scan.skipped],
                "duplicates": [{"file": n, "same_as": k} for n, k in self.scan.duplicates],
                "converted": [{"file": n, "note": why} for n, why in self.scan.notes],
                "reg_images": len(self.reg_scan.items) if self.reg_scan else 0,
                "validation_images": [i.path.name for i in self.val_items],
                "latent_disk_cache": self.disk_cache_stats,
                "buckets": self.bucket_table}

    # ---- data --------------------------------------------------------------------------------------------------
    def num_examples(self) -> int:
        return len(self.examples)

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        rng = random.Random(_seed_for(self.cfg.training.seed, "epoch", epoch))
        by_bucket: dict[Bucket, list[int]] = {}
        for idx, ex in enumerate(self.examples):
            by_bucket.setdefault(ex.item.bucket, []).append(idx)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        rng.shuffle(batches)
        return batches

    def _caption(self, ex: Example, epoch: int, index: int) -> str:
        d = self.cfg.data
        rng = random.Random(_seed_for(self.cfg.training.seed, "caption", epoch, index))
        return process_caption(ex.item.caption, d.trigger_word, d.shuffle_caption, d.keep_tokens, d.caption_dropout,
                               rng)

    def _encode_latent(self, item_index: int, item: ImageItem, epoch: int, index: int) -> torch.Tensor:
        return self._sample_latent(item_index, *self._latent_dist(item_index, item, epoch, index))

    def _sample_latent(self, item_index: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """One latent per image, drawn with a generator seeded by the image's place: cached, disk-cached and
        uncached runs all train on the same latents."""
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.training.seed, "latent", item_index))
        noise = torch.randn(mean.shape, generator=gen).to(mean.device, mean.dtype)
        return ((mean + std * noise) * self.model.vae.config.scaling_factor).float()

    def _latent_dist(self, item_index: int, item: ImageItem, epoch: int, index: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        d = self.cfg.data
        bucket = item.bucket
        rng = random.Random(_seed_for(self.cfg.training.seed, "crop", epoch, index))
        flip = d.flip_aug and rng.random() < 0.5
        pixels, self.crops[item_index] = load_image_with_crop(item.path, bucket.width, bucket.height, d.center_crop,
                                                              rng, flip)
        pixels = pixels.unsqueeze(0).to(self.device, self.model.vae.dtype)
        with torch.no_grad():
            dist = self.model.vae.encode(pixels).latent_dist
        return dist.mean[0].cpu(), dist.std[0].cpu()

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids (batch, 77); SDXL: (batch, 2, 77), one row per tokenizer (the second pads with '!')."""
        ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids for tok in (self.model.tokenizer, self.model.tokenizer_2)
               if tok is not None]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)

    def _encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(encoder_hidden_states, pooled embedding or None). SDXL conditions on both encoders' penultimate hidden
        states side by side and on the second encoder's projected pooled embedding (``clip_skip`` does not apply)."""
        te = self.text_encoder
        if self.model.family == "sdxl":
            te2 = self.text_encoder_2
            out1 = te(input_ids[:, 0].to(self.device), output_hidden_states=True)
            out2 = te2(input_ids[:, 1].to(self.device), output_hidden_states=True)
            return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), out2.text_embeds
        clip_skip = self.cfg.model.clip_skip
        out = te(input_ids.to(self.device), output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            inner = self.model.text_encoder  # unwrapped (DDP hides the layers under .module)
            return (inner.text_model.final_layer_norm(out.hidden_states[-clip_skip]) if hasattr(inner, "text_model")
                    else inner.final_layer_norm(out.hidden_states[-clip_skip])), None
        return out[0], None

    def collate(self, indices: list[int], epoch: int) -> dict:
        latents, captions, is_reg = [], [], []
        for idx in indices:
            ex = self.examples[idx]
            if self.cache_latents:
                latents.append(self.latent_cache[ex.item_index])
            else:
                latents.append(self._encode_latent(ex.item_index, ex.item, epoch, idx).cpu())
            captions.append(self._caption(ex, epoch, idx))
            is_reg.append(ex.item.is_reg)
        batch = {"latents": torch.stack(latents), "is_reg": torch.tensor(is_reg)}
        if self.cache_text:
            batch["text"] = torch.stack([self.text_cache[c] for c in captions])
            if self.pooled_cache:
                batch["pooled"] = torch.stack([self.pooled_cache[c] for c in captions])
        else:
            batch["input_ids"] = self._tokenize(captions)
        if self.model.family == "sdxl":
            batch["time_ids"] = torch.tensor([self._time_ids(self.examples[idx]) for idx in indices],
                                             dtype=torch.float32)
        if self.speed.pin_memory:  # page-locked, so the copies in `loss` do not wait for the GPU (non_blocking)
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _time_ids(self, ex: Example) -> tuple[int, int, int, int, int, int]:
        """SDXL's size conditioning: (original h, w, crop top, left, target h, w), as sd-scripts feeds it — the
        image's own size, the crop offset in the scaled image, the bucket it was cropped to."""
        item = ex.item
        top, left = self.crops[ex.item_index]
        return item.height, item.width, top, left, item.bucket.height, item.bucket.width

    # ---- training ----------------------------------------------------------------------------------------------
    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.unet] + (self._text_encoders() if self.te_targets else [])

    def _text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def param_groups(self, learning_rate: float) -> list[dict]:
        groups = [{"params": adapter_parameters(self.unet), "lr": learning_rate}]
        if self.te_targets:
            groups.append({"params": [p for e in self._text_encoders() for p in adapter_parameters(e)],
                           "lr": self.cfg.model.text_encoder_lr or learning_rate})
        return groups

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        t = self.cfg.training
        latents = batch["latents"].to(self.device, self.weight_dtype, non_blocking=True)
        if self.speed.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        if "text" in batch:
            text = batch["text"].to(self.device, self.weight_dtype, non_blocking=True)
            pooled = batch["pooled"].to(self.device, self.weight_dtype, non_blocking=True) if "pooled" in batch \
                else None
        else:
            with torch.set_grad_enabled(bool(self.te_targets)):
                text, pooled = self._encode_text(batch["input_ids"])
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
        if t.noise_offset:
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator)
            noise = noise + t.noise_offset * offset.to(self.device, latents.dtype)
        sched = self.model.noise_scheduler
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=generator).to(self.device)
        per_example = self._denoise_loss(latents, noise, timesteps, text, pooled, batch.get("time_ids"))
        if t.min_snr_gamma:
            per_example = per_example * min_snr_weight(sched, timesteps, t.min_snr_gamma, self.model.prediction_type)
        is_reg = batch["is_reg"].to(self.device)
        if is_reg.any():
            per_example = torch.where(is_reg, per_example * self.cfg.data.prior_loss_weight, per_example)
        return per_example.mean()

    def _denoise_loss(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                      pooled: Optional[torch.Tensor], time_ids: Optional[torch.Tensor], unet: Any = None
                      ) -> torch.Tensor:
        """Per-example MSE of the UNet's prediction (noise, or velocity for v-prediction) at these timesteps: the
        one formula training and validation share (validation passes the unwrapped UNet: only the main process
        evaluates, and a DDP-wrapped forward on one rank alone would wait for the others)."""
        sched = self.model.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        target = sched.get_velocity(latents, noise, timesteps) if self.model.prediction_type == "v_prediction" \
            else noise
        added = None
        if pooled is not None:  # SDXL: pooled text embedding + size/crop time ids
            added = {"text_embeds": pooled, "time_ids": time_ids.to(self.device, pooled.dtype)}
        pred = (unet if unet is not None else self.unet)(noisy, timesteps, text, added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in adapter_state(self.unet).items()}
        if self.te_targets:
            state.update({f"text_encoder.{k}": v for k, v in adapter_state(self.text_encoder).items()})
            if self.text_encoder_2 is not None:
                state.update({f"text_encoder_2.{k}": v for k, v in adapter_state(self.text_encoder_2).items()})
        return state

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.unet, {k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        if self.te_targets:
            load_adapter_state(self.text_encoder, {k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
            if self.text_encoder_2 is not None:
                load_adapter_state(self.text_encoder_2,
                                {k[15:]: v for k, v in state.items() if k.startswith("text_encoder_2.")})

    # ---- outputs -----------------------------------------------------------------------------------------------
    def export(self, path_stem: Path, step: int, epoch: int) -> Path:
        cfg, m = self.cfg, self.cfg.model
        unet_state = adapter_state(self.unet)
        te_states = [adapter_state(e) for e in self._text_encoders()] if self.te_targets else []
        if cfg.output.format == "diffusers":
            return save_diffusers_lora(path_stem, unet_state, te_states, self.spec.rank, self.alpha,
                                       cfg.output.save_precision)
        tensors = kohya_network_tensors(self.model.family, export_modules(self.unet),
                                        [export_modules(e) for e in self._text_encoders()] if self.te_targets else [],
                                        self.model.unet.config)
        t = cfg.training
        meta = training_metadata(
            output_name=path_stem.name, base_model_version=self.model.base_model_version,
            prediction_type=self.model.prediction_type, rank=self.spec.rank, alpha=self.alpha, dropout=m.dropout,
            learning_rate=t.learning_rate, text_encoder_lr=m.text_encoder_lr if self.te_targets else None,
            resolution=cfg.data.resolution, num_train_images=self.scan.num_images,
            tag_frequency=self.scan.tag_frequency(), dataset_dirs=self.scan.dataset_dirs(),
            started_at=self.started_at, steps=step, epoch=epoch,
            max_train_steps=self.total_steps or step, base_model_path=m.base_model,
            batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=t.mixed_precision, optimizer=t.optimizer, lr_scheduler=t.lr_scheduler, seed=t.seed,
            noise_offset=t.noise_offset, min_snr_gamma=t.min_snr_gamma, clip_skip=m.clip_skip,
            bucket_info=self.bucket_table, cache_latents=self.cache_latents,
            gradient_checkpointing=t.gradient_checkpointing,
            num_reg_images=self.reg_scan.num_images if self.reg_scan else 0,
            prior_loss_weight=cfg.data.prior_loss_weight, trigger_word=cfg.data.trigger_word,
            network_module=self.spec.network_module, network_args=self.spec.metadata_json())
        return save_lora_file(path_stem.with_suffix(".safetensors"), tensors, meta, cfg.output.save_precision)

    def preview_prompts(self) -> list[SamplePrompt]:
        """The card preview of a run that asked for no samples: its first training caption (with the trigger word)
        at the training resolution, in a few denoising steps — cheap next to the training itself."""
        ex = self.examples[0] if self.examples else None
        caption = self._caption(ex, epoch=0, index=0) if ex is not None else (self.cfg.data.trigger_word or "")
        res = self.cfg.data.resolution
        return [SamplePrompt(caption or "a picture", width=res, height=res, steps=min(PREVIEW_STEPS,
                             self.cfg.sample.sample_steps), guidance=self.cfg.sample.sample_guidance_scale,
                             seed=self.cfg.training.seed)]

    def sample(self, step: int, out_dir: Path, progress: Optional[SampleProgress] = None,
               preview: bool = False) -> list[tuple[Path, str]]:
        """Render the sample prompts (``preview``: the `preview_prompts` instead); ``progress`` hears of every
        prompt and denoising step (prompt i of n, step j of m), so a slow render never looks like a hang."""
        prompts = self.preview_prompts() if preview else parse_sample_prompts(self.cfg.sample.sample_prompts, self.cfg)
        if not prompts:
            return []
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        self._onload_frozen()
        # the unwrapped modules (the same weights the prepared, possibly DDP-wrapped ones train)
        unet, te = self.model.unet, self.model.text_encoder
        scheduler = DDIMScheduler.from_config(self.model.noise_scheduler.config)
        if self.model.family == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=self.model.vae, text_encoder=te,
                                             text_encoder_2=self.model.text_encoder_2,
                                             tokenizer=self.model.tokenizer, tokenizer_2=self.model.tokenizer_2,
                                             unet=unet, scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=self.model.vae, text_encoder=te, tokenizer=self.model.tokenizer,
                                           unet=unet, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        was_training = unet.training
        unet.eval()
        try:
            for i, p in enumerate(prompts):
                gen = torch.Generator().manual_seed(p.seed if p.seed is not None else self.cfg.training.seed + i)
                report = _denoise_reporter(progress, i + 1, len(prompts), p)
                # no_half_vae: the pipeline would hand the half-precision latents to the fp32 VAE, so decode here
                own_decode = self.model.vae.dtype != self.weight_dtype
                with torch.no_grad():
                    out = pipe(p.prompt, negative_prompt=p.negative or None, width=p.width, height=p.height,
                               num_inference_steps=p.steps, guidance_scale=p.guidance, generator=gen,
                               callback_on_step_end=report, output_type="latent" if own_decode else "pil").images
                    image = _decode(pipe, out) if own_decode else out[0]
                path = out_dir / ("preview.png" if preview else f"step{step:08d}_{i:02d}.png")
                image.save(path)
                written.append((path, p.prompt))
        finally:
            unet.train(was_training)
            self._offload_frozen()
        return written

    def evaluate(self, step: int) -> Optional[dict]:
        """Mean loss on the held-out images at fixed timesteps and fixed noise (None without data.validation_split):
        the number whose rise while the training loss falls means overfitting (`lora_core.health`). The family's
        loss of one held-out entry is `_validation_losses`; the eval mode and no_grad around it are shared."""
        if not self.val_data:
            return None
        net = self._denoiser()
        was_training = net.training
        net.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for entry in self.val_data:
                    losses = self._validation_losses(entry, net)
                    total += float(losses.sum())
                    count += losses.shape[0]
        finally:
            net.train(was_training)
        return {"eval_loss": total / count, "validation_images": len(self.val_data)}

    def _denoiser(self) -> torch.nn.Module:
        """The network the LoRA trains and validation runs: the UNet here, the transformer for FLUX."""
        return self.model.unet

    def _validation_losses(self, entry: dict, unet: torch.nn.Module) -> torch.Tensor:
        """Per-timestep losses of one held-out image (its fixed timesteps, noise and caption)."""
        n = len(entry["timesteps"])
        latents = entry["latents"].to(self.device, self.weight_dtype).expand(n, -1, -1, -1)
        noise = entry["noise"].to(self.device, self.weight_dtype)
        if "text" in entry:
            text = entry["text"].to(self.device, self.weight_dtype).expand(n, -1, -1)
            pooled = entry["pooled"].to(self.device, self.weight_dtype).expand(n, -1) \
                if entry["pooled"] is not None else None
        else:
            text, pooled = self._encode_text(self._tokenize([entry["caption"]] * n))
        time_ids = torch.tensor([entry["time_ids"]] * n, dtype=torch.float32)
        return self._denoise_loss(latents, noise, entry["timesteps"].to(self.device), text, pooled, time_ids,
                                  unet=unet)

    def training_images(self) -> list[Path]:
        """The files trained on (not the held-out or regularisation ones): a sample too close to one is a copy."""
        return [item.path for item in self.items if not item.is_reg]


VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)  # shares of the schedule the validation loss is measured at


def split_validation(items: list[ImageItem], share: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training, held-out) images: ``share`` of the training images (at least one, never all), chosen by the seed
    so a resumed run holds out the same ones; regularisation images always train."""
    own = [i for i, item in enumerate(items) if not item.is_reg]
    if share <= 0 or len(own) < 2:
        if share > 0:
            log.warning("data.validation_split %s: %d training image(s) is too few to hold any out", share, len(own))
        return items, []
    count = min(len(own) - 1, max(1, round(len(own) * share)))
    held = set(random.Random(_seed_for(seed, "validation-split")).sample(own, count))
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them for reuse otherwise, so released weights would still
    count in the resident set); a no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# What a task tells about rendering samples: prompt_index (1-based), prompts, denoise_step, denoise_steps, prompt.
SampleProgress = Callable[[dict], None]
PREVIEW_STEPS = 8  # the end-of-run card preview: a few steps are enough to show what the LoRA does


def _decode(pipe, latents: torch.Tensor):
    """Latents → the first PIL image, decoded in the VAE's own dtype (fp32 with no_half_vae)."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")[0]


def _denoise_reporter(progress: Optional[SampleProgress], index: int, count: int, p: SamplePrompt):
    """A diffusers ``callback_on_step_end`` that reports each denoising step; None without a listener."""
    if progress is None:
        return None
    fields = {"prompt_index": index, "prompts": count, "denoise_steps": p.steps, "prompt": p.prompt[:200]}
    progress({**fields, "denoise_step": 0})

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        progress({**fields, "denoise_step": step_index + 1})
        return callback_kwargs
    return on_step_end
