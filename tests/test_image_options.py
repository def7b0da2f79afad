"""Image-training options: buckets, caching, samples, loss options, regularisation images."""
from __future__ import annotations

import json

import torch
from PIL import Image
from safetensors import safe_open

from lora_core.dataset.buckets import Bucket, assign_bucket, make_buckets
from lora_core.dataset.scan import load_image
from lora_core.events import EventWriter, read_events
from lora_core.image.task import ImageTask
from lora_core.loop import make_accelerator
from lora_core.tiny import make_tiny_dataset
from lora_core.train import run_training


def test_buckets_keep_the_area_and_images_go_to_the_closest_ratio():
    buckets = make_buckets(128, 64, 256, 32)
    assert Bucket(128, 128) in buckets
    assert all(b.width * b.height <= 128 * 128 and b.width % 32 == 0 and b.height % 32 == 0 for b in buckets)
    assert assign_bucket(300, 100, buckets).ratio > 2.4
    assert assign_bucket(100, 300, buckets).ratio < 1 / 2.4
    assert assign_bucket(500, 500, buckets) == Bucket(128, 128)


def test_an_image_in_a_bucket_of_its_own_ratio_is_scaled_not_stretched(tmp_path):
    im = Image.new("RGB", (300, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        im.paste(colour, (i * 100, 0, (i + 1) * 100, 100))
    im.save(tmp_path / "stripes.png")
    pixels = load_image(tmp_path / "stripes.png", 192, 64)
    assert pixels.shape == (3, 64, 192)
    red_columns = int(((pixels[0, 32] > 0.5) & (pixels[1, 32] < -0.5)).sum())
    assert 62 <= red_columns <= 66, f"a third of the width should stay red, got {red_columns} of 192 columns"


def test_mixed_aspect_ratios_train_without_mixing_sizes_in_a_batch(train_config, tmp_path):
    data = make_tiny_dataset(tmp_path / "mixed", n=6, sizes=[(192, 64), (64, 192), (128, 128)])
    cfg = train_config(train_data_dir=str(data), resolution=128, enable_bucket=True, min_bucket_reso=64,
                       max_bucket_reso=256, bucket_reso_steps=32, batch_size=2, max_train_steps=3)
    task = ImageTask(cfg)
    task.setup(make_accelerator(cfg))
    for epoch in range(3):
        for batch in task.epoch_batches(epoch, 2):
            assert len({task.examples[i].item.bucket for i in batch}) == 1
            latents = task.collate(batch, epoch)["latents"]
            bucket = task.examples[batch[0]].item.bucket
            assert latents.shape[-2:] == (bucket.height // 8, bucket.width // 8)
    result = run_training(cfg, show_progress=False)
    with safe_open(str(result.output), "pt") as f:
        info = json.loads(f.metadata()["ss_bucket_info"])
    sizes = sorted(tuple(b["resolution"]) for b in info["buckets"].values())
    assert len(sizes) == 3 and sum(b["count"] for b in info["buckets"].values()) == 6
    assert all(w * h <= 128 * 128 for w, h in sizes)


def test_cached_and_uncached_runs_have_the_same_loss_curve(train_config, tmp_path):
    cached = run_training(train_config(max_train_steps=5, output_dir=str(tmp_path / "a")), show_progress=False)
    uncached = run_training(train_config(max_train_steps=5, output_dir=str(tmp_path / "b"), cache_latents=False,
                                         cache_text_encoder_outputs=False), show_progress=False)
    assert len(cached.losses) == 5
    assert max(abs(a - b) for a, b in zip(cached.losses, uncached.losses)) < 1e-5


def test_caching_reports_progress_events(train_config, tmp_path):
    events = tmp_path / "events.jsonl"
    run_training(train_config(max_train_steps=1), EventWriter(events), show_progress=False)
    cache = [e for e in read_events(events) if e["type"] == "cache"]
    assert {"latents", "text"} <= {e["what"] for e in cache}
    assert any(e["what"] == "latents" and e["done"] == e["total"] == 4 for e in cache)


def test_sample_prompts_render_pngs_during_training_and_are_announced(train_config, tmp_path):
    events = tmp_path / "events.jsonl"
    cfg = train_config(max_train_steps=4, sample_every_n_steps=2, sample_steps=2,
                       sample_prompts=["a red circle --w 64 --h 64 --d 7", "a blue square --n blurry --s 3 --l 4"])
    run_training(cfg, EventWriter(events), show_progress=False)
    samples = [e for e in read_events(events) if e["type"] == "sample"]
    assert [(e["step"], e["prompt"]) for e in samples] == [(2, "a red circle"), (2, "a blue square"),
                                                           (4, "a red circle"), (4, "a blue square")]
    for e in samples:
        with Image.open(e["path"]) as im:
            assert im.size == (64, 64)


def _first_batch_loss(cfg, reg: bool | None = None) -> float:
    """Loss of one batch with a fixed generator; ``reg`` picks a batch of only regularisation (or only training)
    images."""
    task = ImageTask(cfg)
    task.setup(make_accelerator(cfg))
    indices = [i for i, ex in enumerate(task.examples) if reg is None or ex.item.is_reg == reg][:cfg.training.batch_size]
    batch = task.collate(indices, 0)
    with torch.no_grad():
        return task.loss(batch, torch.Generator().manual_seed(0)).item()


def test_prior_loss_weight_scales_only_the_loss_of_regularisation_images(train_config, tmp_path):
    reg = str(make_tiny_dataset(tmp_path / "reg", n=2, seed=3))
    full = _first_batch_loss(train_config(reg_data_dir=reg, prior_loss_weight=1.0), reg=True)
    half = _first_batch_loss(train_config(reg_data_dir=reg, prior_loss_weight=0.5), reg=True)
    assert abs(half - 0.5 * full) < 1e-6 * max(1.0, full)
    train_full = _first_batch_loss(train_config(reg_data_dir=reg, prior_loss_weight=1.0), reg=False)
    train_half = _first_batch_loss(train_config(reg_data_dir=reg, prior_loss_weight=0.5), reg=False)
    assert train_full == train_half


def test_regularisation_images_are_counted_in_the_metadata(train_config, tmp_path):
    reg = make_tiny_dataset(tmp_path / "reg", n=2, seed=3)
    result = run_training(train_config(reg_data_dir=str(reg), prior_loss_weight=0.5, max_train_steps=2),
                          show_progress=False)
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "2" and meta["ss_prior_loss_weight"] == "0.5"


def test_min_snr_gamma_weights_down_low_noise_timesteps(train_config):
    plain = _first_batch_loss(train_config(batch_size=4))
    weighted = _first_batch_loss(train_config(batch_size=4, min_snr_gamma=0.05))
    assert weighted < plain  # eps-prediction weights are min(snr, γ)/snr ≤ 1


def test_noise_offset_changes_the_noise(train_config):
    assert _first_batch_loss(train_config(noise_offset=0.5)) != _first_batch_loss(train_config())


def test_a_stop_during_caching_cancels_it_before_any_step(train_config, tmp_path):
    from lora_core.loop import StopFlag

    stop = StopFlag()
    stop.set()
    events = tmp_path / "events.jsonl"
    result = run_training(train_config(max_train_steps=3), EventWriter(events), stop, show_progress=False)
    assert result.status == "stopped" and result.step == 0 and result.output is None
    assert read_events(events)[-1]["error"] == "stopped while caching"
    assert not [e for e in read_events(events) if e["type"] == "step"]


def _dataset_event(path):
    return next(e for e in read_events(path) if e["type"] == "dataset")


def test_disk_latent_cache_is_reused_and_invalidated_by_image_resolution_or_vae(train_config, tiny_data, tmp_path,
                                                                               tiny_sd_file):
    def run(name, **overrides):
        events = tmp_path / f"{name}.jsonl"
        result = run_training(train_config(max_train_steps=2, cache_latents_to_disk=True,
                                           output_dir=str(tmp_path / name), **overrides), EventWriter(events),
                              show_progress=False)
        return result, _dataset_event(events)["latent_disk_cache"]

    first, stats = run("first")
    assert stats == {"reused": 0, "encoded": 4, "folder": str(tiny_data / ".lora_cache" / "latents")}
    files = sorted((tiny_data / ".lora_cache" / "latents").glob("*.safetensors"))
    assert len(files) == 4
    second, stats = run("second")
    assert (stats["reused"], stats["encoded"]) == (4, 0)
    assert first.losses == second.losses

    image = sorted(tiny_data.glob("*.png"))[0]
    Image.open(image).rotate(90).save(image)  # an edited image gets a new entry, the rest are reused
    _, stats = run("edited")
    assert (stats["reused"], stats["encoded"]) == (3, 1)
    _, stats = run("bigger", resolution=128)
    assert (stats["reused"], stats["encoded"]) == (0, 4)
    from safetensors.torch import load_file, save_file

    other = load_file(str(tiny_sd_file))
    other = {k: (v + 0.01 if k.startswith("first_stage_model.encoder.conv_in") else v) for k, v in other.items()}
    save_file(other, str(tmp_path / "other-vae.safetensors"))
    _, stats = run("other_vae", base_model=str(tmp_path / "other-vae.safetensors"))
    assert (stats["reused"], stats["encoded"]) == (0, 4)
