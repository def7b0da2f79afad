"""The memory plan: will this config fit the device, and if not, which settings will?

``python -m lora_core.train --config X --plan`` prints it without training; ``auto_fit: true`` applies its choice.
The estimate is built from measurements, not a table of GPUs: the model is loaded in the training dtype (as the run
loads it: `load_sd_model` with bf16/fp16 weights, fp32 VAE under no_half_vae), the LoRA added, and one forward pass
at batch 1 and the largest training resolution, under the run's autocast, records what autograd saves for backward
(with and without gradient checkpointing). Peak ≈ frozen weights + LoRA weights/gradients/optimizer state + batch × activations (+ the VAE
encode when latents are not cached) + a margin for the backward pass. Tests check it against the tensor memory
actually used by training steps on the tiny models.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .config import TrainConfig, config_from_dict
from .memory import TensorMemoryMeter, module_bytes, saved_for_backward

log = logging.getLogger(__name__)

MB = 2**20
BACKWARD_MARGIN = 1.25  # gradients of activations and temporaries alive during backward
HEADROOM = 0.90  # plan to use at most this share of the device
CUDA_CONTEXT_MB = 400.0


@dataclass
class Measurements:
    weights: int  # frozen model weights in the compute dtype
    lora_params: int  # number of trainable parameters
    act_per_example: int  # saved-for-backward bytes at batch 1, no checkpointing (fp32)
    act_per_example_gc: int  # ... with gradient checkpointing
    vae_encode_per_example: int  # peak transient of one VAE encode (fp32)
    fp8_params: int = 0  # frozen Linear/Conv weights that model.fp8_base stores in one byte each
    fp8_channels: int = 0  # their output channels (each keeps an fp32 scale)
    fp8_largest: int = 0  # the largest of those layers (upcast for its matmul: one at a time)
    param_shapes: list = field(default_factory=list)  # trainable tensors' shapes: each optimizer's state size
    # FLUX: T5 + CLIP-L weights (fp32 bytes; on the device only while captions are cached, then freed) and each
    # block's frozen Linear weights in the order training.flux_blocks_to_swap keeps them in CPU RAM (numels)
    encoder_bytes: int = 0
    swap_block_numels: list = field(default_factory=list)
    half: bool = False  # measured in half precision (weights, activations, VAE encode); else fp32


@dataclass
class MemoryPlan:
    device: str
    capacity_mb: float
    estimate_mb: float
    breakdown_mb: dict
    fits: bool
    settings: dict  # the settings the estimate is for
    suggestion: Optional[dict] = None  # overrides that fit (None if the config fits as is or nothing fits)
    suggestion_estimate_mb: Optional[float] = None
    candidates: list = field(default_factory=list)
    webui_freed_mb: float = 0.0  # VRAM the WebUI's hand-off frees on this GPU, counted in capacity_mb

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"device: {self.device}, usable {self.capacity_mb * HEADROOM:,.0f} MB of {self.capacity_mb:,.0f} MB",
                 *([f"  of which the WebUI frees {self.webui_freed_mb:,.0f} MB when the run starts (GPU hand-off)"]
                   if self.webui_freed_mb else []),
                 f"estimated peak for this config: {self.estimate_mb:,.0f} MB "
                 f"({'fits' if self.fits else 'does NOT fit'})"]
        lines += [f"  {k:<24}{v:>10,.0f} MB" for k, v in self.breakdown_mb.items()]
        if self.suggestion:
            pretty = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.suggestion.items())
            lines.append(f"suggested: {pretty} → {self.suggestion_estimate_mb:,.0f} MB "
                         f"(auto_fit: true applies it)")
        elif not self.fits:
            lines.append("nothing tried fits: lower data.resolution or use a larger GPU")
        return "\n".join(lines)


def device_capacity_mb(device: torch.device) -> float:
    """Free memory now: the WebUI may hold part of the same GPU, and the plan must fit beside it."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free / MB
    import psutil

    return psutil.virtual_memory().available / MB


def measure_text(cfg: TrainConfig) -> Measurements:
    """A causal LM: one batch-1 forward of ``max_seq_length`` tokens with the loss, as the text task trains."""
    from .text.model import add_lora as add_text_lora
    from .text.model import load_base_model

    def forward_bytes(checkpointing: bool) -> int:
        cfg.training.gradient_checkpointing = checkpointing
        model = add_text_lora(load_base_model(cfg.model.base_model), cfg)
        model.train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        ids = torch.zeros(1, cfg.data.max_seq_length, dtype=torch.long)
        with saved_for_backward(exclude=weights) as saved:
            model(input_ids=ids, labels=ids)
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = module_bytes(model) - lora * 4
        shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
        return saved["bytes"], lora, frozen, shapes

    wanted = cfg.training.gradient_checkpointing
    try:
        act, params, weights, shapes = forward_bytes(False)
        act_gc, _, _, _ = forward_bytes(True)
    finally:
        cfg.training.gradient_checkpointing = wanted
    return Measurements(weights, params, act, act_gc, 0, param_shapes=shapes)


def measure(cfg: TrainConfig) -> Measurements:
    """Load the model on the CPU, add the LoRA, and measure one batch-1 forward at the largest bucket."""
    if cfg.is_text:
        return measure_text(cfg)
    from .image.flux import is_flux_config

    if is_flux_config(cfg):
        from .image.flux_task import flux_measurements

        return Measurements(**flux_measurements(cfg))
    from .dataset.buckets import make_buckets
    from .image.adapters import AdapterSpec, adapter_parameters, add_network
    from .image.sd_models import load_sd_model

    m, d = cfg.model, cfg.data
    half = cfg.training.mixed_precision in ("fp16", "bf16")
    # the run's dtypes (`ImageTask._load_model`); fp16 is measured as bf16 — the same bytes, and a CPU runs it
    dtype = torch.bfloat16 if half else torch.float32
    sd = load_sd_model(m.base_model, m.model_family, m.prediction_type, m.allow_pickle, dtype=dtype,
                       vae_dtype=torch.float32 if m.no_half_vae else dtype)
    spec = AdapterSpec.from_model_config(m)  # the network type decides the trainable tensors (and their state)
    add_network(sd.unet, spec, m.unet_target_modules)
    trainable = adapter_parameters(sd.unet)
    encoders = [te for te in (sd.text_encoder, sd.text_encoder_2) if te is not None]
    if m.train_text_encoder:
        for te in encoders:
            add_network(te, spec, m.text_encoder_target_modules, field="model.text_encoder_target_modules",
                        conv=False)
            trainable += adapter_parameters(te)
    for module in (sd.unet, *encoders):  # LoRA weights in fp32 beside half-precision frozen ones, as the run has them
        for p in adapter_parameters(module):
            p.data = p.data.float()
    params = sum(p.numel() for p in trainable)
    lora_bytes = params * 4
    weights = module_bytes(sd.unet) + module_bytes(sd.vae) + sum(module_bytes(te) for te in encoders) - lora_bytes
    from .image.fp8 import convertible_layers

    fp8_layers = [layer for module in (sd.unet, *encoders) for layer in convertible_layers(module)]
    fp8_sizes = [layer.weight.numel() for layer in fp8_layers]
    buckets = make_buckets(d.resolution, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps) \
        if d.enable_bucket else []
    width, height = max(((b.width, b.height) for b in buckets), key=lambda s: s[0] * s[1],
                        default=(d.resolution, d.resolution))
    scale = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    latents = torch.zeros(1, sd.unet.config.in_channels, height // scale, width // scale, dtype=dtype)
    text = torch.zeros(1, sd.tokenizer.model_max_length, sd.unet.config.cross_attention_dim, dtype=dtype)
    # the run's autocast (accelerate's, for mixed_precision bf16/fp16): what it saves for backward is what counts
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if half else nullcontext()
    with autocast:
        act = activation_bytes(sd.unet, latents, text, checkpointing=False)
        act_gc = activation_bytes(sd.unet, latents, text, checkpointing=True)
    meter = TensorMemoryMeter()
    with torch.no_grad(), meter:
        sd.vae.encode(torch.zeros(1, 3, height, width, dtype=sd.vae.dtype)).latent_dist.mean
    return Measurements(weights, params, act, act_gc, meter.peak_bytes, sum(fp8_sizes),
                        sum(layer.weight.shape[0] for layer in fp8_layers), max(fp8_sizes, default=0),
                        param_shapes=[tuple(p.shape) for p in trainable], half=half)


def activation_bytes(unet: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor, checkpointing: bool) -> int:
    """What autograd keeps for backward in one training forward, minus the frozen weights it references."""
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    extra = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 size/crop numbers
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(latents.shape[0], pooled),
                                      "time_ids": torch.zeros(latents.shape[0], 6)}
    try:
        with saved_for_backward(exclude=weights) as saved:
            unet(latents, torch.tensor([500]), text, **extra)
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
    return saved["bytes"]


def estimate_mb(meas: Measurements, settings: dict, device: torch.device) -> tuple[float, dict]:
    """Peak memory for one set of settings (batch_size, gradient_checkpointing, cache_latents, optimizer,
    mixed_precision, lora_rank scale)."""
    half = settings["mixed_precision"] in ("fp16", "bf16")
    # measured in the config's own precision; a candidate in another one (mixed_precision no → bf16) is scaled
    weights = meas.weights * _precision_scale(meas.half, half, 0.5)
    if settings.get("fp8_base"):  # one byte per frozen Linear/Conv weight + an fp32 scale per channel, and one
        # layer at a time upcast to the compute dtype for its matmul
        element = 2 if half else 4
        weights -= meas.fp8_params * (element - 1) - meas.fp8_channels * 4 - meas.fp8_largest * element
    rank_scale = settings.get("rank_scale", 1.0)
    from .optimizers import optimizer_state_bytes

    # weights + gradients (fp32) + the optimizer's own state, counted from the trainable tensors' shapes
    state = optimizer_state_bytes(settings["optimizer"], meas.param_shapes) if meas.param_shapes \
        else meas.lora_params * (2 if settings["optimizer"] == "adamw8bit" else 8)
    lora = rank_scale * (meas.lora_params * (4 + 4) + state)
    per_example = meas.act_per_example_gc if settings["gradient_checkpointing"] else meas.act_per_example
    if settings["gradient_checkpointing"]:
        per_example += meas.act_per_example / 8  # one block's activations are recomputed at a time
    acts = settings["batch_size"] * per_example * _precision_scale(meas.half, half, 0.55) * BACKWARD_MARGIN
    # the image task encodes uncached images one at a time, so the VAE's transient does not grow with the batch
    vae = 0.0 if settings["cache_latents"] else meas.vae_encode_per_example * _precision_scale(meas.half, half, 0.5)
    context = CUDA_CONTEXT_MB * MB if device.type == "cuda" else 0.0
    swap = settings.get("flux_blocks_to_swap", 0)
    if swap and meas.swap_block_numels:  # those blocks' frozen Linear weights wait in CPU RAM, one layer on the GPU
        element = 1 if settings.get("fp8_base") else (2 if half else 4)
        weights -= sum(meas.swap_block_numels[len(meas.swap_block_numels) - swap:]) * element
    parts = {"model weights": weights, "LoRA + optimizer": lora, "activations": acts, "VAE encode": vae,
             "CUDA context": context}
    if meas.encoder_bytes:  # FLUX: T5 + CLIP-L are on the device only while the captions are encoded, then freed
        encoders = meas.encoder_bytes * (0.5 if half else 1.0)
        parts["text encoders (caching only)"] = encoders
        caching = encoders + vae + context + weights * 0.05  # the AE and little else beside them
        train = sum(v for k, v in parts.items() if k != "text encoders (caching only)")
        return max(train, caching) / MB, {k: v / MB for k, v in parts.items()}
    return sum(parts.values()) / MB, {k: v / MB for k, v in parts.items()}


def _precision_scale(measured_half: bool, wanted_half: bool, half_share: float) -> float:
    """Bytes in the wanted precision per byte measured: ``half_share`` is what half precision keeps of fp32 (0.5 for
    weights; a little more for activations, some of which autocast keeps in fp32)."""
    if measured_half == wanted_half:
        return 1.0
    return half_share if wanted_half else 1.0 / half_share


def current_settings(cfg: TrainConfig) -> dict:
    t = cfg.training
    return {"batch_size": t.batch_size, "gradient_checkpointing": t.gradient_checkpointing,
            "cache_latents": cfg.data.cache_latents and not cfg.data.flip_aug, "optimizer": t.optimizer,
            "mixed_precision": t.mixed_precision, "fp8_base": cfg.model.fp8_base,
            "flux_blocks_to_swap": getattr(t, "flux_blocks_to_swap", 0)}


def candidate_changes(cfg: TrainConfig, device: torch.device) -> list[dict]:
    """Overrides to try, mildest first: caching and checkpointing cost little, a smaller batch costs throughput,
    8-bit optimizer and half precision need CUDA, fp8 base weights cost a little precision, a lower rank changes
    the LoRA."""
    t = cfg.training
    steps: list[dict] = []
    if not cfg.data.cache_latents:
        steps.append({"data.cache_latents": True})
    if not t.gradient_checkpointing:
        steps.append({"training.gradient_checkpointing": True})
    bs = t.batch_size
    while bs > 1:
        bs //= 2
        steps.append({"training.batch_size": bs,
                      "training.gradient_accumulation_steps": t.gradient_accumulation_steps * (t.batch_size // bs)})
    if device.type == "cuda":
        if t.optimizer != "adamw8bit":
            steps.append({"training.optimizer": "adamw8bit"})
        if t.mixed_precision == "no":
            steps.append({"training.mixed_precision": "bf16" if torch.cuda.is_bf16_supported() else "fp16"})
    if not cfg.is_text and not cfg.model.fp8_base:  # halves the frozen weights again, at a small cost in precision
        steps.append({"model.fp8_base": True})
    if device.type == "cuda" and not cfg.is_text:  # FLUX: keep blocks in CPU RAM (slower steps, less VRAM)
        from .image.flux import is_flux_config

        if is_flux_config(cfg):
            steps += [{"training.flux_blocks_to_swap": n} for n in (8, 16, 24, 32)
                      if n > cfg.training.flux_blocks_to_swap]
    if cfg.model.lora_rank > 4:
        steps.append({"model.lora_rank": 4})
    return steps


def _apply(settings: dict, change: dict, cfg: TrainConfig) -> dict:
    s = dict(settings)
    for key, value in change.items():
        name = key.split(".")[-1]
        if name == "lora_rank":
            s["rank_scale"] = value / cfg.model.lora_rank
        elif name in s:
            s[name] = value
    return s


def webui_freed_mb(cfg: TrainConfig, free_mb: float, total_mb: float) -> float:
    """The VRAM the WebUI's GPU hand-off gives back (``training.webui_vram_mb``) that is not free yet: the plan may
    run while the WebUI is still moving its checkpoint off the card. Never more than the card's used memory; none
    with an explicit ``memory_budget_mb`` (the user's number is the whole budget)."""
    wanted = cfg.training.webui_vram_mb or 0.0
    if not wanted or cfg.training.memory_budget_mb:
        return 0.0
    return max(0.0, min(float(wanted), total_mb - free_mb))


def device_total_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / MB
    import psutil

    return psutil.virtual_memory().total / MB


def make_plan(cfg: TrainConfig, meas: Optional[Measurements] = None) -> MemoryPlan:
    device = torch.device("cuda" if (cfg.training.device != "cpu" and torch.cuda.is_available()) else "cpu")
    meas = meas or measure(cfg)
    capacity = cfg.training.memory_budget_mb or device_capacity_mb(device)
    freed = webui_freed_mb(cfg, capacity, device_total_mb(device)) if device.type == "cuda" else 0.0
    capacity += freed
    settings = current_settings(cfg)
    estimate, parts = estimate_mb(meas, settings, device)
    plan = MemoryPlan(str(device), capacity, estimate, parts, estimate <= capacity * HEADROOM, settings,
                      webui_freed_mb=freed)
    if plan.fits:
        return plan
    applied: dict = {}
    for change in candidate_changes(cfg, device):
        applied.update(change)
        s = _apply(settings, applied, cfg)
        est, _ = estimate_mb(meas, s, device)
        plan.candidates.append({"overrides": dict(applied), "estimate_mb": est})
        if est <= capacity * HEADROOM:
            plan.suggestion, plan.suggestion_estimate_mb = dict(applied), est
            break
    return plan


def auto_fit(cfg: TrainConfig) -> tuple[TrainConfig, MemoryPlan]:
    """Apply the plan's suggestion (if any) and return the config to train with."""
    plan = make_plan(cfg)
    if plan.suggestion:
        log.info("auto_fit: %s", plan.suggestion)
        cfg = config_from_dict(cfg.to_dict(), base_dir=cfg.config_dir, overrides=plan.suggestion)
    return cfg, plan
