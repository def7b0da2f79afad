"""The one config schema: every entry point (CLI, daemon, tab, REST) goes through `load_config`/`config_from_dict`.

A config is YAML in one of two forms that mean the same thing:

* flat, as people write them for lora-scripts (``learning_rate: 2e-4`` at the top level), or
* sectioned (``training: {learning_rate: 2e-4}``).

Every field has a default (documented in ``configs/lora_default.yaml``). Validation happens here, before any model is
loaded, and every error names the field, the value, the reason and the YAML line so a user can fix it without reading
code. Only ``yaml.safe_load``-equivalent parsing is used (``yaml.compose`` with the safe loader).
"""
from __future__ import annotations

from .errors import InputError
import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

TASK_TYPES = ("text-to-image", "text-generation")
MODEL_FAMILIES = ("auto", "sd1", "sd2", "sdxl", "flux")
# FLUX.1 flow-matching timestep sampling (sd-scripts' --timestep_sampling): sigmoid of a normal draw, the same
# shifted by discrete_flow_shift, uniform, or shifted by the image's token count as FLUX sampling does
TIMESTEP_SAMPLING = ("sigmoid", "shift", "uniform", "flux_shift")
# FLUX.1 LoRA targets (diffusers module names inside the double/single blocks): attention and MLP linears, as
# sd-scripts trains by default (modulation layers left out)
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = ("fp16", "bf16", "float")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion", "lion8bit", "schedulefree_adamw", "came")
# lora: kohya LoRA on the targets; locon: + the 3x3 convs of resnet/down/upsample blocks; loha/lokr: LyCORIS
# Hadamard/Kronecker products; dora: LoRA with a learned magnitude (use_dora adds it to the others)
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
OOM_POLICIES = ("stop", "step_down")
EXPORT_FORMATS = ("kohya", "diffusers")
TEXT_FORMATS = ("auto", "text", "instruction", "chat")


class ConfigError(InputError):
    """A config the user must fix. ``problems`` holds one line per bad field, each naming field, value and line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class DataConfig:
    train_data_dir: Optional[str] = field(default=None, metadata={
        "help": "folder of training images (png, jpg, jpeg, webp); `10_name/` subfolders repeat 10 times"})
    metadata_path: Optional[str] = field(default=None, metadata={
        "help": "metadata.csv (file_name,text); default <train_data_dir>/metadata.csv if present"})
    caption_extension: str = field(default=".txt", metadata={
        "help": "sidecar caption next to each image (used when metadata.csv has no row for it)"})
    default_caption: Optional[str] = field(default=None, metadata={
        "help": "caption for images that have none (otherwise such an image is an error)"})
    trigger_word: Optional[str] = field(default=None, metadata={
        "help": "added first to every caption; leave empty for none"})
    shuffle_caption: bool = field(default=False, metadata={"help": "shuffle comma-separated tags each epoch"})
    keep_tokens: int = field(default=0, metadata={"help": "keep the first N tags in place when shuffling", "ge": 0})
    caption_dropout: float = field(default=0.0, metadata={
        "help": "probability of training an image with an empty caption", "ge": 0, "lt": 1})
    resolution: int = field(default=512, metadata={
        "help": "training size (square side, or bucket area = resolution²)", "ge": 64, "le": 4096, "multiple_of": 8})
    center_crop: bool = field(default=True, metadata={"help": "crop the centre of each image; false = random crop"})
    flip_aug: bool = field(default=False, metadata={"help": "random horizontal flips (turns latent caching off)"})
    enable_bucket: bool = field(default=False, metadata={"help": "aspect-ratio buckets instead of square crops"})
    min_bucket_reso: int = field(default=256, metadata={"help": "smallest bucket side"})
    max_bucket_reso: int = field(default=1024, metadata={"help": "largest bucket side"})
    bucket_reso_steps: int = field(default=64, metadata={
        "help": "bucket sides are multiples of this", "ge": 8, "multiple_of": 8})
    cache_latents: bool = field(default=True, metadata={"help": "encode each image with the VAE once (big speed-up)"})
    cache_latents_to_disk: bool = field(default=False, metadata={"help": "keep the cached latents on disk"})
    cache_text_encoder_outputs: bool = field(default=True, metadata={
        "help": "encode captions once when the text encoder is frozen and captions are fixed"})
    reg_data_dir: Optional[str] = field(default=None, metadata={
        "help": "regularisation images (DreamBooth-style prior preservation)"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "loss weight of regularisation images", "ge": 0})
    # text-generation datasets
    train_data_file: Optional[str] = field(default=None, metadata={"help": "text-generation: a .jsonl or .csv file"})
    text_format: str = field(default="auto", metadata={
        "help": 'text-generation: auto | text {"text"} | instruction {"instruction","output"} | chat {"messages"}',
        "choices": list(TEXT_FORMATS)})
    max_seq_length: int = field(default=512, metadata={"help": "text-generation: tokens per example", "ge": 8})
    packing: bool = field(default=False, metadata={
        "help": "text-generation: pack short examples into full-length sequences"})
    chat_template: Optional[str] = field(default=None, metadata={
        "help": "text-generation: tokenizer, alpaca, chatml or a Jinja template (empty: the tokenizer's)"})
    validation_split: float = field(default=0.0, metadata={
        "help": "share held out for validation: eval loss / perplexity (text), or held-out images whose loss at "
                "fixed timesteps and noise shows overfitting (images)", "ge": 0, "lt": 1})
    validation_every: int = field(default=0, metadata={
        "help": "evaluate the validation split every N steps (0 = at checkpoints and the end)", "ge": 0})


@dataclass
class ModelConfig:
    task_type: str = field(default="text-to-image", metadata={
        "help": "what the LoRA is for", "choices": list(TASK_TYPES)})
    base_model: Optional[str] = field(default=None, metadata={
        "help": "WebUI checkpoint (.safetensors), diffusers folder, or Hugging Face model folder (text)"})
    model_family: str = field(default="auto", metadata={
        "help": "auto: read from the checkpoint", "choices": list(MODEL_FAMILIES)})
    prediction_type: str = field(default="auto", metadata={
        "help": "auto: the model's own", "choices": list(PREDICTION_TYPES)})
    allow_pickle: bool = field(default=False, metadata={
        "help": "allow .ckpt/.pt base models (pickle can run code: only for files you trust)"})
    fp8_base: bool = field(default=False, metadata={
        "help": "store the frozen UNet/text-encoder Linear and Conv weights in fp8 (half of bf16's memory), "
                "upcast per layer; the LoRA stays fp32 (kohya's --fp8_base)"})
    no_half_vae: bool = field(default=False, metadata={
        "help": "keep the VAE in fp32 under fp16/bf16 mixed precision (SDXL's VAE can overflow in fp16)"})
    lora_rank: int = field(default=8, metadata={"help": "network_dim: size of the LoRA matrices", "ge": 1, "le": 1024})
    alpha: Optional[float] = field(default=None, metadata={
        "help": "network_alpha; empty = same as lora_rank (scale 1)", "gt": 0})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout", "ge": 0, "lt": 1})
    unet_target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={
        "help": "UNet modules that get a LoRA", "min_items": 1})
    train_text_encoder: bool = field(default=False, metadata={"help": "train a LoRA on the text encoder too"})
    text_encoder_lr: Optional[float] = field(default=None, metadata={
        "help": "text encoder learning rate; empty = learning_rate", "gt": 0})
    text_encoder_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                              metadata={"help": "text-encoder modules that get a LoRA"})
    clip_skip: int = field(default=1, metadata={"help": "use the output of the N-th last text-encoder layer", "ge": 1})
    network_type: str = field(default="lora", metadata={
        "help": "lora; locon (+ 3x3 convs); loha, lokr (LyCORIS); dora (LoRA + learned magnitude)",
        "choices": list(NETWORK_TYPES)})
    use_dora: bool = field(default=False, metadata={
        "help": "add DoRA's learned magnitude to locon/loha/lokr (network_type dora is lora + this)"})
    conv_rank: Optional[int] = field(default=None, metadata={
        "help": "locon/loha/lokr: rank on the 3x3 convs (conv_dim); empty = lora_rank, 0 = no conv layers",
        "ge": 0, "le": 1024})
    conv_alpha: Optional[float] = field(default=None, metadata={
        "help": "alpha of the conv layers (conv_alpha); empty = conv_rank", "gt": 0})
    lokr_factor: int = field(default=-1, metadata={
        "help": "lokr: Kronecker factor of each dimension; -1 = as square as possible", "ge": -1})
    network_weights: Optional[str] = field(default=None, metadata={
        "help": "continue from an existing LoRA (kohya .safetensors or a peft/diffusers folder or file)"})
    dim_from_weights: bool = field(default=False, metadata={
        "help": "take network type, rank and alpha from network_weights instead of this config"})
    # FLUX.1 (model_family flux)
    t5_path: Optional[str] = field(default=None, metadata={
        "help": "FLUX: the T5-XXL text encoder file, for a transformer-only checkpoint (Forge: models/text_encoder/"
                "t5xxl_fp16.safetensors); empty = the one inside the checkpoint"})
    clip_path: Optional[str] = field(default=None, metadata={
        "help": "FLUX: the CLIP-L text encoder file (Forge: models/text_encoder/clip_l.safetensors); empty = the "
                "one inside the checkpoint"})
    vae_path: Optional[str] = field(default=None, metadata={
        "help": "FLUX: the AE file (Forge: models/VAE/ae.safetensors); empty = the one inside the checkpoint"})
    t5_tokenizer: Optional[str] = field(default=None, metadata={
        "help": "FLUX: folder with the T5 tokenizer (tokenizer.json or spiece.model); empty = the model folder's "
                "own, or Forge's backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2"})
    t5_max_length: Optional[int] = field(default=None, metadata={
        "help": "FLUX: T5 tokens per caption; empty = 512 for dev, 256 for schnell (256 trains faster)",
        "ge": 8, "le": 512})
    flux_target_modules: list = field(default_factory=lambda: list(FLUX_TARGETS), metadata={
        "help": "FLUX: block modules that get a LoRA (diffusers names; attention + MLP by default)",
        "min_items": 1})
    flux_train_blocks: str = field(default="all", metadata={
        "help": "FLUX: which blocks train: all, double, single, or a list like double.0-9,single.20-37"})
    # text-generation models
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": 'text-generation: modules that get a LoRA; "all-linear" for every linear layer', "min_items": 1})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "text-generation QLoRA (needs bitsandbytes + CUDA)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "text-generation: 8-bit base model (bitsandbytes + CUDA)"})


@dataclass
class TrainingConfig:
    batch_size: int = field(default=1, metadata={"help": "images (or examples) per step", "ge": 1})
    epochs: int = field(default=10, metadata={"help": "passes over the dataset", "ge": 1})
    max_train_steps: Optional[int] = field(default=None, metadata={
        "help": "stop after this many steps; overrides epochs when set", "ge": 1})
    learning_rate: float = field(default=1e-4, metadata={"help": "the optimizer's step size", "gt": 0})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "how the learning rate changes over the run", "choices": list(SCHEDULERS)})
    lr_warmup_steps: int = field(default=0, metadata={"help": "steps of linear warm-up", "ge": 0})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step", "ge": 1})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass instead of keeping them"})
    mixed_precision: str = field(default="no", metadata={
        "help": "compute precision (fp16/bf16 need a GPU)", "choices": list(MIXED_PRECISION)})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw8bit/lion8bit need bitsandbytes + CUDA; prodigy wants learning_rate 1.0, lion ~3e-5, "
                "schedulefree_adamw ~1e-3 (pip install lora-scripts[optim] for the extra ones)",
        "choices": list(OPTIMIZERS),
        "lr_hints": {"adamw": 1e-4, "adamw8bit": 1e-4, "prodigy": 1.0, "adafactor": 1e-4, "lion": 3e-5,
                     "lion8bit": 3e-5, "schedulefree_adamw": 1e-3, "came": 1e-4}})
    prodigy_d_coef: float = field(default=1.0, metadata={
        "help": "prodigy: multiplies its estimated step size (0.5 = gentler)", "gt": 0})
    prodigy_use_bias_correction: bool = field(default=False, metadata={
        "help": "prodigy: Adam-style bias correction (kohya_ss presets turn it on)"})
    prodigy_safeguard_warmup: bool = field(default=False, metadata={
        "help": "prodigy: keep the step-size estimate from growing during LR warm-up"})
    adafactor_relative_step: bool = field(default=False, metadata={
        "help": "adafactor: its own 1/sqrt(step) step size (learning_rate is then ignored)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay", "ge": 0})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0 = no clipping", "ge": 0})
    seed: int = field(default=42, metadata={"help": "random seed (same seed, same data: same run)"})
    noise_offset: float = field(default=0.0, metadata={"help": "noise offset (e.g. 0.05 for darker/brighter images)",
                                                        "ge": 0})
    min_snr_gamma: Optional[float] = field(default=None, metadata={"help": "min-SNR loss weighting, e.g. 5", "gt": 0})
    oom_policy: str = field(default="stop", metadata={
        "help": "on out-of-memory: stop, or step_down (halve batch, then gradient checkpointing, then caching)",
        "choices": list(OOM_POLICIES)})
    stop_on: list = field(default_factory=list, metadata={
        "help": "end the run early on these health warnings: overfit (needs data.validation_split; keeps the LoRA "
                "with the lowest validation loss), plateau", "item_choices": ["overfit", "plateau"]})
    auto_fit: bool = field(default=False, metadata={"help": "apply the memory plan's suggestions before training"})
    memory_budget_mb: Optional[float] = field(default=None, metadata={
        "help": "plan for this much memory (empty = what the device has free now)", "gt": 0})
    webui_vram_mb: Optional[float] = field(default=None, metadata={
        "help": "VRAM the WebUI on the same GPU gives back when this run starts (its checkpoint, moved off by the "
                "GPU hand-off); the memory plan counts it as free (empty = none)", "gt": 0})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "latest, or the path to a checkpoint folder"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the UNet: faster steps on a GPU after a first compile of minutes"})
    fused_optimizer: Optional[bool] = field(default=None, metadata={
        "help": "fused AdamW kernel; empty = on with CUDA (adamw only)"})
    tf32: Optional[bool] = field(default=None, metadata={
        "help": "TF32 matmuls/convolutions for fp32 work; empty = on for CUDA GPUs of the Ampere generation or "
                "newer; CUDA only"})
    channels_last: Optional[bool] = field(default=None, metadata={
        "help": "channels-last memory layout for the UNet's convolutions; empty = on with CUDA and fp16/bf16"})
    guidance_scale: Optional[float] = field(default=None, metadata={
        "help": "FLUX.1 [dev]: the distilled guidance value the transformer sees while training; empty = 1.0 "
                "(schnell has no guidance: leave empty)", "ge": 0})
    timestep_sampling: str = field(default="sigmoid", metadata={
        "help": "FLUX: how training timesteps are drawn: sigmoid, shift (sigmoid shifted by discrete_flow_shift), "
                "uniform, flux_shift (shifted by image size)", "choices": list(TIMESTEP_SAMPLING)})
    discrete_flow_shift: float = field(default=3.0, metadata={
        "help": "FLUX: the shift of timestep_sampling shift (higher = noisier timesteps)", "gt": 0})
    flux_blocks_to_swap: int = field(default=0, metadata={
        "help": "FLUX: transformer blocks kept in CPU RAM and moved to the GPU one at a time (saves VRAM, costs "
                "speed; 12 GB cards); CUDA only", "ge": 0})
    pin_memory: Optional[bool] = field(default=None, metadata={
        "help": "cached latents/embeddings in pinned RAM, copied to the GPU without waiting; empty = on with CUDA; "
                "CUDA only"})
    log_every_n_steps: Optional[int] = field(default=None, metadata={
        "help": "read the loss (and report steps) every N steps — each read makes the CPU wait for the GPU; the "
                "non-finite-loss guard runs at each read; empty = every step on a CPU, every 10 on a GPU", "ge": 1})


@dataclass
class OutputConfig:
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "where checkpoints and the finished LoRA are written"})
    output_name: Optional[str] = field(default=None, metadata={
        "help": "file name of the LoRA (what you type in <lora:NAME:0.8>); empty = the output_dir folder name"})
    save_steps: int = field(default=0, metadata={
        "help": "checkpoint + step LoRA every N steps (0 = only at the end)", "ge": 0})
    save_every_n_epochs: int = field(default=0, metadata={"help": "checkpoint every N epochs (0 = only at the end)",
                                                          "ge": 0})
    save_precision: str = field(default="fp16", metadata={
        "help": "precision of the saved LoRA", "choices": list(SAVE_PRECISION)})
    format: str = field(default="kohya", metadata={
        "help": "kohya (A1111/Forge/ComfyUI/diffusers) or diffusers (peft folder)", "choices": list(EXPORT_FORMATS)})
    keep_last_checkpoints: int = field(default=3, metadata={"help": "older checkpoints are deleted", "ge": 1})
    logging_dir: Optional[str] = field(default=None, metadata={"help": "TensorBoard logs; empty = <output_dir>/logs"})
    save_merged_model: bool = field(default=False, metadata={"help": "text-generation: also save base+LoRA merged"})


@dataclass
class SampleConfig:
    sample_prompts: Any = field(default=None, metadata={
        "help": "list of prompts or a .txt file; options --n --w --h --s --l --d per prompt"})
    sample_every_n_steps: int = field(default=0, metadata={"help": "sample every N steps (0 = never)", "ge": 0})
    sample_every_n_epochs: int = field(default=0, metadata={"help": "sample every N epochs (0 = never)", "ge": 0})
    sample_steps: int = field(default=20, metadata={"help": "denoising steps per sample image", "ge": 1, "le": 1000})
    sample_guidance_scale: float = field(default=7.0, metadata={"help": "CFG scale of sample images"})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "text-generation: tokens per sample completion",
                                                             "ge": 1})


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    config_dir: Optional[str] = None  # folder the relative paths were resolved against

    def to_dict(self) -> dict:
        """The sectioned form, ready for YAML/JSON (what is saved next to the outputs and sent to the daemon)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def is_text(self) -> bool:
        return self.model.task_type == "text-generation"

    @property
    def output_path(self) -> Path:
        """Where the final LoRA lands: ``<output_dir>/<output_name>.safetensors`` (a folder for text adapters)."""
        out = Path(self.output.output_dir)
        return out / self.output.output_name if self.is_text else out / f"{self.output.output_name}.safetensors"


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "output": OutputConfig,
    "sample": SampleConfig,
}

# flat key -> section; field names are unique across sections, which is what makes the flat form unambiguous.
FIELD_SECTION: dict[str, str] = {f.name: sec for sec, cls in SECTIONS.items() for f in fields(cls)}
assert len(FIELD_SECTION) == sum(len(fields(c)) for c in SECTIONS.values()), "config field names must be unique"

# Aliases people use in lora-scripts / kohya configs, mapped to our names.
ALIASES: dict[str, str] = {
    "network_dim": "lora_rank",
    "rank": "lora_rank",
    "lora_alpha": "alpha",
    "network_alpha": "alpha",
    "lora_dropout": "dropout",
    "train_batch_size": "batch_size",
    "max_train_epochs": "epochs",
    "num_train_epochs": "epochs",
    "pretrained_model_name_or_path": "base_model",
    "save_every_n_steps": "save_steps",
    "resume": "resume_from_checkpoint",
    "conv_dim": "conv_rank",
    "optimizer_type": "optimizer",
    "t5xxl": "t5_path",
    "clip_l": "clip_path",
    "ae": "vae_path",
    "t5xxl_max_token_length": "t5_max_length",
    "blocks_to_swap": "flux_blocks_to_swap",
}

PATH_FIELDS = {
    ("data", "train_data_dir"), ("data", "metadata_path"), ("data", "reg_data_dir"), ("data", "train_data_file"),
    ("model", "base_model"), ("output", "output_dir"), ("output", "logging_dir"), ("model", "network_weights"),
    ("model", "t5_path"), ("model", "clip_path"), ("model", "vae_path"), ("model", "t5_tokenizer"),
}


def _key_lines(text: str) -> dict[str, int]:
    """Map 'key' and 'section.key' to 1-based YAML line numbers, so errors can point at the line to edit."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if not isinstance(root, yaml.MappingNode):
        return lines
    for knode, vnode in root.value:
        key = str(knode.value)
        lines[key] = knode.start_mark.line + 1
        if isinstance(vnode, yaml.MappingNode):
            for sk, _ in vnode.value:
                lines[f"{key}.{sk.value}"] = sk.start_mark.line + 1
    return lines


def load_config(path: str | Path, overrides: Optional[dict] = None) -> TrainConfig:
    """Read a YAML config file, resolve relative paths against its folder and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"config: cannot read {path}: {e.strerror or e}"]) from None
    return config_from_yaml(text, base_dir=path.resolve().parent, overrides=overrides, source=str(path))


def config_from_yaml(text: str, base_dir: str | Path | None = None, overrides: Optional[dict] = None,
                     source: str = "config") -> TrainConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError([f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys to values, got {type(raw).__name__}"])
    return config_from_dict(raw, base_dir=base_dir, overrides=overrides, lines=_key_lines(text))


def _did_you_mean(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _normalise(raw: dict, lines: dict[str, int], problems: list[str]) -> dict[str, dict[str, tuple[Any, str]]]:
    """Fold flat and sectioned forms into {section: {field: (value, where)}} and collect unknown keys."""
    out: dict[str, dict[str, tuple[Any, str]]] = {s: {} for s in SECTIONS}
    flat_names = list(FIELD_SECTION) + list(SECTIONS)

    def where(key: str) -> str:
        return f" (line {lines[key]})" if key in lines else ""

    def put(section: str, name: str, value: Any, key: str) -> None:
        if name in out[section]:
            problems.append(f"{section}.{name}: given twice{where(key)}")
        out[section][name] = (value, where(key))

    for key, value in raw.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a mapping of settings, got {value!r}{where(key)}")
                continue
            allowed = [f.name for f in fields(SECTIONS[key])]
            for sub, subval in value.items():
                dotted, name = f"{key}.{sub}", ALIASES.get(str(sub), str(sub))
                if name in allowed:
                    put(key, name, subval, dotted)
                elif name in FIELD_SECTION:
                    problems.append(f"{dotted}: belongs in section '{FIELD_SECTION[name]}', not '{key}'{where(dotted)}")
                else:
                    problems.append(f"{dotted}: unknown setting{_did_you_mean(str(sub), allowed)}{where(dotted)}")
        elif key != "config_dir":
            name = ALIASES.get(key, key)
            if name in FIELD_SECTION:
                put(FIELD_SECTION[name], name, value, key)
            else:
                problems.append(f"{key}: unknown setting{_did_you_mean(key, flat_names)}{where(key)}")
    return out


def _number(value: Any, whole: bool) -> Optional[float]:
    """A finite number (whole if asked) from a YAML value, which may be a string like '2e-4'; None if it is not."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or (whole and number != int(number)):
        return None
    return number


def field_type(cls: type, f: dataclasses.Field) -> tuple[str, bool]:
    """A field's value kind ("bool", "int", "float", "str", "list" or "any") and whether it may be empty (None).

    Read with `typing.get_type_hints`, so ``Optional[int]`` is an int that may be empty and ``Literal[...]`` is text;
    the form's schema (`config_schema`) and YAML coercion both use this one answer.
    """
    hint = _hints(cls)[f.name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else Any
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return "any", True
    if origin is typing.Literal:
        return "str", optional
    for kind, python_type in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list)):
        if origin is python_type:
            return kind, optional
    return "any", optional


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_choices(cls: type, f: dataclasses.Field) -> Optional[list]:
    """The allowed values of a field: its ``choices`` metadata, or the values of a ``Literal`` annotation."""
    if "choices" in f.metadata:
        return list(f.metadata["choices"])
    hint = _hints(cls)[f.name]
    hint = next((a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal), hint)
    return list(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else None


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


LIMIT_KEYS = ("choices", "ge", "gt", "le", "lt", "multiple_of", "min_items")


def field_limits(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    """The checks declared on a field (choices, bounds ``ge``/``gt``/``le``/``lt``, ``multiple_of``, ``min_items``)."""
    limits = {key: f.metadata[key] for key in LIMIT_KEYS if key in f.metadata}
    choices = field_choices(cls, f)
    if choices is not None:
        limits["choices"] = choices
    return limits


def _limit_problem(value: Any, limits: dict[str, Any]) -> Optional[str]:
    """Why ``value`` breaks the field's declared limits (a reason without the field name), or None; empty is fine."""
    if value is None:
        return None
    if "choices" in limits and value not in limits["choices"]:
        return f"must be one of {', '.join(map(str, limits['choices']))}"
    if "min_items" in limits and isinstance(value, list) and len(value) < limits["min_items"]:
        return "must not be empty" if limits["min_items"] == 1 else f"must name at least {limits['min_items']}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    ge, gt, le, lt, step = (limits.get(k) for k in ("ge", "gt", "le", "lt", "multiple_of"))
    ok = ((ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le)
          and (lt is None or value < lt) and (step is None or value % step == 0))
    if ok:
        return None
    multiple = f"a multiple of {step}" if step is not None else ""
    if ge is not None and le is not None:
        return f"must be {multiple} between {ge} and {le}".replace("  ", " ")
    bound = (f"in [{ge}, {lt})" if ge is not None and lt is not None else f"> {gt}" if gt is not None
             else f"at least {ge}" if ge is not None else f"at most {le}" if le is not None
             else f"< {lt}" if lt is not None else "")
    return "must be " + " and ".join(part for part in (multiple, bound) if part)


def _coerce(section: str, f: dataclasses.Field, value: Any, where: str, problems: list[str]) -> Any:
    """Turn a YAML value into the field's type; YAML reads `2e-4` as a string, so numbers are parsed here."""
    name = f"{section}.{f.name}"
    default = _default(f)
    kind, optional = field_type(SECTIONS[section], f)
    if value is None:
        if optional:
            return None
        problems.append(f"{name}: must not be empty{where}")
        return default
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        problems.append(f"{name}: must be true or false, got {value!r}{where}")
        return default
    if kind in ("int", "float"):
        whole = kind == "int"
        number = _number(value, whole)
        if number is None:
            problems.append(f"{name}: must be a {'whole number' if whole else 'finite number'}, got {value!r}{where}")
            return default
        return int(number) if whole else number
    if kind == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{name}: must be a list of names, got {value!r}{where}")
            return default
        return list(value)
    if kind == "str":
        if isinstance(value, (dict, list)):
            problems.append(f"{name}: must be text, got {value!r}{where}")
            return default
        return str(value)
    return value


def _apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set each override (flat ``batch_size`` or dotted ``training.batch_size``) in its section, removing the same
    field wherever the original config had it (flat, sectioned or under an alias), so an override replaces a value
    instead of colliding with it."""
    for key, value in overrides.items():
        name = ALIASES.get(key.split(".")[-1], key.split(".")[-1])
        section = key.split(".")[0] if "." in key else FIELD_SECTION.get(name)
        if section is None:
            raw[key] = value  # unknown: let validation report it with a hint
            continue
        for flat in [name] + [a for a, target in ALIASES.items() if target == name]:
            raw.pop(flat, None)
            for sec in SECTIONS:
                if isinstance(raw.get(sec), dict):
                    raw[sec] = {k: v for k, v in raw[sec].items() if k != flat}
        raw[section] = {**(raw.get(section) or {}), name: value}
    return raw


def config_from_dict(raw: dict, base_dir: str | Path | None = None, overrides: Optional[dict] = None,
                     lines: Optional[dict[str, int]] = None) -> TrainConfig:
    """Build and validate a TrainConfig from a flat or sectioned dict (what the daemon and the tab send).

    ``overrides`` are flat or dotted keys (``training.batch_size``) applied on top, used by OOM step-down and
    ``auto_fit``. Raises ConfigError listing every problem at once, so a user fixes them in one pass.
    """
    lines = lines or {}
    problems: list[str] = []
    raw = _apply_overrides(dict(raw), overrides or {})
    if base_dir is None and raw.get("config_dir"):
        base_dir = raw["config_dir"]
    given = _normalise(raw, lines, problems)
    cfg = TrainConfig()
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        for f in fields(cls):
            if f.name in given[section]:
                value, where = given[section][f.name]
                setattr(obj, f.name, _coerce(section, f, value, where, problems))
    base = Path(base_dir).resolve() if base_dir else Path.cwd()
    cfg.config_dir = str(base)
    for section, name in PATH_FIELDS:
        value = getattr(getattr(cfg, section), name)
        if value:
            setattr(getattr(cfg, section), name, str((base / Path(str(value)).expanduser()).resolve()))
    rfc = cfg.training.resume_from_checkpoint
    if rfc and rfc != "latest":
        cfg.training.resume_from_checkpoint = str((base / Path(rfc).expanduser()).resolve())
    sp = cfg.sample.sample_prompts
    if isinstance(sp, str) and sp.strip() and (sp.endswith(".txt") or (base / sp).is_file()):
        cfg.sample.sample_prompts = str((base / sp).resolve())
    _validate(cfg, given, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _validate(cfg: TrainConfig, given: dict[str, dict[str, tuple[Any, str]]], problems: list[str]) -> None:
    def where(section: str, name: str) -> str:
        return given[section].get(name, (None, ""))[1]

    def check(ok: bool, section: str, name: str, reason: str) -> None:
        if not ok:
            value = getattr(getattr(cfg, section), name)
            problems.append(f"{section}.{name}: {reason}, got {value!r}{where(section, name)}")

    d, m, t, o, s = cfg.data, cfg.model, cfg.training, cfg.output, cfg.sample
    for section, cls in SECTIONS.items():  # choices and bounds, as declared on the fields
        for f in fields(cls):
            reason = _limit_problem(getattr(getattr(cfg, section), f.name), field_limits(cls, f))
            if reason:
                check(False, section, f.name, reason)
    # rules that involve more than one field
    check(not (m.load_in_4bit and m.load_in_8bit), "model", "load_in_4bit", "cannot be combined with load_in_8bit")
    check(not (cfg.is_text and m.fp8_base), "model", "fp8_base",
          "applies to image models (SD1/SD2/SDXL); use load_in_8bit or load_in_4bit for a language model")
    check(not (t.fused_optimizer and t.optimizer != "adamw"), "training", "fused_optimizer",
          f"applies to optimizer adamw only (optimizer is {t.optimizer})")
    check(not (m.fp8_base and (m.network_type not in ("lora", "locon") or m.use_dora)), "model", "fp8_base",
          f"works with network_type lora or locon (no DoRA): {m.network_type}{' + DoRA' if m.use_dora else ''} "
          f"reads the base weights themselves")
    check(d.min_bucket_reso <= d.resolution <= d.max_bucket_reso or not d.enable_bucket, "data", "min_bucket_reso",
          f"must be <= resolution ({d.resolution}) <= max_bucket_reso ({d.max_bucket_reso})")
    unknown_stops = [v for v in t.stop_on if v not in ("overfit", "plateau")]
    check(not unknown_stops, "training", "stop_on", f"may name overfit and plateau only (not {', '.join(unknown_stops)})")
    check("overfit" not in t.stop_on or d.validation_split > 0, "training", "stop_on",
          "overfit needs held-out data: set data.validation_split (e.g. 0.1)")
    check(m.lokr_factor == -1 or m.lokr_factor >= 1, "model", "lokr_factor", "must be -1 (automatic) or at least 1")
    check(not (cfg.is_text and m.network_type == "locon"), "model", "network_type",
          "locon adds convolution layers, which language models do not have; use lora, dora, loha or lokr")
    check(cfg.is_text or o.format != "diffusers" or (m.network_type in ("lora", "locon") and not m.use_dora),
          "model", "network_type", "output.format diffusers holds plain LoRA only; loha, lokr and DoRA are "
          "written as kohya files (format: kohya), which A1111, Forge and ComfyUI load")
    for name in ("t5_path", "clip_path", "vae_path", "t5_tokenizer"):  # FLUX parts: refused before anything loads
        value = getattr(m, name)
        if value and not Path(value).exists():
            problems.append(f"model.{name}: no such file or folder, got {value!r}{where('model', name)}")
    from .image.flux_keys import block_spec_problem

    reason = block_spec_problem(m.flux_train_blocks)
    check(reason is None, "model", "flux_train_blocks", reason or "")
    if m.model_family == "flux":
        check(not m.train_text_encoder, "model", "train_text_encoder",
              "FLUX LoRAs train the transformer only here (T5 and CLIP-L stay frozen and cached)")
        check(t.min_snr_gamma is None, "training", "min_snr_gamma", "applies to SD's noise schedule, not FLUX's "
              "flow matching; leave it empty")
        check(not m.network_weights, "model", "network_weights", "continuing a FLUX LoRA is not supported yet")
    if m.network_weights and not Path(m.network_weights).exists():
        problems.append(f"model.network_weights: no such file or folder, got {m.network_weights!r}"
                        f"{where('model', 'network_weights')}")
    from .optimizers import optimizer_problems  # standard library only: the daemon validates configs too

    problems.extend(f"{p}{where('training', p.split(':')[0].split('.')[-1])}" for p in optimizer_problems(cfg))

    if m.base_model is None:
        problems.append("model.base_model: required: a local diffusers folder or .safetensors checkpoint "
                        "(or a Hugging Face model folder for text-generation)")
    elif not Path(m.base_model).exists():
        problems.append(f"model.base_model: no such file or folder, got {m.base_model!r}{where('model', 'base_model')}")
    elif m.base_model.lower().endswith((".ckpt", ".pt", ".pth", ".bin")) and not m.allow_pickle:
        problems.append(f"model.base_model: {Path(m.base_model).name} is a pickle file, which can run code when "
                        f"loaded; convert it to .safetensors or set model.allow_pickle: true"
                        f"{where('model', 'base_model')}")
    if cfg.is_text:
        if not d.train_data_file:
            problems.append("data.train_data_file: required for text-generation (a .jsonl or .csv file)")
        elif not Path(d.train_data_file).is_file():
            problems.append(f"data.train_data_file: no such file, got {d.train_data_file!r}"
                            f"{where('data', 'train_data_file')}")
    else:
        if not d.train_data_dir:
            problems.append("data.train_data_dir: required: the folder with your training images")
        elif not Path(d.train_data_dir).is_dir():
            problems.append(f"data.train_data_dir: no such folder, got {d.train_data_dir!r}"
                            f"{where('data', 'train_data_dir')}")
        if d.metadata_path and not Path(d.metadata_path).is_file():
            problems.append(f"data.metadata_path: no such file, got {d.metadata_path!r}{where('data', 'metadata_path')}")
        if d.reg_data_dir and not Path(d.reg_data_dir).is_dir():
            problems.append(f"data.reg_data_dir: no such folder, got {d.reg_data_dir!r}{where('data', 'reg_data_dir')}")
    if not o.output_dir:
        problems.append("output.output_dir: required: where checkpoints and the finished LoRA are written")
    if o.output_name is None and o.output_dir:
        o.output_name = Path(o.output_dir).name or "lora"
    if o.output_name is not None:
        bad = set('/\\:*?"<>|') & set(o.output_name)
        if bad or o.output_name.strip(". ") == "" or o.output_name != o.output_name.strip():
            problems.append(f"output.output_name: must be a plain file name without {''.join(sorted(bad)) or 'leading/trailing dots or spaces'}, "
                            f"got {o.output_name!r}{where('output', 'output_name')}")
    if o.logging_dir is None and o.output_dir:
        o.logging_dir = str(Path(o.output_dir) / "logs")
    ct = d.chat_template
    if ct is not None and ct not in ("tokenizer", "alpaca", "chatml") and "{%" not in ct and "{{" not in ct:
        problems.append(f"data.chat_template: must be tokenizer, alpaca, chatml or a Jinja template, got {ct!r}"
                        f"{where('data', 'chat_template')}")
    sp = s.sample_prompts
    if sp is not None and not isinstance(sp, (str, list)):
        problems.append(f"sample.sample_prompts: must be a list of prompts or a .txt file, got {sp!r}"
                        f"{where('sample', 'sample_prompts')}")
    elif sp and not cfg.is_text:  # a bad --w would otherwise stop the run at its first sample, hours in
        from .image.sample_prompts import parse_sample_prompts

        try:
            parse_sample_prompts(sp, cfg)
        except ValueError as e:
            problems.append(f"{e}{where('sample', 'sample_prompts')}")


def save_resolved_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the fully resolved config (absolute paths, every default filled) so a run can be reproduced."""
    from .files import atomic_write_text

    return atomic_write_text(path, cfg.to_yaml())


SCHEMA_PATH = "daemon/ui/config_schema.json"  # relative to the repository root
SCHEMA_COMMAND = f"python -m lora_core.config --write-schema {SCHEMA_PATH}"


def config_schema() -> dict:
    """Every setting as plain JSON data: section, type, whether it may be empty, default, help and limits.

    The WebUI's form cannot import this module (it runs in the WebUI's Python, without torch or the engine), so it
    reads this data from a generated, checked-in file (`SCHEMA_PATH`); tests/test_config_schema.py fails when the
    file no longer matches these dataclasses.
    """
    settings: dict[str, dict] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            kind, optional = field_type(cls, f)
            settings[f.name] = {"section": section, "type": kind, "optional": optional, "default": _default(f),
                                "help": f.metadata.get("help", ""), **field_limits(cls, f)}
    return {"about": f"Generated from lora_core/config.py; do not edit. Refresh with: {SCHEMA_COMMAND}",
            "sections": list(SECTIONS), "aliases": dict(ALIASES), "fields": settings}


def schema_json() -> str:
    """`config_schema` as the exact text of the checked-in file (stable order, one trailing newline)."""
    return json.dumps(config_schema(), indent=1, ensure_ascii=False) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m lora_core.config --write-schema PATH``: regenerate the form's schema file after changing a field."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lora_core.config", description="Regenerate the WebUI form's "
                                     "copy of the config schema after adding or changing a setting.")
    parser.add_argument("--write-schema", metavar="PATH", required=True,
                        help=f"where to write the JSON schema (the repository keeps it at {SCHEMA_PATH})")
    args = parser.parse_args(argv)
    Path(args.write_schema).write_text(schema_json(), encoding="utf-8")
    print(f"wrote {args.write_schema} ({len(config_schema()['fields'])} settings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
