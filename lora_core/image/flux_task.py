"""FLUX.1 LoRA training: the FLUX family's task in the one loop, built on `ImageTask`'s data handling.

What is the same as SD (inherited): the scan, buckets, caption processing, per-image seeded latents (disk cache
included), batch order, preview prompts, dataset summary. What differs, and why:

* **Objective: rectified flow.** ``noisy = (1 - t)·x0 + t·noise``, the transformer predicts ``noise - x0``; ``t`` in
  (0, 1) is drawn by ``training.timestep_sampling`` — ``sigmoid`` (sigmoid of a normal draw, sd-scripts' and
  SimpleTuner's default), ``shift`` (the same, shifted by ``discrete_flow_shift``: t' = s·t / (1 + (s - 1)·t), more
  time at high noise), ``uniform``, ``flux_shift`` (shifted by the image's token count as FLUX.1 sampling does).
* **Inputs as FluxPipeline builds them:** latents ``(x - shift) · scale`` of the 16-channel AE, packed into 2×2
  patches (``FluxPipeline._pack_latents``), image position ids from ``_prepare_latent_image_ids``, zero text ids,
  T5 hidden states (``t5_max_length`` tokens) and CLIP-L's pooled output; [dev] also gets ``guidance_scale``.
* **T5 must not stay in memory.** T5-XXL is 9.5 GB in bf16 — more than the transformer's LoRA run needs beside it on
  a 16 GB card. Captions and sample prompts are encoded once, then both encoders are dropped (caption shuffling or
  dropout keep them, since every step then needs a new encoding — said in the log).
* **LoRA** on the attention and MLP linears of the selected blocks (``model.flux_target_modules`` under
  ``model.flux_train_blocks``); the transformer only (the encoders are frozen and gone).
* **Fitting 12–24 GB:** ``model.fp8_base`` (frozen Linear weights in fp8, `fp8`), gradient checkpointing, and
  ``training.flux_blocks_to_swap``: the frozen Linear weights of that many blocks stay in CPU RAM and each is copied
  to the GPU only for its own matmul (forward and backward), so autograd never holds them (`OffloadedLinear`).
"""
from __future__ import annotations

import gc
import logging
import math
import random
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..dataset.scan import process_caption
from .adapters import AdapterSpec, adapter_parameters, adapter_state, add_network, export_modules, is_adapter_param
from .adapters import load_adapter_state, place_adapters
from .flux import FluxModel, load_flux_model
from .flux_keys import FluxDims, block_prefixes, train_blocks
from .fp8 import FP8, is_fp8, to_fp8
from .sample_prompts import SamplePrompt, parse_sample_prompts
from .task import PREVIEW_STEPS, ImageTask, SampleProgress, _denoise_reporter, _seed_for

log = logging.getLogger(__name__)

DEV_TRAIN_GUIDANCE = 1.0  # what [dev] LoRAs train with when guidance_scale is empty (sd-scripts' recommendation)
VALIDATION_T = (0.1, 0.3, 0.5, 0.7, 0.9)  # flow times of the validation loss (fixed, so only the LoRA moves it)


def sample_timesteps(kind: str, n: int, generator: torch.Generator, shift: float, seq_len: int) -> torch.Tensor:
    """``n`` flow times in (0, 1) (float32, CPU) by ``training.timestep_sampling``; all randomness from
    ``generator`` (checkpointed by the loop, so a resumed run draws the same)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    t = torch.sigmoid(torch.randn(n, generator=generator))
    if kind == "shift":
        return shift * t / (1 + (shift - 1) * t)
    if kind == "flux_shift":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(seq_len)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return t


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents → FLUX's (B, H/2·W/2, 4C) tokens, exactly as FluxPipeline packs them."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Position ids of a packed (height/2 × width/2) latent, as FluxPipeline makes them."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


class _OffloadedLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with W kept where it is (CPU RAM) and copied to x's device for the forward and again for the
    backward: autograd saves the CPU tensor, so no GPU copy outlives its matmul. fp8 weights are upcast by their
    per-channel scale on the GPU."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        w = _to_compute(weight, scale, x.device, dtype)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(x.device, dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w = _to_compute(weight, scale, grad.device, ctx.dtype)
        return grad.to(ctx.dtype).matmul(w).to(ctx.x_dtype), None, None, None, None


def _to_compute(weight: torch.Tensor, scale: Optional[torch.Tensor], device, dtype) -> torch.Tensor:
    w = weight.to(device, non_blocking=True)
    if w.dtype == FP8:
        return w.to(dtype) * scale.to(device, dtype)
    return w.to(dtype)


class OffloadedLinear(torch.nn.Linear):
    """A frozen nn.Linear (or fp8 `fp8.Fp8Linear`) whose weight lives in CPU RAM (``flux_blocks_to_swap``)."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OffloadedLinear.apply(x, self.weight, getattr(self, "fp8_scale", None), self.bias,
                                      self.compute_dtype)


def swapped_blocks(transformer, count: int) -> list[torch.nn.Module]:
    """The blocks ``flux_blocks_to_swap`` keeps in CPU RAM: the last ones, single blocks first (38 of them in
    FLUX.1, each a sixth smaller than a double block)."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    if count > len(blocks):
        raise ValueError(f"training.flux_blocks_to_swap: {count} is more than the model's {len(blocks)} blocks")
    return blocks[len(blocks) - count:] if count else []


def offload_blocks(transformer, count: int, compute_dtype: torch.dtype, store: str = "cpu") -> int:
    """Turn the frozen Linear layers of the last ``count`` blocks into `OffloadedLinear` with their weights on
    ``store`` (pinned when CUDA is there); returns the number of layers. LoRA layers stay where they are."""
    layers = 0
    pin = torch.cuda.is_available() and store == "cpu"
    for block in swapped_blocks(transformer, count):
        for name, module in block.named_modules():
            if ".lora_" in f".{name}" or not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
                continue
            weight = module.weight.data.to(store)
            module.weight = torch.nn.Parameter(weight.pin_memory() if pin else weight, requires_grad=False)
            if hasattr(module, "fp8_scale"):
                module.fp8_scale = module.fp8_scale.to(store)
            module.__class__ = OffloadedLinear
            module.compute_dtype = compute_dtype
            layers += 1
    return layers


class FluxTask(ImageTask):
    """A FLUX.1 [dev]/[schnell] LoRA as a `lora_core.task.TrainingTask` (see the module docstring)."""

    kind = "image"

    def __init__(self, cfg, progress=None):
        super().__init__(cfg, progress=progress)
        self.model: Optional[FluxModel] = None
        self.transformer: Any = None  # the module training runs through (DDP-wrapped on several GPUs)
        self.dims = FluxDims()
        self.t5_length = 512
        self.guidance: Optional[float] = None  # [dev]: the guidance value the transformer sees; schnell: None
        self.adapted: list[str] = []  # the transformer modules holding LoRA layers
        self.keep_encoders = False  # captions change per step (shuffle/dropout): the encoders stay
        self.prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # sample prompt → (T5, pooled)
        self.swapped_layers = 0

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self, accelerator) -> None:
        """Data, model (all on the CPU but the AE), caching (T5 and CLIP on the device one at a time, then
        dropped), LoRA, then the transformer onto the device — so T5 and the transformer never share the GPU."""
        self._use_accelerator(accelerator)
        self._check_device()
        self._scan_data()
        self._load_model()
        self._cache()
        torch.manual_seed(self.cfg.training.seed + accelerator.process_index)
        self._add_lora()
        self._place_weights()
        self._prepare(accelerator)

    def _check_device(self) -> None:
        if self.cfg.training.flux_blocks_to_swap and self.device.type != "cuda":
            raise ConfigError([f"training.flux_blocks_to_swap: keeps blocks in CPU RAM for a GPU run; this run is on "
                               f"{self.device.type} (CUDA only), got {self.cfg.training.flux_blocks_to_swap}"])

    def _load_model(self) -> None:
        m, t = self.cfg.model, self.cfg.training
        model = load_flux_model(m.base_model, m.t5_path, m.clip_path, m.vae_path, m.t5_tokenizer,
                                dtype=self.weight_dtype,
                                vae_dtype=torch.float32 if m.no_half_vae else self.weight_dtype)
        self.model = model
        self.dims = FluxDims.from_config(model.transformer.config)
        self.t5_length = m.t5_max_length or (512 if model.variant == "dev" else 256)
        if model.variant == "schnell" and t.guidance_scale is not None:
            raise ConfigError([f"training.guidance_scale: {Path(m.base_model).name} is FLUX.1 [schnell], which has "
                               f"no guidance embedding; leave guidance_scale empty, got {t.guidance_scale}"])
        self.guidance = (t.guidance_scale if t.guidance_scale is not None else DEV_TRAIN_GUIDANCE) \
            if model.variant == "dev" else None
        if t.noise_offset:
            log.warning("training.noise_offset %s is not used by FLUX's flow-matching objective", t.noise_offset)
        model.vae.requires_grad_(False).to(self.device).eval()
        model.transformer.requires_grad_(False)
        for encoder in self._base_text_encoders():
            encoder.requires_grad_(False).eval()
        self.transformer = self.unet = model.transformer

    def _add_lora(self) -> None:
        """LoRA on ``flux_target_modules`` inside the blocks ``flux_train_blocks`` selects."""
        m, tr = self.cfg.model, self.model.transformer
        if m.network_weights:
            raise ConfigError([f"model.network_weights: continuing a FLUX LoRA is not supported yet, got "
                               f"{m.network_weights!r}"])
        try:
            double, single = train_blocks(m.flux_train_blocks, tr.config.num_layers, tr.config.num_single_layers)
        except ValueError as e:
            raise ConfigError([f"model.flux_train_blocks: {e}"]) from None
        names = lora_targets(tr, m.flux_target_modules, block_prefixes(double, single), m.flux_train_blocks)
        self.spec = AdapterSpec.from_model_config(m)
        self.alpha = self.spec.alpha
        self.adapted = add_network(tr, self.spec, names, field="model.flux_target_modules", conv=False)
        log.info("FLUX LoRA on %d layers of %d double + %d single blocks", len(self.adapted), len(double),
                 len(single))

    def _place_weights(self) -> None:
        m, t, tr = self.cfg.model, self.cfg.training, self.model.transformer
        if m.fp8_base:
            to_fp8(tr, self.weight_dtype)
        if t.flux_blocks_to_swap:
            self.swapped_layers = offload_blocks(tr, t.flux_blocks_to_swap, self.weight_dtype)
            log.info("flux_blocks_to_swap: %d blocks (%d linear layers) stay in CPU RAM", t.flux_blocks_to_swap,
                     self.swapped_layers)
        for name, param in tr.named_parameters():
            if isinstance(_owner(tr, name), OffloadedLinear) and not is_adapter_param(name):
                continue  # stays in CPU RAM
            param.data = param.data.to(self.device, param.dtype if is_fp8(param) else
                                       torch.float32 if is_adapter_param(name) else self.weight_dtype)
        for name, buf in tr.named_buffers():
            if not isinstance(_owner(tr, name), OffloadedLinear):
                buf.data = buf.data.to(self.device)
        place_adapters(tr, self.device)
        if t.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()

    def _prepare(self, accelerator) -> None:
        self.transformer = self.unet = accelerator.prepare_model(self.model.transformer)
        if self.speed.compile:
            self.transformer.compile()

    # ---- caching -----------------------------------------------------------------------------------------------
    def _cache(self) -> None:
        d = self.cfg.data
        self.cache_latents = d.cache_latents and not d.flip_aug and d.center_crop
        self.keep_encoders = d.shuffle_caption or d.caption_dropout > 0 or not d.cache_text_encoder_outputs
        self.cache_text = not self.keep_encoders
        if self.cache_latents:
            self._cache_all_latents()
        self._encoders_to(self.device)
        if self.cache_text:
            self._cache_all_text()
        self._cache_prompts()
        self._cache_flux_validation()
        if self.keep_encoders:
            log.warning("FLUX: captions change every step (shuffle_caption/caption_dropout or no text caching), "
                        "so T5 and CLIP-L stay loaded")
            self._encoders_to("cpu" if self.device.type == "cuda" else self.device)
        else:
            self._free_encoders()
        self._offload_frozen()

    def _encoders_to(self, device) -> None:
        for encoder in self._base_text_encoders():
            encoder.to(device)

    def _free_encoders(self) -> None:
        """Drop T5 and CLIP-L: every caption and prompt is encoded (the point of caching for FLUX)."""
        self.model.text_encoder = self.model.text_encoder_2 = None
        self.text_encoder = self.text_encoder_2 = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _sample_latent(self, item_index, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """One latent per image from a generator seeded by its place, normalised as FLUX's AE wants it."""
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.training.seed, "latent", item_index))
        noise = torch.randn(mean.shape, generator=gen).to(mean.device, mean.dtype)
        cfg = self.model.vae.config
        return ((mean + std * noise - cfg.shift_factor) * cfg.scaling_factor).float()

    def _tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP-L ids (B, 77), T5 ids (B, t5_length)), padded as FluxPipeline pads them."""
        clip = self.model.tokenizer(captions, padding="max_length", max_length=self.model.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
        t5 = self.model.tokenizer_2(captions, padding="max_length", max_length=self.t5_length, truncation=True,
                                    return_tensors="pt").input_ids
        return clip, t5

    def _encode_text(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 hidden states, CLIP-L pooled output), as FluxPipeline.encode_prompt conditions the transformer."""
        clip_ids, t5_ids = ids
        clip_dev = next(self.model.text_encoder.parameters()).device
        t5_dev = next(self.model.text_encoder_2.parameters()).device
        pooled = self.model.text_encoder(clip_ids.to(clip_dev), output_hidden_states=False).pooler_output
        embeds = self.model.text_encoder_2(t5_ids.to(t5_dev), output_hidden_states=False)[0]
        return embeds.to(self.device), pooled.to(self.device)

    def _cache_prompts(self) -> None:
        """The sample prompts and the card preview's prompt, encoded now: the encoders are gone by sample time."""
        prompts = parse_sample_prompts(self.cfg.sample.sample_prompts, self.cfg) if self.cfg.sample.sample_prompts \
            else []
        texts = sorted({p.prompt for p in prompts + self.preview_prompts()} | {""})
        with torch.no_grad():
            for i in range(0, len(texts), 8):
                chunk = texts[i:i + 8]
                embeds, pooled = self._encode_text(self._tokenize(chunk))
                for j, text in enumerate(chunk):
                    self.prompt_cache[text] = (embeds[j].cpu(), pooled[j].cpu())

    def _cache_flux_validation(self) -> None:
        """Held-out images (``data.validation_split``): latents, fixed noise and fixed flow times, text encoded."""
        self.val_data = []
        for k, item in enumerate(getattr(self, "val_items", [])):
            mean, std = self._latent_dist(("val", k), item, epoch=0, index=0)
            latent = self._sample_latent(("val", k), mean, std).cpu()
            gen = torch.Generator().manual_seed(_seed_for(self.cfg.training.seed, "validation", k))
            noise = torch.randn((len(VALIDATION_T), *latent.shape), generator=gen)
            d = self.cfg.data
            caption = process_caption(item.caption, d.trigger_word, False, d.keep_tokens, 0.0, random.Random(0))
            with torch.no_grad():
                embeds, pooled = self._encode_text(self._tokenize([caption]))
            self.val_data.append({"latents": latent, "noise": noise, "t": torch.tensor(VALIDATION_T),
                                  "text": embeds[0].cpu(), "pooled": pooled[0].cpu()})

    def _cache_validation(self) -> None:  # ImageTask's SD version; FLUX's runs in `_cache_flux_validation`
        return None

    # ---- training ----------------------------------------------------------------------------------------------
    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.transformer]

    def param_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": adapter_parameters(self.transformer), "lr": learning_rate}]

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        t = self.cfg.training
        latents = batch["latents"].to(self.device, self.weight_dtype, non_blocking=True)
        if "text" in batch:
            text = batch["text"].to(self.device, self.weight_dtype, non_blocking=True)
            pooled = batch["pooled"].to(self.device, self.weight_dtype, non_blocking=True)
        else:
            with torch.no_grad():
                text, pooled = self._encode_text(batch["input_ids"])
            text, pooled = text.to(self.weight_dtype), pooled.to(self.weight_dtype)
        bsz, _, h, w = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
        times = sample_timesteps(t.timestep_sampling, bsz, generator, t.discrete_flow_shift, (h // 2) * (w // 2))
        per_example = self.flow_loss(latents, noise, times, text, pooled)
        is_reg = batch["is_reg"].to(self.device)
        if is_reg.any():
            per_example = torch.where(is_reg, per_example * self.cfg.data.prior_loss_weight, per_example)
        return per_example.mean()

    def flow_loss(self, latents: torch.Tensor, noise: torch.Tensor, times: torch.Tensor, text: torch.Tensor,
                  pooled: torch.Tensor, transformer: Any = None) -> torch.Tensor:
        """Per-example MSE between the transformer's velocity and ``noise - latents`` at flow times ``times``."""
        bsz, _, h, w = latents.shape
        tt = times.to(self.device, latents.dtype).view(bsz, 1, 1, 1)
        noisy = (1 - tt) * latents + tt * noise
        target = pack(noise - latents)
        guidance = torch.full((bsz,), self.guidance, device=self.device, dtype=latents.dtype) \
            if self.guidance is not None else None
        model = transformer if transformer is not None else self.transformer
        pred = model(hidden_states=pack(noisy), timestep=times.to(self.device, latents.dtype), guidance=guidance,
                     pooled_projections=pooled, encoder_hidden_states=text,
                     txt_ids=torch.zeros(text.shape[1], 3, device=self.device, dtype=latents.dtype),
                     img_ids=image_ids(h, w, self.device, latents.dtype), return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2))

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"transformer.{k}": v for k, v in adapter_state(self.transformer).items()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "transformer."
        load_adapter_state(self.transformer, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def _denoiser(self) -> torch.nn.Module:
        return self.model.transformer

    def _validation_losses(self, e: dict, tr: torch.nn.Module) -> torch.Tensor:
        """Flow loss of one held-out image at its fixed times and noise (`ImageTask.evaluate` runs it)."""
        n = len(e["t"])
        latents = e["latents"].to(self.device, self.weight_dtype).expand(n, -1, -1, -1)
        return self.flow_loss(latents, e["noise"].to(self.device, self.weight_dtype), e["t"],
                              e["text"].to(self.device, self.weight_dtype).expand(n, -1, -1),
                              e["pooled"].to(self.device, self.weight_dtype).expand(n, -1), transformer=tr)

    # ---- outputs -----------------------------------------------------------------------------------------------
    def export(self, path_stem: Path, step: int, epoch: int) -> Path:
        """The LoRA file through the exporter (`flux_export`, the flux-file side): kohya FLUX keys or diffusers."""
        from . import flux_export

        cfg, m, t = self.cfg, self.cfg.model, self.cfg.training
        metadata = dict(
            output_name=path_stem.name, base_model_version=self.model.base_model_version,
            prediction_type="flow", rank=self.spec.rank, alpha=self.alpha, dropout=m.dropout,
            learning_rate=t.learning_rate, text_encoder_lr=None, resolution=cfg.data.resolution,
            num_train_images=self.scan.num_images, tag_frequency=self.scan.tag_frequency(),
            dataset_dirs=self.scan.dataset_dirs(), started_at=self.started_at, steps=step, epoch=epoch,
            max_train_steps=self.total_steps or step, base_model_path=m.base_model, batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps, mixed_precision=t.mixed_precision,
            optimizer=t.optimizer, lr_scheduler=t.lr_scheduler, seed=t.seed, noise_offset=0.0, min_snr_gamma=None,
            clip_skip=1, bucket_info=self.bucket_table, cache_latents=self.cache_latents,
            gradient_checkpointing=t.gradient_checkpointing,
            num_reg_images=self.reg_scan.num_images if self.reg_scan else 0,
            prior_loss_weight=cfg.data.prior_loss_weight, trigger_word=cfg.data.trigger_word,
            network_module=self.spec.network_module, network_args=self.spec.metadata_json(),
            guidance_scale=self.guidance, timestep_sampling=t.timestep_sampling,
            discrete_flow_shift=t.discrete_flow_shift if t.timestep_sampling == "shift" else None,
            t5_max_length=self.t5_length)
        return flux_export.write_flux_lora(path_stem, export_modules(self.transformer), self.dims, self.model.variant,
                                           cfg.output.format, cfg.output.save_precision, metadata)

    def sample(self, step: int, out_dir: Path, progress: Optional[SampleProgress] = None,
               preview: bool = False) -> list[tuple[Path, str]]:
        """Render the sample prompts with FluxPipeline from their cached encodings (the encoders are gone)."""
        prompts = self.preview_prompts() if preview else parse_sample_prompts(self.cfg.sample.sample_prompts, self.cfg)
        if not prompts:
            return []
        from diffusers import FluxPipeline

        self._onload_frozen()
        tr = self.model.transformer
        pipe = FluxPipeline(scheduler=self.model.noise_scheduler, vae=self.model.vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
        pipe.set_progress_bar_config(disable=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        was_training = tr.training
        tr.eval()
        try:
            for i, p in enumerate(prompts):
                embeds, pooled = self._prompt_embeds(p.prompt)
                gen = torch.Generator().manual_seed(p.seed if p.seed is not None else self.cfg.training.seed + i)
                report = _denoise_reporter(progress, i + 1, len(prompts), p)
                with torch.no_grad():
                    image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=p.width, height=p.height,
                                 num_inference_steps=p.steps, guidance_scale=p.guidance, generator=gen,
                                 callback_on_step_end=report, max_sequence_length=self.t5_length).images[0]
                path = out_dir / ("preview.png" if preview else f"step{step:08d}_{i:02d}.png")
                image.save(path)
                written.append((path, p.prompt))
        finally:
            tr.train(was_training)
            self._offload_frozen()
        return written

    def _prompt_embeds(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self.prompt_cache:  # e.g. a preview caption that changed: encode it if the encoders stayed
            if self.model.text_encoder is None:
                raise RuntimeError(f"sample prompt {prompt[:60]!r} was not encoded before T5 was freed")
            with torch.no_grad():
                embeds, pooled = self._encode_text(self._tokenize([prompt]))
            self.prompt_cache[prompt] = (embeds[0].cpu(), pooled[0].cpu())
        embeds, pooled = self.prompt_cache[prompt]
        return embeds[None].to(self.device, self.weight_dtype), pooled[None].to(self.device, self.weight_dtype)

    def training_images(self) -> list[Path]:
        return [item.path for item in self.items if not item.is_reg]


def lora_targets(module: torch.nn.Module, targets: list[str], prefixes: list[str], spec: str) -> list[str]:
    """The Linear layers under ``prefixes`` whose names end with a target; a target matching none is an error."""
    names = [n for n, mod in module.named_modules() if isinstance(mod, torch.nn.Linear)
             and any(n.startswith(p) for p in prefixes) and any(n.endswith("." + t) for t in targets)]
    for target in targets:
        if not any(n.endswith("." + target) for n in names):
            from .lora import LoraTargetError

            raise LoraTargetError(f"model.flux_target_modules: {target!r} matches no Linear layer of the selected "
                                  f"FLUX blocks ({spec})")
    return names


def flux_measurements(cfg) -> dict:
    """The memory plan's numbers for a FLUX run (`lora_core.plan.Measurements` fields), without loading the model:
    weight counts from the files' headers, activations from ONE double and ONE single block built at the model's
    width with random weights and run at the largest bucket (a transformer's activations grow with its block count;
    a full FLUX forward on a CPU would take minutes), LoRA sizes from those blocks' adapters."""
    from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)

    from ..dataset.buckets import make_buckets
    from ..memory import TensorMemoryMeter, saved_for_backward
    from .flux import flux_source_numels

    m, d, t = cfg.model, cfg.data, cfg.training
    half = t.mixed_precision in ("fp16", "bf16")
    dtype = torch.bfloat16 if half else torch.float32
    element = 2 if half else 4
    src = flux_source_numels(m.base_model, m.t5_path, m.clip_path, m.vae_path)
    config = src["config"]
    nd, ns = config["num_layers"], config["num_single_layers"]
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    buckets = make_buckets(d.resolution, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps) \
        if d.enable_bucket else []
    width, height = max(((b.width, b.height) for b in buckets), key=lambda s: s[0] * s[1],
                        default=(d.resolution, d.resolution))
    img_tokens = (height // 16) * (width // 16)
    t5_len = m.t5_max_length or (512 if src["variant"] == "dev" else 256)
    spec = AdapterSpec.from_model_config(m)
    torch.manual_seed(0)
    blocks = {"double": FluxTransformerBlock(dim, config["num_attention_heads"], config["attention_head_dim"]),
              "single": FluxSingleTransformerBlock(dim, config["num_attention_heads"], config["attention_head_dim"])}
    double_sel, single_sel = train_blocks(m.flux_train_blocks, nd, ns)
    rope = FluxPosEmbed(10000, list(config["axes_dims_rope"]))
    ids = torch.zeros(t5_len + img_tokens, 3)
    ids[t5_len:] = image_ids(height // 8, width // 8, "cpu", torch.float32)
    rotary = tuple(x.to(dtype) for x in rope(ids))
    acts, lora, shapes = {}, {}, {}
    for kind, block in blocks.items():
        names = [n for n, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)
                 and any(n == tg or n.endswith("." + tg) for tg in m.flux_target_modules)]
        add_network(block, spec, names, field="model.flux_target_modules", conv=False) if names else None
        for name, p in block.named_parameters():
            p.data = p.data.float() if is_adapter_param(name) else p.data.to(dtype)
        trainable = adapter_parameters(block)
        lora[kind], shapes[kind] = sum(p.numel() for p in trainable), [tuple(p.shape) for p in trainable]
        weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
        hidden = torch.zeros(1, img_tokens, dim, dtype=dtype)
        text = torch.zeros(1, t5_len, dim, dtype=dtype)
        temb = torch.zeros(1, dim, dtype=dtype)
        with saved_for_backward(exclude=weights) as saved:
            block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
        acts[kind] = saved["bytes"]
    del blocks
    act = nd * acts["double"] + ns * acts["single"]
    # checkpointing keeps each block's inputs (image + text tokens) and one block's activations while recomputing
    act_gc = (nd + ns) * (img_tokens + t5_len) * dim * element + max(acts.values())
    vae_cfg = src["vae_shapes"]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(vae_cfg).to(dtype)
    meter = TensorMemoryMeter()
    with torch.no_grad(), meter:
        vae.encode(torch.zeros(1, 3, height, width, dtype=dtype)).latent_dist.mean
    param_shapes = shapes["double"] * len(double_sel) + shapes["single"] * len(single_sel)
    return dict(weights=src["transformer"] * element + src["vae"] * element,
                lora_params=lora["double"] * len(double_sel) + lora["single"] * len(single_sel),
                act_per_example=act, act_per_example_gc=act_gc, vae_encode_per_example=meter.peak_bytes,
                fp8_params=src["linear"], fp8_channels=src["linear_channels"], fp8_largest=src["linear_largest"],
                param_shapes=param_shapes, encoder_bytes=src["encoders"] * 4, swap_block_numels=src["blocks"],
                half=half)


def _owner(root: torch.nn.Module, param_name: str) -> torch.nn.Module:
    """The module that owns a parameter or buffer, by its dotted name."""
    return root.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else root
