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
