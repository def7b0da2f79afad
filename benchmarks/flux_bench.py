"""The FLUX.1 parts of `train_speed.py --family flux`: the plain baseline loop and the real-shape GPU section.

* `run_flux_baseline` does each step what diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` does by
  default — load and transform the images, AE-encode them, run CLIP-L and T5 on the captions, pack the latents,
  one flow-matching step of the transformer with the same LoRA targets, plain AdamW — so the ratio against ours
  (latents and both encoders' outputs cached once, encoders freed) is the cost of not caching.
* `real_shape` (CUDA only): FLUX.1 [dev]'s real transformer (19 double + 38 single blocks, 3072 wide) built on the
  GPU with random bf16 weights — nothing downloaded — its frozen Linear weights stored in fp8 (`fp8_base`), LoRA
  rank 16 on the default targets, gradient checkpointing, AdamW; steps/s and peak VRAM at 512 and 1024 px with
  random T5 (512 tokens) and CLIP inputs. The text encoders and AE are not in it: a LoRA run has them cached.
"""
from __future__ import annotations

import time
from pathlib import Path


def run_flux_baseline(model: Path, data: Path, out: Path, args) -> dict:
    import torch
    import torch.nn.functional as F

    from bench_common import fresh_dir
    from lora_core.config import FLUX_TARGETS
    from lora_core.dataset.scan import load_image, scan_dataset
    from lora_core.events import EventWriter
    from lora_core.image.adapters import AdapterSpec, adapter_parameters, add_network
    from lora_core.image.flux import load_flux_model
    from lora_core.image.flux_keys import block_prefixes
    from lora_core.image.flux_task import image_ids, lora_targets, pack

    events = EventWriter(fresh_dir(out) / "events.jsonl")
    torch.manual_seed(0)
    fm = load_flux_model(model)
    tr = fm.transformer
    for part in (fm.vae, fm.text_encoder, fm.text_encoder_2, tr):
        part.requires_grad_(False)
    cfg = tr.config
    names = lora_targets(tr, FLUX_TARGETS, block_prefixes(range(cfg.num_layers), range(cfg.num_single_layers)),
                         "all")
    add_network(tr, AdapterSpec(rank=8, alpha=8.0), names, field="model.flux_target_modules", conv=False)
    tr.train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    for m in (tr, fm.vae, fm.text_encoder, fm.text_encoder_2):
        m.to(device)
    optimizer = torch.optim.AdamW(adapter_parameters(tr), lr=1e-4)
    items = scan_dataset(data).items
    vae_cfg = fm.vae.config
    events.emit("start", step=0, total_steps=args.steps)
    for step in range(args.steps):
        batch = [items[(step * args.batch_size + i) % len(items)] for i in range(args.batch_size)]
        pixels = torch.stack([load_image(it.path, args.resolution, args.resolution) for it in batch]).to(device)
        captions = [it.caption for it in batch]
        clip_ids = fm.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device)
        t5_ids = fm.tokenizer_2(captions, padding="max_length", max_length=args.t5_max_length, truncation=True,
                                return_tensors="pt").input_ids.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                latents = (fm.vae.encode(pixels).latent_dist.sample() - vae_cfg.shift_factor) * vae_cfg.scaling_factor
                pooled = fm.text_encoder(clip_ids).pooler_output
                text = fm.text_encoder_2(t5_ids)[0]
            b, _, h, w = latents.shape
            noise = torch.randn_like(latents)
            t = torch.sigmoid(torch.randn(b, device=device))
            noisy = (1 - t.view(b, 1, 1, 1)) * latents + t.view(b, 1, 1, 1) * noise
            pred = tr(hidden_states=pack(noisy), timestep=t, guidance=torch.ones(b, device=device)
                      if cfg.guidance_embeds else None, pooled_projections=pooled, encoder_hidden_states=text,
                      txt_ids=torch.zeros(text.shape[1], 3, device=device),
                      img_ids=image_ids(h, w, device, latents.dtype), return_dict=False)[0]
            loss = F.mse_loss(pred.float(), pack(noise - latents).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        events.emit("step", step=step + 1, loss=loss.item())
    events.close()
    return {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0}


def real_shape(args) -> dict:
    """Steps/s and peak VRAM of FLUX.1 [dev]'s real transformer, fp8 base, at 512 and 1024 px (see the docstring)."""
    import torch
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel

    from lora_core.config import FLUX_TARGETS
    from lora_core.image.adapters import AdapterSpec, adapter_parameters, add_network
    from lora_core.image.flux_keys import block_prefixes
    from lora_core.image.flux_task import image_ids, lora_targets, pack
    from lora_core.image.fp8 import to_fp8

    if not torch.cuda.is_available():
        raise SystemExit("--real-shape needs a CUDA GPU (FLUX.1's 12 B transformer, random weights built on it)")
    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 on the GPU: 24 GB, never an fp32 copy
    try:
        with torch.device(device):
            tr = FluxTransformer2DModel(guidance_embeds=True)
    finally:
        torch.set_default_dtype(default)
    tr.requires_grad_(False)
    names = lora_targets(tr, FLUX_TARGETS, block_prefixes(range(19), range(38)), "all")
    add_network(tr, AdapterSpec(rank=args.rank, alpha=float(args.rank)), names, field="model.flux_target_modules",
                conv=False)
    layers = to_fp8(tr, torch.bfloat16) if not args.no_fp8 else 0
    torch.cuda.empty_cache()
    tr.enable_gradient_checkpointing()
    tr.train()
    optimizer = torch.optim.AdamW(adapter_parameters(tr), lr=1e-4)
    build_s = time.perf_counter() - started
    weights_mb = torch.cuda.memory_allocated() / 2**20
    rows = []
    for res in args.real_resolutions:
        torch.cuda.reset_peak_memory_stats()
        h = w = res // 8
        times = []
        for step in range(args.steps):
            latents = torch.randn(1, 16, h, w, device=device, dtype=torch.bfloat16)
            text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
            pooled = torch.randn(1, 768, device=device, dtype=torch.bfloat16)
            noise = torch.randn_like(latents)
            t = torch.sigmoid(torch.randn(1, device=device))
            tt = t.view(1, 1, 1, 1).to(torch.bfloat16)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = tr(hidden_states=pack((1 - tt) * latents + tt * noise), timestep=t.to(torch.bfloat16),
                          guidance=torch.ones(1, device=device, dtype=torch.bfloat16), pooled_projections=pooled,
                          encoder_hidden_states=text, txt_ids=torch.zeros(512, 3, device=device),
                          img_ids=image_ids(h, w, device, torch.bfloat16), return_dict=False)[0]
                loss = F.mse_loss(pred.float(), pack(noise - latents).float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - begin)
        timed = times[args.warmup:] or times
        rows.append({"resolution": res, "steps_s": round(len(timed) / sum(timed), 4),
                     "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                     "first_step_s": round(times[0], 2)})
    return {"bench": "train_speed_flux_real_shape", "device": torch.cuda.get_device_name(0),
            "fp8_base": not args.no_fp8, "fp8_layers": layers, "lora_rank": args.rank,
            "lora_layers": len(names), "gradient_checkpointing": True, "batch_size": 1, "t5_tokens": 512,
            "weights_mb_after_build": round(weights_mb, 1), "build_s": round(build_s, 1), "steps": args.steps,
            "warmup": args.warmup, "results": rows}
