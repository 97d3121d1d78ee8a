"""Codebook statistics: histogram, usage (fraction of codes used) and perplexity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def code_histogram(codes: jax.Array, codebook_size: int,
                   mask: jax.Array | None = None) -> jax.Array:
    """Counts of each code over all positions (rows with mask=0 are not counted)."""
    flat = codes.reshape(codes.shape[0], -1)
    weights = jnp.ones(flat.shape, jnp.float32)
    if mask is not None:
        weights = weights * mask.reshape(-1, 1).astype(jnp.float32)
    return jnp.zeros((codebook_size,), jnp.float32).at[flat.reshape(-1)].add(weights.reshape(-1))


def perplexity(counts) -> float | jax.Array:
    """exp(entropy) of the code distribution: the effective number of codes in use."""
    xp = jnp if isinstance(counts, jax.Array) else np
    p = counts / xp.maximum(counts.sum(), 1)
    entropy = -xp.sum(xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1)), 0))
    return xp.exp(entropy)


def usage(counts) -> float | jax.Array:
    """Fraction of codebook entries used at least once."""
    xp = jnp if isinstance(counts, jax.Array) else np
    return xp.mean((counts > 0).astype(xp.float32))


def dead_codes(counts) -> int | jax.Array:
    """Number of codebook entries never used."""
    xp = jnp if isinstance(counts, jax.Array) else np
    return xp.sum(counts == 0)
