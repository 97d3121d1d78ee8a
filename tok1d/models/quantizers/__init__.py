"""The quantizers every tokenizer can use, behind one interface.

A quantizer is a Linen module with
    num_codes          the vocabulary of one code (None for the continuous KL bottleneck)
    codes_per_token    codes per quantized vector (1; residual VQ: its depth)
    __call__(z, train=False) -> (z_q, aux): z (..., code_dim) -> the straight-through
                       quantized values (same shape) and a dict with
        codes              int32 (...) (residual VQ: (..., depth))
        quantizer_loss     its own loss (codebook + commitment; 0 for FSQ), weighed by
                           `losses.quantizer`
        entropy_loss       (VQ, SimVQ, clustering VQ, residual VQ, LFQ, BSQ) the code-usage
                           entropy term, weighed by `losses.entropy`
        <part>_loss        parts, logged: codebook, commitment, per_sample_entropy,
                           codebook_entropy
    lookup(codes) -> values (..., code_dim) float32: codes back to quantized values (the
                       tokenizers' `decode_codes`)

`QUANTIZERS` names them; `build(name, options, **shared)` makes one, `for_tokenizer` the
one a tokenizer's fields configure, by this rule:
    sizes        the tokenizer's codebook_size, code size and param_dtype go to every
                 quantizer that has the field;
    VQ settings  its l2_norm, commitment_cost, entropy_temperature and rotation_trick are
                 options of the VQ family (`VQ_FAMILY`: vq, clustering_vq, simvq) only; every
                 other quantizer takes its settings from `quantizer_options` alone, with its own
                 defaults (residual VQ: l2_norm False; BSQ: entropy_temperature 1.0). A VQ
                 setting changed from the tokenizer's default with such a quantizer is an error
                 naming it, except rotation_trick (GigaTok's default True), which just does not
                 apply there.
Codebook usage, perplexity and dead codes are computed from the codes
(`tok1d.evaluation.codebook`) for every discrete one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from tok1d.models.presets import check_kwargs
from tok1d.models.quantizers.binary import BSQ, LFQ, bits_to_codes, codes_to_signs
from tok1d.models.quantizers.clustering import (STATE, UPDATES, ClusteringVectorQuantizer,
                                                codebooks_of, merge_param_updates)
from tok1d.models.quantizers.common import (HIGHEST, entropy_loss, entropy_terms, l2_normalize,
                                            rotate_onto, straight_through, symmetric_uniform)
from tok1d.models.quantizers.fsq import FSQ
from tok1d.models.quantizers.gaussian import DiagonalGaussian
from tok1d.models.quantizers.residual import ResidualVQ
from tok1d.models.quantizers.vq import SimVQ, VectorQuantizer

QUANTIZERS: dict[str, type] = {
    "vq": VectorQuantizer,
    "clustering_vq": ClusteringVectorQuantizer,
    "simvq": SimVQ,
    "residual_vq": ResidualVQ,
    "fsq": FSQ,
    "lfq": LFQ,
    "bsq": BSQ,
    "vae": DiagonalGaussian,
}

# The tokenizer fields `for_tokenizer` gives only to the VQ family (module docstring).
VQ_FAMILY = ("vq", "clustering_vq", "simvq")
VQ_SETTINGS = ("l2_norm", "commitment_cost", "entropy_temperature", "rotation_trick")
NOT_APPLICABLE = ("rotation_trick",)  # ignored, not an error, outside the VQ family

__all__ = ["BSQ", "ClusteringVectorQuantizer", "DiagonalGaussian", "FSQ", "HIGHEST", "LFQ",
           "QUANTIZERS", "ResidualVQ", "STATE", "SimVQ", "UPDATES", "VQ_FAMILY", "VQ_SETTINGS",
           "VectorQuantizer", "bits_to_codes", "build", "codebooks_of", "codes_to_signs",
           "entropy_loss", "entropy_terms", "for_tokenizer", "l2_normalize", "lookup_codes",
           "lookup_valid", "merge_param_updates", "rotate_onto", "straight_through",
           "symmetric_uniform", "whole_tokens"]


def build(name: str, options: Optional[Mapping[str, Any]] = None, *, detached: bool = False,
          **defaults: Any) -> nn.Module:
    """The quantizer `name` with `defaults` (those it has no field for are dropped) overridden
    by `options` (all must be fields). A tokenizer builds its quantizer with `for_tokenizer`,
    which passes as `defaults` the sizes to every quantizer and its VQ settings to the VQ
    family only (the rule in the module docstring). Inside a tokenizer's setup assign the
    result (it is named by the attribute); `detached` makes one outside any module (to read
    `num_codes` / `codes_per_token`). The quantizer's input size must equal
    `defaults["code_dim"]` when given (FSQ: len(levels))."""
    if name not in QUANTIZERS:
        raise ValueError(f"Unknown quantizer {name!r}; expected one of {sorted(QUANTIZERS)}.")
    cls = QUANTIZERS[name]
    options = dict(options or {})
    check_kwargs(cls, options, f"quantizer {name!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in defaults.items() if k in fields}
    kwargs.update(options)
    for key in ("levels",):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    module = cls(**kwargs, **({"parent": None} if detached else {}))
    dim = getattr(module, "code_dim", None)
    if "code_dim" in defaults and dim is not None and dim != defaults["code_dim"]:
        raise ValueError(f"quantizer {name!r} quantizes vectors of size {dim} but the tokenizer "
                         f"emits {defaults['code_dim']} (set the tokenizer's code size to {dim})."
                         )
    return module


def for_tokenizer(tokenizer: nn.Module, code_dim: int, *, detached: bool = False) -> nn.Module:
    """The quantizer of `tokenizer` (fields `quantizer`, `quantizer_options`, `codebook_size`,
    `param_dtype` and any of `VQ_SETTINGS`) for vectors of size `code_dim`, by the rule of the
    module docstring: a VQ setting changed from the tokenizer's default raises a ValueError
    naming it when the quantizer is not of the VQ family (rotation_trick excepted)."""
    name = tokenizer.quantizer
    fields = {f.name: f for f in dataclasses.fields(tokenizer)}
    settings = {k: getattr(tokenizer, k) for k in VQ_SETTINGS if k in fields}
    if name not in VQ_FAMILY:
        changed = [k for k, v in settings.items()
                   if k not in NOT_APPLICABLE and v != fields[k].default]
        if changed:
            key = changed[0]
            raise ValueError(
                f"{type(tokenizer).__name__}: {key}={settings[key]!r} configures the VQ "
                f"quantizers ({', '.join(VQ_FAMILY)}) only; quantizer {name!r} takes its "
                f"settings from quantizer_options (leave {key} at its default "
                f"{fields[key].default!r}).")
        settings = {}
    return build(name, tokenizer.quantizer_options, detached=detached,
                 codebook_size=tokenizer.codebook_size, code_dim=code_dim,
                 param_dtype=tokenizer.param_dtype, **settings)


def whole_tokens(count: int, codes_per_token: int) -> int:
    """The latent tokens of `count` flat codes (token-major, as a tokenizer's `encode` returns
    them: residual VQ's depth codes per token); a ValueError unless they are whole tokens."""
    if count % codes_per_token:
        raise ValueError(f"{count} codes are not a whole number of tokens: this quantizer has "
                         f"{codes_per_token} codes per token (give a multiple of "
                         f"{codes_per_token}).")
    return count // codes_per_token


def lookup_codes(quantizer: nn.Module, codes) -> Any:
    """Flat codes (B, k) of a tokenizer's `encode` (k whole tokens) -> the quantized latents
    (B, k / codes_per_token, code_dim): the tokenizers' `decode_codes` (`lookup_valid`)."""
    if codes.ndim != 2:
        raise ValueError(f"decode_codes expects codes of shape (B, k), one row per image; got "
                         f"{tuple(codes.shape)}.")
    per = quantizer.codes_per_token
    tokens = whole_tokens(codes.shape[-1], per)
    return lookup_valid(quantizer,
                        codes.reshape(codes.shape[0], tokens, per) if per > 1 else codes)


def lookup_valid(quantizer: nn.Module, codes) -> Any:
    """`quantizer.lookup(codes)`, where a vector with a code outside [0, num_codes) is NaN, so
    that its decoded pixels are: `jnp.take` wrapped -1 to the last code (another image,
    silently), and FSQ's / the binary quantizers' arithmetic made latents of any integer.
    Codes of another dtype than an integer one are a TypeError."""
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"codes must be integers, got {codes.dtype}.")
    valid = (codes >= 0) & (codes < quantizer.num_codes)
    vectors = quantizer.lookup(jnp.where(valid, codes, 0))
    while valid.ndim >= vectors.ndim:  # (residual VQ: one vector per `depth` codes)
        valid = valid.all(axis=-1)
    return jnp.where(valid[..., None], vectors, jnp.nan)
