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

`QUANTIZERS` names them; `build(name, **options)` makes one from a tokenizer's settings (the
options a quantizer does not take are dropped, except those of `options`, which must exist).
Codebook usage, perplexity and dead codes are computed from the codes
(`tok1d.evaluation.codebook`) for every discrete one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn

from tok1d.models.presets import check_kwargs
from tok1d.models.quantizers.binary import BSQ, LFQ, bits_to_codes, codes_to_signs
from tok1d.models.quantizers.clustering import (STATE, UPDATES, ClusteringVectorQuantizer,
                                                merge_param_updates)
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

__all__ = ["BSQ", "ClusteringVectorQuantizer", "DiagonalGaussian", "FSQ", "HIGHEST", "LFQ",
           "QUANTIZERS", "ResidualVQ", "STATE", "SimVQ", "UPDATES", "VectorQuantizer",
           "bits_to_codes", "build", "codes_to_signs", "entropy_loss", "entropy_terms",
           "l2_normalize", "merge_param_updates", "rotate_onto", "straight_through",
           "symmetric_uniform"]


def build(name: str, options: Optional[Mapping[str, Any]] = None, *, detached: bool = False,
          **defaults: Any) -> nn.Module:
    """The quantizer `name` with the tokenizer's `defaults` (codebook_size, code_dim, l2_norm,
    ...; those it has no field for are dropped) overridden by `options` (all must be fields).
    Inside a tokenizer's setup assign the result (it is named by the attribute); `detached`
    makes one outside any module (to read `num_codes` / `codes_per_token`). The quantizer's
    input size must equal `defaults["code_dim"]` when given (FSQ: len(levels))."""
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
