"""Helpers shared by the quantizers. Quantizer math always runs in float32, whatever the
model's compute dtype: nearest-code decisions must not flip with the precision of the
surrounding network."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """PyTorch `F.normalize`: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def symmetric_uniform(scale: float):
    """Uniform(-scale, scale) initializer."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)
    return init


def entropy_terms(affinity: jax.Array, temperature: float, eps: float = 1e-5
                  ) -> tuple[jax.Array, jax.Array]:
    """(mean_tokens H(softmax(a / T)), H(mean_tokens softmax(a / T))) over a (tokens, K)
    affinity matrix: the per-sample entropy (low when each token is confident) and the batch
    entropy (high when the batch spreads over many codes), MAGVIT-v2's two entropy terms."""
    logits = affinity.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    sample_entropy = -jnp.mean(jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    avg = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg * jnp.log(avg + eps))
    return sample_entropy, avg_entropy


def entropy_loss(affinity: jax.Array, temperature: float, eps: float = 1e-5) -> jax.Array:
    """mean_tokens H(softmax(a / T)) - H(mean_tokens softmax(a / T)) over a (tokens, K) matrix."""
    sample_entropy, avg_entropy = entropy_terms(affinity, temperature, eps)
    return sample_entropy - avg_entropy


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """The value of z_q with the gradient of z (the straight-through estimator)."""
    return z + jax.lax.stop_gradient(z_q - z)


def rotate_onto(z: jax.Array, z_q: jax.Array, eps: float = 1e-6) -> jax.Array:
    """The rotation trick as GigaTok computes it (vectors on the last axis): with
    u = z/|z|, q = z_q/|z_q| and w = (u + q)/|u + q| (all without gradient),
    e' = e - 2 (e.w) w + 2 (e.u) q for e = z/|z|, scaled by |z_q| / |e| (no gradient).

    Because e is z/|z|, the gradient to z has no radial part. With l2-normalised latents (every
    GigaTok config) that is also what Fifty et al. 2024 give; without (`l2_norm=False`, which
    GigaTok's code allows) the paper's form, rotating z itself, would keep the radial part.
    tok1d follows GigaTok's code (the golden fixtures)."""
    sg = jax.lax.stop_gradient
    e = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    u = e / (jnp.linalg.norm(e, axis=-1, keepdims=True) + eps)
    q = z_q / (jnp.linalg.norm(z_q, axis=-1, keepdims=True) + eps)
    w = sg((u + q) / jnp.linalg.norm(u + q, axis=-1, keepdims=True))
    dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)  # noqa: E731
    rotated = e - 2.0 * dot(e, w) * w + 2.0 * dot(e, sg(u)) * sg(q)
    scale = sg(jnp.linalg.norm(z_q, axis=-1, keepdims=True)
               / (jnp.linalg.norm(e, axis=-1, keepdims=True) + eps))
    return rotated * scale
