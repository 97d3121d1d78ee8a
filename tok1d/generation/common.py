"""The sampler of any generator (chosen by its objective) and the class labels to sample."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import numpy as np

from tok1d.generation import autoregressive, maskgit

# objective (`tok1d.models.interfaces.Generator`) -> make_sampler(model, **options)
SAMPLERS: dict[str, Callable[..., Callable]] = {
    "masked": maskgit.make_sampler,
    "next_token": autoregressive.make_sampler,
    "permuted_next_token": autoregressive.make_rar_sampler,
}


def sampler_options(model) -> tuple[str, ...]:
    """The options of `model`'s sampler (the keys `config.sampling` may hold), sorted."""
    if model.objective not in SAMPLERS:
        raise ValueError(f"No sampler for generator objective {model.objective!r}; known: "
                         f"{sorted(SAMPLERS)}.")
    maker = SAMPLERS[model.objective]
    if maker is maskgit.make_sampler:  # (it takes **kwargs: its settings' table)
        return tuple(sorted(maskgit.SAMPLER_DEFAULTS))
    return tuple(sorted(name for name, p in inspect.signature(maker).parameters.items()
                        if p.kind == inspect.Parameter.KEYWORD_ONLY))


def make_sampler(model, **kwargs: Any) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """The jitted `fn(params, labels, rng) -> codes (B, N)` for `model`: MaskGIT's iterative
    decoding for objective "masked", autoregressive decoding with a KV cache for
    "next_token" (GPT) and "permuted_next_token" (RAR, in raster order). `kwargs` are the
    sampler's options (config.sampling, `sampler_options`); unknown ones fail."""
    valid = sampler_options(model)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"Unknown sampler argument(s) {unknown} for a {model.objective!r} "
                         f"generator; valid: {list(valid)}.")
    return SAMPLERS[model.objective](model, **kwargs)


def cyclic_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Class labels 0, 1, ..., num_classes - 1, 0, 1, ... for `num_images` samples (50000
    images = 50 per ImageNet class, as the ADM / LlamaGen evaluations)."""
    return (np.arange(num_images) % num_classes).astype(np.int32)


def sample_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Labels 0..num_classes-1, each repeated per_class times (one grid row per class)."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
