"""Tokenizer losses: each term is a function; a weights table composes them.

Reconstruction terms work on images in [0, 1]. Perceptual, GAN, entropy and semantic terms join
this table in later modules; a term whose weight is 0 is never computed.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp


def l2_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(recon.astype(jnp.float32) - target.astype(jnp.float32)))


def l1_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(recon.astype(jnp.float32) - target.astype(jnp.float32)))


# Terms computed from (reconstruction, target); model-provided terms (e.g. "quantizer") come
# from the model's aux outputs under "<name>_loss".
RECONSTRUCTION_TERMS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "l2": l2_loss,
    "l1": l1_loss,
}


def combine(weights: Mapping[str, float], recon: jax.Array, target: jax.Array,
            aux: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of the enabled terms. Returns (total, {term: unweighted value})."""
    terms: dict[str, jax.Array] = {}
    for name, weight in weights.items():
        if not weight:
            continue
        if name in RECONSTRUCTION_TERMS:
            terms[name] = RECONSTRUCTION_TERMS[name](recon, target)
        elif f"{name}_loss" in aux:
            terms[name] = aux[f"{name}_loss"]
        else:
            raise ValueError(f"Loss term {name!r} is neither a reconstruction term "
                             f"{sorted(RECONSTRUCTION_TERMS)} nor provided by the model "
                             f"({sorted(k[:-5] for k in aux if k.endswith('_loss'))}).")
    total = sum(weights[name] * value for name, value in terms.items())
    return jnp.asarray(total, jnp.float32), terms
