"""Recommended settings from the data: look at a dataset, propose a config, and say why for every value.

``lora-train --recommend --data DIR [--base MODEL] [--kind style|character|concept] [--json]``, the daemon's
``recommend`` command and the tab's Recommend button all call `recommend`. It analyses the folder with the dataset
tools the trainer already has (`lora_core.dataset.check` for sizes, captions, tags and near duplicates;
`lora_core.dataset.buckets` for the aspect-ratio buckets; the ``N_name`` repeat folders of `lora_core.dataset.scan`)
and derives each setting from a rule whose source is named next to it (`SOURCES`): sd-scripts' documentation,
community training guides, or a paper. The memory side comes from the memory plan (`lora_core.plan`): its estimate
from one batch-1 forward of the base model on the CPU, not a measured training step on the GPU — cheap, and said so
in the result.

History: the engine never imports the daemon, so the daemon passes this user's earlier runs as plain dicts
(``{"id", "name", "status", "rating": "up"|"down"|None, "config": {...}, "health": ["overfit", ...], "loss",
"error"}``); `adjust_for_history` changes the proposal for what those runs showed and says how.
"""
from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .dataset.buckets import assign_bucket, bucket_info, make_buckets
from .dataset.check import check_dataset
from .dataset.scan import DatasetError, subset_of
from .errors import InputError

log = logging.getLogger(__name__)

KINDS = ("style", "character", "concept")

# Where each rule comes from (cited by key in every reason, so a reader can check it).
SOURCES = {
    "sd-scripts": "kohya-ss/sd-scripts docs: train_network_README / train_README (network_dim, network_alpha, "
                  "unet_lr 1e-4 and text_encoder_lr 5e-5 examples, keep_tokens, shuffle_caption, N_name repeats)",
    "kohya-guide": "community LoRA guides (bmaltais/kohya_ss wiki 'LoRA training parameters'; Holostrawberry's "
                   "'Make your own LoRAs' on civitai): dim 16-32 / alpha half of dim, ~10 repeats x 10 epochs, "
                   "about 100 views per image for a character",
    "lycoris": "KohakuBlueleaf/LyCORIS docs, 'Guidelines': LoCon (conv layers too) suits styles and textures; "
               "keep conv_dim at or below linear dim",
    "nai-buckets": "NovelAI, 'NovelAI Improvements on Stable Diffusion' (2022): aspect-ratio bucketing; "
                   "sd-scripts --enable_bucket",
    "min-snr": "Hang et al., 'Efficient Diffusion Training via Min-SNR Weighting Strategy' (ICCV 2023): gamma 5",
    "sqrt-scaling": "Malladi et al., 'On the SDEs and Scaling Rules for Adaptive Gradient Algorithms' (NeurIPS "
                    "2022): square-root learning-rate scaling with batch size for Adam",
    "warmup-cosine": "Goyal et al. 2017 (warm-up); Loshchilov & Hutter, 'SGDR' (ICLR 2017): cosine decay",
    "prodigy": "konstmish/prodigy README: lr 1.0, use_bias_correction and safeguard_warmup with warm-up",
    "optimizers": "lora_core/optimizers.py: this project's per-optimizer learning-rate hints",
    "plan": "lora_core/plan.py: the memory plan's estimate (one batch-1 forward on the CPU, not a measured step)",
    "clip": "CLIP's text encoder reads 77 tokens (75 + start/end); longer captions are cut (sd-scripts "
            "--max_token_length is not supported here)",
    "holdout": "standard practice: a held-out split to see overfitting (here: loss at fixed timesteps and noise)",
    "history": "this user's earlier runs in the daemon's runs database (their settings, health warnings, 👍/👎)",
    "dataset-check": "lora_core/dataset/check.py: colour dHash near-duplicate detector and size checks",
    "tagger": "a WD14 tagger (lora_core/dataset/captioners/wd14.py) on up to 64 of the images: the share tagged "
              "with a person (1girl, 1boy, solo, portrait, ...) or a named character",
    "family": "the base model's native resolution: SD1 512, SD2 768, SDXL 1024 (Stability AI model cards)",
}

FAMILY_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
GENERIC_TAGS = {"1girl", "1boy", "solo", "simple background", "white background", "looking at viewer", "smile",
                "photo", "a photo", "realistic", "portrait", "outdoors", "indoors", "best quality", "masterpiece"}
TARGET_VIEWS_PER_IMAGE = 100  # kohya-guide: a character trains well at ~10 repeats x 10 epochs
MIN_TOTAL_VIEWS, MAX_TOTAL_VIEWS = 1500, 12000
CLIP_TOKENS = 75
# booru tags that mean "a person is the subject" (WD14's general tags); a named character (WD14 category 4) counts too
PERSON_TAGS = {"1girl", "2girls", "multiple girls", "1boy", "2boys", "multiple boys", "solo", "portrait", "face",
               "close-up", "upper body", "male focus", "female focus"}
TAGGER_SAMPLE = 64  # images tagged at most (evenly spread): recommend stays quick on big folders
CHARACTER_SHARE = 0.5  # at least this share of person images suggests a character LoRA when no kind is given


@dataclass
class Reason:
    """One recommended value: the setting (flat config name), its value, why, and where the rule comes from."""

    field: str
    value: Any
    reason: str
    source: str


@dataclass
class DatasetStats:
    """What the recommendation looked at (JSON-ready)."""

    folder: str
    images: int  # readable images
    unique_images: int  # without exact and near duplicates
    duplicates: list[dict]
    repeats: dict[str, int]  # subset folder -> repeats from its N_name prefix
    mean_repeats: float
    sizes: dict  # short side: min, median, max
    aspect: dict  # share not square, min/max ratio
    buckets: Optional[dict]  # at the recommended resolution, when bucketing is on
    captions: dict  # captioned, mean tags, mean words, max estimated tokens, style ("tags" | "sentences")
    top_tags: list[tuple[str, int]]
    errors: list[str]  # problems that stop training (from the dataset check)
    tagger: Optional[str]  # face/character share, or why it was not measured


@dataclass
class Recommendation:
    settings: dict  # flat config keys -> values; with train_data_dir and base_model, a config that validates
    reasons: list[Reason]
    dataset: DatasetStats
    kind: str
    history: list[dict] = field(default_factory=list)  # how earlier runs changed the proposal
    plan: Optional[dict] = None
    notes: list[str] = field(default_factory=list)
    validated: Optional[bool] = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "reasons": [asdict(r) for r in self.reasons], "kind": self.kind,
                "dataset": asdict(self.dataset), "history": self.history, "plan": self.plan, "notes": self.notes,
                "validated": self.validated, "problems": self.problems, "sources": SOURCES}

    def to_text(self) -> str:
        d = self.dataset
        lines = [f"{d.folder}: {d.images} images ({d.unique_images} unique), {d.captions.get('captioned', 0)} "
                 f"captioned, kind {self.kind}"]
        for r in self.reasons:
            lines.append(f"  {r.field:<24} {json.dumps(r.value):<14} {r.reason}  [{r.source}]")
        for h in self.history:
            lines.append(f"  history: {h['field']} {h['from']} -> {h['to']}: {h['why']}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.validated is not None:
            lines.append("config validates" if self.validated else "config problems: " + "; ".join(self.problems))
        return "\n".join(lines)


class _Builder:
    """Collects settings with their reasons (the last value given for a field wins, its reason replaced)."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.reasons: dict[str, Reason] = {}

    def set(self, name: str, value: Any, reason: str, source: str) -> Any:
        assert source in SOURCES, source
        self.settings[name] = value
        self.reasons[name] = Reason(name, value, reason, source)
        return value


# ---- analysis ---------------------------------------------------------------------------------------------------
def _words(caption: str) -> int:
    return len(re.findall(r"\w+", caption))


def analyse_dataset(folder: str | Path, caption_extension: str = ".txt", metadata_path: Optional[str] = None
                    ) -> DatasetStats:
    """Sizes, aspect ratios, repeats, captions, tags and duplicates of a training folder (nothing is written)."""
    return _analyse(Path(folder), caption_extension, metadata_path)[0]


def _analyse(root: Path, caption_extension: str, metadata_path: Optional[str]) -> tuple[DatasetStats, list[float]]:
    """`analyse_dataset` and the images' aspect ratios (width/height, upright), from one pass of the check."""
    report = check_dataset(root, resolution=64, caption_extension=caption_extension, metadata_path=metadata_path)
    errors = [f"{p.file}: {p.detail}" for p in report.problems if p.severity == "error" and p.kind != "no_caption"]
    if not report.images:
        raise DatasetError(f"data: {root}: no readable images to recommend settings for"
                           + (f" ({errors[0]})" if errors else ""))
    dupes = [{"file": p.file, "of": p.other, "kind": p.kind} for p in report.problems
             if p.kind in ("exact_duplicate", "near_duplicate")]
    repeats: dict[str, int] = {}
    per_image = []
    for info in report.images:
        subset, n, _ = subset_of(root, root / info.file)
        repeats[subset or "."] = n
        per_image.append(n)
    shorts = sorted(min(i.width, i.height) for i in report.images)
    ratios = [i.width / i.height for i in report.images]
    not_square = sum(1 for r in ratios if abs(math.log(r)) > math.log(1.1))
    captions = [i.caption for i in report.images if i.caption]
    tags = [len([t for t in c.split(",") if t.strip()]) for c in captions]
    words = [_words(c) for c in captions]
    firsts = Counter(c.split(",")[0].strip().lower() for c in captions if c.strip())
    tag_style = bool(captions) and statistics.mean(tags) >= 3 and statistics.mean(words) / max(1.0, statistics.mean(
        tags)) <= 3.5
    return DatasetStats(
        folder=str(root), images=len(report.images), unique_images=len(report.images) - len(dupes), duplicates=dupes,
        repeats=repeats, mean_repeats=sum(per_image) / len(per_image),
        sizes={"min_short": shorts[0], "median_short": int(statistics.median(shorts)), "max_short": shorts[-1]},
        aspect={"not_square": not_square, "share_not_square": not_square / len(ratios),
                "min_ratio": round(min(ratios), 3), "max_ratio": round(max(ratios), 3)},
        buckets=None,
        captions={"captioned": len(captions), "mean_tags": round(statistics.mean(tags), 2) if tags else 0.0,
                  "mean_words": round(statistics.mean(words), 2) if words else 0.0,
                  "max_tokens": round(max(words) * 1.3) if words else 0,
                  "style": "tags" if tag_style else "sentences",
                  "first_tags": firsts.most_common(3)},
        top_tags=list(report.tag_frequency.items())[:15], errors=errors,
        tagger="not measured: no tagger is configured for recommend (face/character share skipped)"), ratios


def tagger_folder(tagger: Optional[str]) -> Optional[Path]:
    """The WD14 folder to use: ``tagger`` when given, else the default wd14 folder when its files are in place
    ("configured"); None when there is none (the share is then skipped, with a note)."""
    from .dataset.captioners import available_captioners, check_model_dir

    spec = next((c for c in available_captioners() if c.name == "wd14"), None)
    if spec is None:
        return None
    try:
        return check_model_dir(spec, tagger)
    except Exception as e:  # MissingWeightsError: not configured
        if tagger:
            raise InputError(f"tagger: {e}") from None
        return None


def person_share(folder: Path, model_dir: Path) -> tuple[float, int]:
    """(share of images tagged with a person or a named character, images tagged), on up to `TAGGER_SAMPLE`."""
    from PIL import Image

    from .dataset.captioners import load_captioner
    from .dataset.check import find_images
    from .dataset.captioners.wd14 import CATEGORY_CHARACTER
    from .dataset.scan import upright_rgb

    images = find_images(folder)
    if len(images) > TAGGER_SAMPLE:
        images = [images[round(i * (len(images) - 1) / (TAGGER_SAMPLE - 1))] for i in range(TAGGER_SAMPLE)]
    tagger = load_captioner("wd14", model_dir, device="cpu")
    characters = {name.replace("_", " ").lower() for name, cat in getattr(tagger, "tags", []) if cat ==
                  CATEGORY_CHARACTER}
    pictures = []
    for path in images:
        with Image.open(path) as im:
            pictures.append(upright_rgb(im))
    hits = 0
    for caption in tagger.caption_batch(pictures):
        tags = {t.strip().replace("_", " ").lower() for t in caption.split(",") if t.strip()}
        hits += bool(tags & (PERSON_TAGS | characters))
    return hits / max(1, len(pictures)), len(pictures)


def model_family(base_model: Optional[str]) -> Optional[str]:
    """sd1/sd2/sdxl from the file's tensor names or the folder's layout, without loading weights; None if unknown."""
    if not base_model:
        return None
    path = Path(base_model)
    try:
        if path.is_file() and path.suffix == ".safetensors":
            from safetensors import safe_open

            from .image.sd_models import detect_family

            with safe_open(str(path), "pt") as f:
                return detect_family(list(f.keys()))
        if path.is_dir():
            if (path / "text_encoder_2").is_dir():
                return "sdxl"
            te = json.loads((path / "text_encoder" / "config.json").read_text(encoding="utf-8"))
            return "sd2" if te.get("hidden_act") == "gelu" else "sd1"
    except (OSError, ValueError, InputError) as e:
        log.info("model family of %s not read: %s", base_model, e)
    return None


# ---- the rules --------------------------------------------------------------------------------------------------
def _floor64(value: float) -> int:
    return max(64, int(value) // 64 * 64)


def _resolution(b: _Builder, stats: DatasetStats, family: Optional[str]) -> int:
    native = FAMILY_RESOLUTION.get(family or "", 512)
    median = stats.sizes["median_short"]
    if median < native:
        return b.set("resolution", _floor64(median), f"half the images are smaller than {native} px on their short "
                     f"side (median {median}); upscaling them teaches blur", "dataset-check")
    what = f"the {family} base model's native size" if family else "SD1's native size (base model family unknown)"
    return b.set("resolution", native, what, "family")


def _buckets(b: _Builder, stats: DatasetStats, resolution: int, ratios: list[float]) -> None:
    share = stats.aspect["share_not_square"]
    if share < 0.2:
        b.set("enable_bucket", False, f"{stats.aspect['not_square']} of {stats.images} images are not square: "
              f"centre crops lose little", "nai-buckets")
        return
    steps = 64 if resolution >= 256 else 8
    lo, hi = max(steps, resolution // 2 // steps * steps), resolution * 2
    buckets = make_buckets(resolution, lo, hi, steps)
    assigned = [assign_bucket(int(r * 1000), 1000, buckets) for r in ratios]
    info = bucket_info(assigned, ratios)
    square_error = sum(abs(1.0 - r) for r in ratios) / len(ratios)
    stats.buckets = {"count": len(info["buckets"]), "mean_img_ar_error": round(info["mean_img_ar_error"], 4),
                     "square_crop_error": round(square_error, 4),
                     "sizes": [v["resolution"] + [v["count"]] for v in info["buckets"].values()]}
    b.set("enable_bucket", True, f"{share:.0%} of the images are not square (ratios {stats.aspect['min_ratio']}-"
          f"{stats.aspect['max_ratio']}): {len(info['buckets'])} buckets, mean aspect error "
          f"{info['mean_img_ar_error']:.3f} instead of {square_error:.3f} with square crops", "nai-buckets")
    b.set("min_bucket_reso", lo, "half the resolution: sd-scripts' default proportion (256 at 512)", "sd-scripts")
    b.set("max_bucket_reso", hi, "twice the resolution: sd-scripts' default proportion (1024 at 512)", "sd-scripts")
    b.set("bucket_reso_steps", steps, "bucket sides in multiples of 64, the latent grid's comfortable step"
          if steps == 64 else "a tiny resolution: steps of 8 keep more than one bucket", "sd-scripts")


def _network(b: _Builder, stats: DatasetStats, kind: str) -> int:
    n = stats.unique_images
    base = 32 if kind == "style" else 16
    if n < 10:
        rank, why = 8, f"only {n} unique images: a small rank memorises less"
    elif n > 300:
        rank, why = base * 2, f"{n} unique images carry more to learn than a {base}-dim LoRA holds"
    else:
        rank, why = base, f"the usual dim for a {kind} LoRA with {n} images"
    b.set("lora_rank", rank, why, "kohya-guide")
    b.set("alpha", rank / 2, "half of the rank (scale 0.5): gentler updates at the usual learning rates",
          "sd-scripts")
    if kind == "style":
        b.set("network_type", "locon", "a style lives in textures too: LoCon adds the 3x3 convolutions", "lycoris")
        conv = max(4, rank // 2)
        b.set("conv_rank", conv, "half the linear rank on the convolutions", "lycoris")
        b.set("conv_alpha", conv / 2, "half of conv_rank, as alpha is half of the rank", "lycoris")
    else:
        b.set("network_type", "lora", f"plain LoRA on attention is the usual choice for a {kind}", "kohya-guide")
    if kind == "character":  # decided before the memory plan: a text-encoder LoRA costs memory too
        b.set("train_text_encoder", True, "a character's trigger word learns faster with a text-encoder LoRA",
              "sd-scripts")
    else:
        b.set("train_text_encoder", False, f"a {kind} LoRA rarely needs the text encoder; saves memory and allows "
              "caching its outputs", "kohya-guide")
    return rank


def _captions(b: _Builder, stats: DatasetStats, kind: str, folder: Path) -> None:
    c = stats.captions
    trigger = None
    class_tokens = [re.sub(r"^\d+_", "", s).replace("_", " ").strip() for s in stats.repeats if s != "."]
    common = [(t, n) for t, n in stats.top_tags if n >= 0.8 * max(1, c["captioned"]) and t not in GENERIC_TAGS]
    if kind in ("character", "concept"):
        if class_tokens and class_tokens[0]:
            trigger, why = class_tokens[0], f"the class tokens of the repeat folder {next(iter(stats.repeats))}"
        elif common:
            trigger, why = common[0][0], f"the tag in {common[0][1]} of {c['captioned']} captions"
        else:
            slug = re.sub(r"[^a-z0-9]+", "", folder.name.lower()) or "mylora"
            trigger, why = slug, "the folder's name: a word the base model does not know yet"
        b.set("trigger_word", trigger, f"{why}; a {kind} LoRA is called up by its trigger", "kohya-guide")
    else:
        b.set("trigger_word", None, "a style usually applies without a trigger word", "kohya-guide")
    tagged = c["style"] == "tags"
    if tagged and c["mean_tags"] >= 4:
        b.set("shuffle_caption", True, f"tag captions ({c['mean_tags']:.1f} tags on average): shuffling stops the "
              f"first tags from soaking up everything (costs the text-embedding cache)", "sd-scripts")
        first = c["first_tags"][0] if c["first_tags"] else ("", 0)
        keep = 1 if trigger and first[0] == trigger.lower() and first[1] >= 0.8 * c["captioned"] else 0
        b.set("keep_tokens", keep, "the trigger word stays first: the trainer puts it there itself"
              if trigger and not keep else "the captions start with the trigger: keep that tag in place"
              if keep else "nothing needs to stay first", "sd-scripts")
    else:
        b.set("shuffle_caption", False, "sentence captions: shuffling comma parts would break their grammar"
              if not tagged else f"only {c['mean_tags']:.1f} tags per caption: little to shuffle", "sd-scripts")
        b.set("keep_tokens", 0, "no shuffling, nothing to keep in place", "sd-scripts")


def _schedule(b: _Builder, stats: DatasetStats, batch_size: int, optimizer: str) -> int:
    """Epochs from the views each image should get; returns the number of optimizer steps."""
    n = max(1, stats.unique_images)
    total_views = min(MAX_TOTAL_VIEWS, max(MIN_TOTAL_VIEWS, TARGET_VIEWS_PER_IMAGE * n))
    per_image = total_views / n
    repeats = stats.mean_repeats
    epochs = max(1, round(per_image / repeats))
    b.set("epochs", epochs, f"~{per_image:.0f} views per image ({total_views} in all) with the folders' "
          f"{repeats:g} repeat(s) per epoch", "kohya-guide")
    steps = max(1, math.ceil(stats.images * repeats / batch_size)) * epochs
    b.set("save_every_n_epochs", max(1, epochs // 5), "about five LoRAs along the way to pick the best from",
          "kohya-guide")
    if optimizer == "schedulefree_adamw":
        b.set("lr_scheduler", "constant", "schedule-free AdamW schedules itself", "optimizers")
    elif optimizer == "prodigy":
        b.set("lr_scheduler", "cosine", "Prodigy adapts the step size; cosine still anneals it", "prodigy")
    else:
        b.set("lr_scheduler", "cosine", "warm up, then decay smoothly to zero", "warmup-cosine")
    b.set("lr_warmup_steps", max(0, round(steps * 0.05)), "5% of the run's steps", "warmup-cosine")
    return steps


def _learning_rate(b: _Builder, optimizer: str, batch_size: int, kind: str) -> None:
    from .optimizers import OPTIMIZERS, default_learning_rate

    if optimizer not in OPTIMIZERS:
        raise InputError(f"training.optimizer: unknown {optimizer!r}; one of {', '.join(OPTIMIZERS)}")
    b.set("optimizer", optimizer, OPTIMIZERS[optimizer].note, "optimizers")
    hint = default_learning_rate(optimizer)
    if optimizer == "prodigy":
        b.set("learning_rate", 1.0, "Prodigy finds the step size itself; 1.0 means 'as estimated'", "prodigy")
        b.set("prodigy_use_bias_correction", True, "Adam-style bias correction, as its authors advise", "prodigy")
        b.set("prodigy_safeguard_warmup", True, "keeps the estimate from growing during warm-up", "prodigy")
    else:
        scale = min(2.0, math.sqrt(batch_size))
        b.set("learning_rate", float(f"{hint * scale:.3g}"), f"the {optimizer} hint {hint:g} x sqrt(batch "
              f"{batch_size}) (at most 2x)", "sqrt-scaling")
    if b.settings.get("train_text_encoder"):
        lr = b.settings["learning_rate"]
        b.set("text_encoder_lr", None if optimizer == "prodigy" else float(f"{lr / 2:.3g}"),
              "Prodigy uses one step size" if optimizer == "prodigy" else "half the UNet's, as sd-scripts' example "
              "(5e-5 with 1e-4)", "sd-scripts")


def _validation(b: _Builder, stats: DatasetStats, steps: int) -> None:
    if stats.unique_images >= 20:
        b.set("validation_split", 0.1, f"{stats.unique_images} images: 10% held out show overfitting (health "
              "warnings) at little cost", "holdout")
        b.set("validation_every", max(1, steps // 10), "ten validation points over the run", "holdout")
    else:
        b.set("validation_split", 0.0, f"{stats.unique_images} images: every one is needed for training",
              "holdout")


def _fit_memory(b: _Builder, cfg_dict: dict, stats: DatasetStats, notes: list[str],
                memory_budget_mb: Optional[float]) -> Optional[dict]:
    """Batch size, precision and checkpointing from the memory plan's estimate; None without a base model."""
    import torch

    from .config import config_from_dict
    from .plan import HEADROOM, device_capacity_mb, estimate_mb, measure

    cuda = torch.cuda.is_available()
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    b.set("mixed_precision", precision, "half precision on the GPU halves weights and activations"
          f"{' (bf16: no overflow)' if precision == 'bf16' else ''}" if cuda else
          "no GPU here: fp32 (fp16 needs CUDA)", "plan")
    b.set("cache_latents", True, "encode each image once with the VAE: a big speed-up", "sd-scripts")
    b.set("min_snr_gamma", 5.0, "min-SNR weighting converges faster and more stably", "min-snr")
    bucket_counts = [s[2] for s in (stats.buckets or {}).get("sizes", [])] or [stats.images]
    cap = max(1, min(8, stats.unique_images // 4, max(bucket_counts)))
    if not cfg_dict.get("base_model"):
        b.set("batch_size", min(2, cap), "no base model given: the memory plan was not worked out; 2 suits most "
              "GPUs of 12 GB and more at SD1 sizes", "kohya-guide")
        b.set("gradient_checkpointing", False, "no memory plan without a base model", "plan")
        return None
    cfg = config_from_dict({**cfg_dict, **b.settings, "batch_size": 1, "mixed_precision": precision,
                            "output_dir": cfg_dict.get("output_dir") or str(Path(stats.folder).parent / "lora-out")})
    meas = measure(cfg)
    device = torch.device("cuda" if cuda else "cpu")
    capacity = memory_budget_mb or device_capacity_mb(device)
    usable = capacity * HEADROOM
    base = {"cache_latents": True, "optimizer": cfg.training.optimizer, "mixed_precision": precision,
            "fp8_base": False}
    chosen = None
    for checkpointing in (False, True):
        for bs in (8, 4, 2, 1):
            if bs > cap:
                continue
            est, parts = estimate_mb(meas, {**base, "batch_size": bs, "gradient_checkpointing": checkpointing},
                                     device)
            if est <= usable:
                chosen = (bs, checkpointing, est)
                break
        if chosen:
            break
    if chosen is None:
        est, _ = estimate_mb(meas, {**base, "batch_size": 1, "gradient_checkpointing": True}, device)
        chosen = (1, True, est)
        notes.append(f"even batch 1 with gradient checkpointing is estimated at {est:,.0f} MB of {usable:,.0f} MB "
                     f"usable: try fp8_base or a lower resolution")
    bs, checkpointing, est = chosen
    b.set("batch_size", bs, f"the largest batch (of at most {cap}: a quarter of the unique images and the fullest "
          f"bucket) estimated to fit: {est:,.0f} MB of {usable:,.0f} MB usable on {device.type}", "plan")
    b.set("gradient_checkpointing", checkpointing, "needed to fit" if checkpointing else
          "not needed to fit: faster steps", "plan")
    notes.append("memory figures are the plan's estimate from one batch-1 forward on the CPU, not a measured "
                 "training step on the GPU")
    return {"estimate_mb": round(est, 1), "capacity_mb": round(capacity, 1), "usable_mb": round(usable, 1),
            "device": device.type, "fits": est <= usable, "source": "estimate"}


# ---- history ----------------------------------------------------------------------------------------------------
def _flat(config: dict) -> dict:
    flat: dict = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def adjust_for_history(b: _Builder, history: Sequence[dict]) -> list[dict]:
    """Change the proposal for this user's earlier runs (newest first) and return what changed and why.

    A 👍 run is a known-good recipe: its rank and learning rate (for the same optimizer) are taken. A 👎 run (or
    one whose health warnings say so) moves away from it: overfitting or copied samples → fewer epochs and a lower
    rank; spikes, exploding gradients or divergence → half the learning rate; a plateau with a 👎 → more epochs.
    """
    changes: list[dict] = []

    def change(name: str, value: Any, why: str, run: dict) -> None:
        before = b.settings.get(name)
        if before == value:
            return
        label = run.get("name") or run.get("id")
        changes.append({"field": name, "from": before, "to": value, "why": why, "run": run.get("id")})
        b.set(name, value, f"{why} (run {label})", "history")

    runs = [r for r in history if isinstance(r, dict)]
    liked = next((r for r in runs if r.get("rating") == "up"), None)
    if liked:
        cfg = _flat(liked.get("config") or {})
        if cfg.get("optimizer", b.settings.get("optimizer")) == b.settings.get("optimizer") and cfg.get(
                "learning_rate"):
            change("learning_rate", float(cfg["learning_rate"]), "you rated a run with this learning rate 👍", liked)
        if cfg.get("lora_rank"):
            change("lora_rank", int(cfg["lora_rank"]), "you rated a run with this rank 👍", liked)
            change("alpha", float(cfg.get("alpha") or cfg["lora_rank"]), "the alpha of that 👍 run", liked)
    for run in runs:
        if run is liked:
            break
        kinds = set(run.get("health") or [])
        disliked = run.get("rating") == "down"
        cfg = _flat(run.get("config") or {})
        if kinds & {"overfit", "sample_copy"}:
            if cfg.get("epochs"):
                change("epochs", max(1, round(int(cfg["epochs"]) * 0.7)), "an earlier run overfit (health "
                       "warning): 30% fewer epochs than it had", run)
            if cfg.get("lora_rank") and int(cfg["lora_rank"]) <= int(b.settings.get("lora_rank", 0)):
                change("lora_rank", max(4, int(cfg["lora_rank"]) // 2), "an earlier run overfit at this rank: "
                       "half of it", run)
                change("alpha", b.settings["lora_rank"] / 2, "half of the lowered rank", run)
            break
        if kinds & {"loss_spike", "grad_explosion", "sample_nan"} or run.get("status") == "failed" and \
                "diverged" in str(run.get("error") or ""):
            lr = float(cfg.get("learning_rate") or b.settings.get("learning_rate") or 1e-4)
            if b.settings.get("optimizer") != "prodigy":
                change("learning_rate", float(f"{min(lr, b.settings['learning_rate']) / 2:.3g}"),
                       "an earlier run's loss spiked or diverged: half its learning rate", run)
            break
        if disliked and "plateau" in kinds and cfg.get("epochs"):
            change("epochs", round(int(cfg["epochs"]) * 1.3) + 1, "you rated a run 👎 whose loss plateaued: "
                   "30% more epochs than it had", run)
            break
        if disliked and cfg.get("learning_rate") and b.settings.get("optimizer") != "prodigy" and \
                float(cfg["learning_rate"]) == b.settings.get("learning_rate"):
            change("learning_rate", float(f"{float(cfg['learning_rate']) * 0.7:.3g}"),
                   "you rated a run with this learning rate 👎 (no health warning): 30% lower", run)
            break
    return changes


# ---- entry point ------------------------------------------------------------------------------------------------
def recommend(data_dir: str | Path, base_model: Optional[str] = None, kind: Optional[str] = None,
              optimizer: str = "adamw", history: Optional[Sequence[dict]] = None,
              memory_budget_mb: Optional[float] = None, caption_extension: str = ".txt",
              output_dir: Optional[str] = None, tagger: Optional[str] = None) -> Recommendation:
    """Analyse ``data_dir`` and propose settings for a LoRA of ``kind`` (default character) on ``base_model``.

    ``tagger``: a WD14 folder for the face/character share (default: the wd14 captioner's folder when it is set
    up; without one the share is skipped and a note says so). With no ``kind``, a share of at least
    `CHARACTER_SHARE` means character, less means style; without a tagger the default is character.
    ``history``: this user's earlier runs, newest first, as plain dicts (see the module docstring). The result's
    ``settings`` are flat config keys; with a base model they are checked by the config's own validation
    (``validated``) and the batch size by the memory plan's estimate (``plan``)."""
    if kind is not None and kind not in KINDS:
        raise InputError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    folder = Path(data_dir).expanduser().resolve()
    if not folder.is_dir():
        raise DatasetError(f"data: no such folder, got {str(data_dir)!r}")
    stats, report_ratios = _analyse(folder, caption_extension, None)
    model_dir = tagger_folder(tagger)
    share = None
    if model_dir is not None:
        share, tagged = person_share(folder, model_dir)
        stats.tagger = f"{share:.0%} of {tagged} image(s) show a person or a named character (wd14 tagger in " \
                       f"{model_dir})"
    chosen_kind = kind or ("character" if share is None or share >= CHARACTER_SHARE else "style")
    family = model_family(base_model)
    notes: list[str] = []
    b = _Builder()
    if kind is None and share is not None:
        notes.append(f"kind {chosen_kind}: {share:.0%} of the tagged images show a person or a named character "
                     f"(character from {CHARACTER_SHARE:.0%}) [tagger]")
    kind = chosen_kind
    resolution = _resolution(b, stats, family)
    _buckets(b, stats, resolution, report_ratios)
    _network(b, stats, kind)
    _captions(b, stats, kind, folder)
    if stats.duplicates:
        notes.append(f"{len(stats.duplicates)} duplicate or near-duplicate image(s) ("
                     + ", ".join(d["file"] for d in stats.duplicates[:5]) + "): they train twice; counted once "
                     f"here [{SOURCES['dataset-check'].split(':')[0]}]")
    if stats.captions["max_tokens"] > CLIP_TOKENS:
        notes.append(f"the longest caption is ~{stats.captions['max_tokens']} tokens: CLIP reads {CLIP_TOKENS}, "
                     f"the rest is cut [{SOURCES['clip'].split(';')[0][:40]}]")
    if stats.captions["captioned"] < stats.images:
        notes.append(f"{stats.images - stats.captions['captioned']} image(s) have no caption: caption them "
                     f"(dataset auto-label) or set default_caption")
    if kind == "character" and stats.captions["mean_tags"] < 3:
        notes.append("short captions: describe what varies (pose, clothes, background) so the trigger learns "
                     "the character, not the scene")
    if stats.errors:
        notes.append("the dataset check found errors that stop training: " + "; ".join(stats.errors[:3]))
    notes.append(stats.tagger)
    # the memory plan picks the batch size, which sets the learning rate and the number of steps
    context = {"train_data_dir": str(folder), "base_model": base_model, "resolution": resolution,
               "caption_extension": caption_extension, "optimizer": optimizer,
               **({"output_dir": output_dir} if output_dir else {})}
    b.settings.setdefault("optimizer", optimizer)
    plan = _fit_memory(b, context, stats, notes, memory_budget_mb)
    batch = b.settings["batch_size"]
    _learning_rate(b, optimizer, batch, kind)
    steps = _schedule(b, stats, batch, optimizer)
    _validation(b, stats, steps)
    changes = adjust_for_history(b, history or [])
    if not history:
        notes.append("no earlier runs of yours to learn from")
    settings = {"train_data_dir": str(folder), **({"base_model": base_model} if base_model else {}), **b.settings}
    if caption_extension != ".txt":
        settings["caption_extension"] = caption_extension
    rec = Recommendation(settings, list(b.reasons.values()), stats, kind, changes, plan, notes)
    _validate(rec, output_dir)
    return rec


def _validate(rec: Recommendation, output_dir: Optional[str]) -> None:
    """Run the config's own validation on the proposal (an output folder is stood in when none is given)."""
    from .config import ConfigError, config_from_dict

    raw = {**rec.settings, "output_dir": output_dir or str(Path(rec.dataset.folder).parent / "lora-out")}
    try:
        config_from_dict(raw)
    except ConfigError as e:
        missing_base = [p for p in e.problems if p.startswith("model.base_model: required")]
        rec.problems = [p for p in e.problems if p not in missing_base]
        rec.validated = not rec.problems
        if missing_base:
            rec.notes.append("no base model given: the rest of the config validates; add model.base_model")
        return
    rec.validated = True


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m lora_core.recommend --data DIR`` (the same as ``lora-train --recommend``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m lora_core.recommend", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(args, sys.stdout, sys.stderr)


def add_arguments(parser, standalone: bool = True) -> None:
    """The recommend options, shared by ``python -m lora_core.recommend`` and ``lora-train --recommend`` (which has
    its own ``--json`` and makes ``--data`` required only with ``--recommend``)."""
    parser.add_argument("--data", required=standalone, help="the training images folder")
    parser.add_argument("--base", help="base model (.safetensors or diffusers folder): enables the memory plan")
    parser.add_argument("--kind", choices=KINDS, help="what the LoRA is for (default: character, or from the "
                        "tagger's person share when a tagger is set up)")
    parser.add_argument("--optimizer", default="adamw", help="the optimizer to tune the learning rate for")
    parser.add_argument("--history", help="a JSON file with earlier runs (a list of dicts), newest first")
    parser.add_argument("--tagger", help="a WD14 tagger folder for the face/character share (default: the wd14 "
                        "captioner's folder when set up)")
    if standalone:
        parser.add_argument("--json", action="store_true", help="print the recommendation as JSON")


def run_cli(args, out, err) -> int:
    try:
        history = json.loads(Path(args.history).read_text(encoding="utf-8")) if args.history else None
        rec = recommend(args.data, base_model=args.base, kind=args.kind, optimizer=args.optimizer, history=history,
                        tagger=args.tagger)
    except (InputError, OSError, ValueError) as e:
        print(f"error: {e}", file=err)
        return 2
    print(json.dumps(rec.to_dict(), default=str) if args.json else rec.to_text(), file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
