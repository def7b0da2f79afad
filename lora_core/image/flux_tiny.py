"""Tiny FLUX.1-shaped models with seeded random weights, built offline in seconds (tests, quickstart, benchmarks).

The real architectures, only narrow: a diffusers ``FluxTransformer2DModel`` with two double and two single blocks
(dev: with the guidance embedder; schnell: without), a T5 encoder (``T5EncoderModel``, gated-GELU as T5 v1.1), a CLIP
text model (its pooled output conditions FLUX), a 16-channel ``AutoencoderKL`` without quant convs (FLUX's AE) and
FLUX's own flow-matching scheduler config. Tokenizers are built here: CLIP's from the BPE table shipped with the
package, and a small T5-style Unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended) trained
on a fixed word list with the ``tokenizers`` library — nothing comes from a hub.

Written as a diffusers folder (what ``FluxPipeline.from_pretrained`` reads) or as BFL-format single files:
``full`` (transformer under ``model.diffusion_model.``, AE under ``vae.``, encoders under ``text_encoders.…`` —
the layout Forge and ComfyUI keep in ``models/Stable-diffusion``) or ``parts`` (a transformer-only file with BFL
names, plus ``ae.safetensors``, ``clip_l.safetensors`` and ``t5xxl.safetensors`` as they sit in Forge's
``models/VAE`` and ``models/text_encoder``). ``fp8`` stores the transformer's weights as ``float8_e4m3fn``, as the
published fp8 files do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..files import atomic_path
from ..preflight import TINY_T5_MARK
from . import flux_keys

VARIANTS = ("dev", "schnell")
TINY = dict(heads=2, head_dim=16, double=2, single=2, text_hidden=32, text_layers=2, text_intermediate=64,
            t5_d_model=32, t5_d_kv=8, t5_heads=4, t5_d_ff=64, t5_layers=2, vae_channels=(32, 32, 32, 32))
# for benchmarks: FLUX.1's proportions (twice as many single as double blocks, heads of 64, CLIP-L's width, a T5
# wider than the transformer as T5-XXL is) at about a 120th of its size, and a quarter-width AE
MID = dict(heads=6, head_dim=64, double=4, single=8, text_hidden=768, text_layers=2, text_intermediate=1024,
           t5_d_model=512, t5_d_kv=64, t5_heads=8, t5_d_ff=1024, t5_layers=4, vae_channels=(32, 64, 128, 128))
SIZES = {"tiny": TINY, "mid": MID}
# the T5 tokenizer's training text: words of the tiny dataset's captions and common caption words; anything else
# falls back to single characters (the alphabet is in the vocabulary) or <unk>
T5_WORDS = ("a an the of and with in on at to by for picture photo image painting drawing style simple background "
            "red green blue yellow white black circle square triangle shape small large bright dark light person "
            "man woman cat dog tree house sky sun water city night day portrait landscape detailed sharp "
            "abcdefghijklmnopqrstuvwxyz 0123456789 , . ! ? - _ ( ) : ;")
SCHEDULER = {  # FLUX.1's FlowMatchEulerDiscreteScheduler configs (as Forge ships them)
    "dev": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
    "schnell": dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
}
AE_SCALE, AE_SHIFT = 0.3611, 0.1159  # FLUX AE's latent scaling and shift


def build_t5_tokenizer(words: str = T5_WORDS):
    """A T5TokenizerFast over a fixed Unigram vocabulary: ``<pad>``, ``</s>``, ``<unk>``, then every word of
    ``words`` as a whole piece (``▁word``) and every character alone, so any text tokenizes. Built, not trained:
    the ``tokenizers`` trainer breaks ties differently in each process, and the loader must rebuild the very same
    tokenizer for a tiny single file."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for word in words.split():
        for piece, score in [("▁" + word, -1.0)] + [(ch, -5.0) for ch in word]:
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score))
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def t5_encoder(vocab_size: int, d_model: int, d_kv: int, heads: int, d_ff: int, layers: int, buckets: int = 32,
               max_distance: int = 128):
    """A T5 v1.1-style encoder (gated GELU, tanh approximation: FLUX's T5-XXL); the loader builds the same from a
    file's shapes."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff,
                      num_layers=layers, feed_forward_proj="gated-gelu", relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=max_distance, is_encoder_decoder=False, use_cache=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    config.dense_act_fn = "gelu_pytorch_tanh"
    model = T5EncoderModel(config)
    # one embedding table, as T5 checkpoints mean it (transformers 5 ties it only with tie_word_embeddings, which
    # FLUX's T5 config sets false; the files store shared.weight once)
    model.encoder.embed_tokens = model.shared
    return model


def flux_vae(channels: tuple = TINY["vae_channels"], layers: int = 1):
    """FLUX's AE shape: 16 latent channels, no quant/post-quant convs, 8× down (4 levels), its scale and shift."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=tuple(channels),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=layers, norm_num_groups=32, sample_size=64, scaling_factor=AE_SCALE,
                         shift_factor=AE_SHIFT, use_quant_conv=False, use_post_quant_conv=False)


def build_flux_components(variant: str = "dev", seed: int = 0, size: str = "tiny") -> dict:
    """The keyword arguments of ``FluxPipeline`` (transformer, vae, text_encoder(_2), tokenizer(_2), scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from .clip_tokenizer import load_clip_tokenizer
    from .sd_models import clip_text_model

    if variant not in VARIANTS:
        raise ValueError(f"tiny FLUX: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if size not in SIZES:
        raise ValueError(f"tiny FLUX: size {size!r} is not one of {', '.join(SIZES)}")
    s = SIZES[size]
    torch.manual_seed(seed)
    tokenizer_2 = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=s["double"], num_single_layers=s["single"],
        attention_head_dim=s["head_dim"], num_attention_heads=s["heads"], joint_attention_dim=s["t5_d_model"],
        pooled_projection_dim=s["text_hidden"], guidance_embeds=variant == "dev",
        axes_dims_rope=flux_keys.rope_axes(s["head_dim"]))
    text_encoder = clip_text_model(s["text_hidden"], s["text_layers"], s["text_intermediate"], "quick_gelu")
    text_encoder_2 = t5_encoder(len(tokenizer_2), s["t5_d_model"], s["t5_d_kv"], s["t5_heads"], s["t5_d_ff"],
                                s["t5_layers"])
    return {"transformer": transformer, "vae": flux_vae(s["vae_channels"]), "text_encoder": text_encoder,
            "tokenizer": load_clip_tokenizer(), "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER[variant])}


def build_tiny_flux(out: str | Path, single_file: bool = False, variant: str = "dev", seed: int = 0,
                    layout: str = "full", fp8: bool = False, size: str = "tiny") -> Path:
    """Write a tiny FLUX.1 model: a diffusers folder at ``out``, or (``single_file``) BFL-format files — ``out`` a
    ``.safetensors`` path or a folder to write ``tiny-flux-<variant>.safetensors`` into (``layout`` full or parts,
    see the module docstring). Returns the folder or the (transformer) file."""
    from diffusers import FluxPipeline

    from .clip_tokenizer import write_clip_tokenizer

    if layout not in ("full", "parts"):
        raise ValueError(f"tiny FLUX: layout {layout!r} is not full or parts")
    out = Path(out)
    parts = build_flux_components(variant, seed, size)
    if not single_file:
        FluxPipeline(**parts).save_pretrained(out, safe_serialization=True)
        write_clip_tokenizer(out / "tokenizer")
        return out
    if out.suffix.lower() != ".safetensors":
        out = out / f"tiny-flux-{variant}{'-fp8' if fp8 else ''}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_flux_files(parts, out, layout, fp8)


def transformer_to_bfl(transformer) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer's weights under BFL names (no prefix), via the one key table."""
    return flux_keys.diffusers_to_bfl(transformer.state_dict(), flux_keys.FluxDims.from_config(transformer.config))


def vae_to_bfl(vae) -> dict[str, torch.Tensor]:
    """The AE's weights under the original (LDM) names, without a prefix — as ``ae.safetensors`` has them."""
    from .ldm_keys import vae_to_ldm

    return {k[len("first_stage_model."):]: v
            for k, v in vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items()}


def clip_to_file(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP-L weights as transformers 4 named them (``text_model.…``), as ``clip_l.safetensors`` has them."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}


def write_flux_files(parts: dict, path: Path, layout: str = "full", fp8: bool = False) -> Path:
    """Save components as FLUX single files (see the module docstring); returns the (transformer) file."""
    transformer = transformer_to_bfl(parts["transformer"])
    if fp8:
        transformer = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in transformer.items()}
    ae, clip = vae_to_bfl(parts["vae"]), clip_to_file(parts["text_encoder"])
    t5 = dict(parts["text_encoder_2"].state_dict())
    t5.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight: the files keep one copy
    if layout == "full":
        state = {flux_keys.TRANSFORMER_PREFIX + k: v for k, v in transformer.items()}
        state.update({flux_keys.VAE_PREFIXES[0] + k: v for k, v in ae.items()})
        state.update({flux_keys.CLIP_PREFIX + k: v for k, v in clip.items()})
        state.update({flux_keys.T5_PREFIX + k: v for k, v in t5.items()})
        _save(state, path, TINY_MARK)
        return path
    _save(transformer, path)
    for name, state in (("ae", ae), ("clip_l", clip), ("t5xxl", t5)):
        _save(state, path.parent / f"{name}.safetensors", TINY_MARK if name == "t5xxl" else None)
    return path


# the header note that tells the loader to build this module's T5 tokenizer (real files need Forge's or a path)
TINY_MARK = {TINY_T5_MARK: "tiny"}


def _save(state: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})
