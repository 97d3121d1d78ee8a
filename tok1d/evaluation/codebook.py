"""Codebook statistics: histogram, usage (fraction of codes used) and perplexity.

A quantizer with several codes per token (residual VQ: one code per level, each level its own
codebook) gets one histogram per level, shape (levels, K): `usage` and `perplexity` are then the
mean over the levels of each level's value, `dead_codes` the sum of the levels' dead codes (of
levels x K entries), so a level that collapses shows even when another one is healthy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def code_histogram(codes: jax.Array, codebook_size: int,
                   mask: jax.Array | None = None, levels: int = 1) -> jax.Array:
    """Counts of each code over all positions (rows with mask=0 are not counted): (K,), or
    (levels, K) for `levels` > 1 codes per token (codes (B, ...) token-major, the last of each
    token's `levels` codes fastest, as residual VQ emits them)."""
    flat = codes.reshape(codes.shape[0], -1, levels)
    weights = jnp.ones(flat.shape, jnp.float32)
    if mask is not None:
        weights = weights * mask.reshape(-1, 1, 1).astype(jnp.float32)
    index = flat + codebook_size * jnp.arange(levels, dtype=flat.dtype)
    counts = jnp.zeros((levels * codebook_size,), jnp.float32).at[index.reshape(-1)].add(
        weights.reshape(-1))
    return counts if levels == 1 else counts.reshape(levels, codebook_size)


def perplexity(counts) -> float | jax.Array:
    """exp(entropy) of the code distribution: the effective number of codes in use (per-level
    histograms (levels, K): the mean over the levels)."""
    xp = jnp if isinstance(counts, jax.Array) else np
    p = counts / xp.maximum(counts.sum(axis=-1, keepdims=True), 1)
    entropy = -xp.sum(xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1)), 0), axis=-1)
    return xp.mean(xp.exp(entropy))


def usage(counts) -> float | jax.Array:
    """Fraction of codebook entries used at least once (per-level histograms: the mean)."""
    xp = jnp if isinstance(counts, jax.Array) else np
    return xp.mean((counts > 0).astype(xp.float32))


def dead_codes(counts) -> int | jax.Array:
    """Number of codebook entries never used (per-level histograms: summed over the levels)."""
    xp = jnp if isinstance(counts, jax.Array) else np
    return xp.sum(counts == 0)
