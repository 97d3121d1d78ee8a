"""Model registry: `create(name, **kwargs)` builds a model from plain keyword arguments.

Config files describe a model as `config.model = dict(name="titok", encoder_size="small", ...)`;
size names are resolved through the tables in `tok1d.models.presets`. Unknown arguments fail
with the list of valid ones.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from tok1d.models import presets
from tok1d.models.frozen import dinov2, inception
from tok1d.models.generators import gpt, maskgit, rar
from tok1d.models.presets import check_kwargs
from tok1d.models.tokenizers.gigatok import VIT_SIZES as GIGATOK_VIT_SIZES, GigaTok
from tok1d.models.tokenizers.titok import TiTok
from tok1d.models.tokenizers.vqgan import MaskGITVQGAN

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: Any):
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
    return DTYPES[name]


def _titok(encoder_size: str | None = None, decoder_size: str | None = None,
           **kwargs: Any) -> TiTok:
    for prefix, size in (("encoder", encoder_size), ("decoder", decoder_size)):
        if size is not None:
            preset = presets.vit_size(size)
            kwargs.setdefault(f"{prefix}_width", preset["width"])
            kwargs.setdefault(f"{prefix}_depth", preset["depth"])
            kwargs.setdefault(f"{prefix}_heads", preset["num_heads"])
            kwargs.setdefault(f"{prefix}_mlp_dim", preset["mlp_dim"])
    if "pixel_channel_mult" in kwargs:
        kwargs["pixel_channel_mult"] = tuple(kwargs["pixel_channel_mult"])
    check_kwargs(TiTok, kwargs, "model 'titok' (plus encoder_size/decoder_size)")
    return TiTok(**kwargs)


def _maskgit_vqgan(**kwargs: Any) -> MaskGITVQGAN:
    if "channel_mult" in kwargs:
        kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
    check_kwargs(MaskGITVQGAN, kwargs, "model 'maskgit_vqgan'")
    return MaskGITVQGAN(**kwargs)


def _gigatok(preset: str | None = None, encoder_size: str | None = None,
             decoder_size: str | None = None, **kwargs: Any) -> GigaTok:
    """GigaTok from a released preset name (presets.GIGATOK_PRESETS) and/or ViT size names
    (gigatok.VIT_SIZES); explicit keyword arguments win."""
    if preset is not None:
        if preset not in presets.GIGATOK_PRESETS:
            raise ValueError(f"Unknown GigaTok preset {preset!r}; known: "
                             f"{sorted(presets.GIGATOK_PRESETS)}.")
        p = presets.GIGATOK_PRESETS[preset]
        encoder_size = encoder_size or p["encoder_size"]
        decoder_size = decoder_size or p["decoder_size"]
        kwargs.setdefault("layout", p["layout"])
        kwargs.setdefault("layer_type", p.get("layer_type", "vit"))
        kwargs.setdefault("rotation_trick", p["rot"])
        kwargs.setdefault("distill_depth", 3)
        kwargs.setdefault("out_inner_dim", 768)
    for prefix, size in (("encoder", encoder_size), ("decoder", decoder_size)):
        if size is not None:
            if size not in GIGATOK_VIT_SIZES:
                raise ValueError(f"Unknown GigaTok ViT size {size!r}; known: "
                                 f"{sorted(GIGATOK_VIT_SIZES)}.")
            s = GIGATOK_VIT_SIZES[size]
            kwargs.setdefault(f"{prefix}_width", s["width"])
            kwargs.setdefault(f"{prefix}_depth", s["depth"])
            kwargs.setdefault(f"{prefix}_heads", s["num_heads"])
    for key in ("encoder_ch_mult", "decoder_ch_mult"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    check_kwargs(GigaTok, kwargs, "model 'gigatok' (plus preset/encoder_size/decoder_size)")
    return GigaTok(**kwargs)


def _dinov2(size: str | None = None, **kwargs: Any) -> nn.Module:
    """DINOv2 ViT from a hub size name (dinov2.DINOV2_SIZES, e.g. "vitb14") and/or explicit
    `DinoV2` arguments (which win)."""
    if size is not None:
        kwargs = dinov2.dinov2_kwargs(size, **kwargs)
    check_kwargs(dinov2.DinoV2, kwargs, "model 'dinov2' (plus size)")
    return dinov2.DinoV2(**kwargs)


def _maskgit(**kwargs: Any) -> nn.Module:
    """MaskGIT generator: `arch` "vit" (TiTok L-32 / B-64) or "uvit" (S-128), `size` names."""
    return maskgit.build(**kwargs)


def _gpt(**kwargs: Any) -> nn.Module:
    """LlamaGen-style GPT (GigaTok's AR generator), `size` "B" / "L" / "XL" / "XXL" / ..."""
    return gpt.build(**kwargs)


def _rar(**kwargs: Any) -> nn.Module:
    """RAR (bytedance/1d-tokenizer's randomized AR generator), `size` "B" / "L" / "XL" / "XXL"."""
    return rar.build(**kwargs)


def _inception_fid(**kwargs: Any) -> nn.Module:
    """pytorch-fid's FID InceptionV3 (+ 1008-way fc head); `resize_input` to 299 px."""
    check_kwargs(inception.FIDInceptionV3, kwargs, "model 'inception_fid'")
    return inception.FIDInceptionV3(**kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {"titok": _titok, "maskgit_vqgan": _maskgit_vqgan,
                                               "gigatok": _gigatok, "dinov2": _dinov2,
                                               "maskgit": _maskgit, "gpt": _gpt, "rar": _rar,
                                               "inception_fid": _inception_fid}


def create(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model `name`; `dtype`/`param_dtype` may be given as strings. Mapping
    arguments (`quantizer_options`, a config's ConfigDict included) become FrozenDicts and
    lists tuples, so that the module hashes as Linen modules must (jit, caches)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}.")
    kwargs = {k: presets.hashable(v) for k, v in kwargs.items()}
    for key in ("dtype", "param_dtype"):
        if key in kwargs:
            kwargs[key] = dtype_from_name(kwargs[key])
    return MODELS[name](**kwargs)

