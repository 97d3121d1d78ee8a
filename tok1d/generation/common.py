"""Pieces shared by the MaskGIT and the autoregressive generators."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float, null_label: int) -> jax.Array:
    """Replaces each label by `null_label` with probability `prob` (classifier-free guidance
    training: the same network learns the conditional and the unconditional model)."""
    if prob <= 0.0:
        return labels
    drop = jax.random.bernoulli(rng, prob, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def make_sampler(model, **kwargs):
    """The jitted `fn(params, labels, rng) -> codes (B, N)` for `model`: MaskGIT's iterative
    decoding for a model with a `mask_id`, else autoregressive decoding with a KV cache.
    `kwargs` are the sampler's options (config.sampling); unknown ones fail."""
    if hasattr(model, "mask_id"):
        from tok1d.generation import maskgit
        return maskgit.make_sampler(model, **kwargs)
    from tok1d.generation import autoregressive
    return autoregressive.make_sampler(model, **kwargs)
