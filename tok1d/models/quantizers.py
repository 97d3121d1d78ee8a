"""Quantizers shared by the tokenizers: vector quantization (optionally l2-normalised) and the
diagonal-Gaussian (KL / VAE) bottleneck.

Quantizer math always runs in float32, whatever the model's compute dtype: nearest-code
decisions must not flip with the precision of the surrounding network.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.transformer import logical

Dtype = Any
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


def entropy_loss(affinity: jax.Array, temperature: float, eps: float = 1e-5) -> jax.Array:
    """mean_tokens H(softmax(a / T)) - H(mean_tokens softmax(a / T)) over a (tokens, K) matrix."""
    logits = affinity.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    sample_entropy = -jnp.mean(jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    avg = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg * jnp.log(avg + eps))
    return sample_entropy - avg_entropy


def rotate_onto(z: jax.Array, z_q: jax.Array, eps: float = 1e-6) -> jax.Array:
    """The rotation trick as GigaTok computes it (vectors on the last axis): with
    u = z/|z|, q = z_q/|z_q| and w = (u + q)/|u + q| (all without gradient),
    e' = e - 2 (e.w) w + 2 (e.u) q for e = z/|z|, scaled by |z_q| / |e| (no gradient)."""
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


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantization with the straight-through estimator.

    Returns the straight-through quantized vectors and a dict with
      codes             int32 indices, shape = inputs.shape[:-1]
      commitment_loss   commitment_cost * mean((sg[z_q] - z)**2)
      codebook_loss     mean((z_q - sg[z])**2)
      quantizer_loss    their sum
      entropy_loss      mean per-token entropy of softmax(-distance / entropy_temperature)
                        minus the entropy of its batch mean (LlamaGen / GigaTok form; low when
                        each token is confident and the batch uses many codes). Only computed
                        when a loss uses it (XLA drops it otherwise).
    With `l2_norm`, both the inputs and the codebook rows are l2-normalised before the distance
    (the losses are then computed on the normalised vectors), as in TiTok / ViT-VQGAN.
    With `rotation_trick` (GigaTok), the output is the input rotated onto its code and rescaled
    (Fifty et al. 2024): the same value as the code up to float rounding, but the gradient
    reaching the encoder is the incoming gradient rotated the same way instead of copied.
    """

    codebook_size: int
    code_dim: int
    l2_norm: bool = True
    commitment_cost: float = 0.25
    entropy_temperature: float = 0.01
    rotation_trick: bool = False
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", logical(symmetric_uniform(1.0 / self.codebook_size),
                                 ("codebook", "code_dim")),
            (self.codebook_size, self.code_dim), self.param_dtype)

    def codebook(self) -> jax.Array:
        e = self.embedding.astype(jnp.float32)
        return l2_normalize(e) if self.l2_norm else e

    def __call__(self, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"Quantizer expects vectors of size {self.code_dim}, got {z.shape}.")
        z = z.astype(jnp.float32)
        if self.l2_norm:
            z = l2_normalize(z)
        e = self.codebook()
        flat = z.reshape(-1, self.code_dim)
        dist = (jnp.sum(flat * flat, axis=1, keepdims=True) + jnp.sum(e * e, axis=1)[None]
                - 2.0 * jnp.dot(flat, e.T, precision=HIGHEST))
        codes = jnp.argmin(dist, axis=1).astype(jnp.int32)
        z_q = jnp.take(e, codes, axis=0).reshape(z.shape)
        commitment = self.commitment_cost * jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
        codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
        z_st = rotate_onto(z, z_q) if self.rotation_trick else z + jax.lax.stop_gradient(z_q - z)
        aux = dict(codes=codes.reshape(z.shape[:-1]), commitment_loss=commitment,
                   codebook_loss=codebook_loss, quantizer_loss=commitment + codebook_loss,
                   entropy_loss=entropy_loss(-dist, self.entropy_temperature))
        return z_st, aux

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Code indices (any shape) -> code vectors (shape + (code_dim,)), float32."""
        return jnp.take(self.codebook(), codes, axis=0)


class DiagonalGaussian(nn.Module):
    """KL bottleneck (TiTok's VAE variants): moments (..., 2C) -> latents (..., C).

    The first C channels are the mean, the last C the log-variance (clamped to [-30, 20]).
    With `sample=True` the latents are mean + std * N(0, 1) (rng stream "sample"), else the
    mean. aux: mean, logvar, std and `kl_loss` = 0.5 * sum(mean^2 + var - 1 - logvar) over the
    channels and tokens, averaged over the batch (the official per-sample KL sums channels only;
    its training loss then sums tokens and divides by the batch size, as here).
    """

    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __call__(self, moments: jax.Array, sample: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        moments = moments.astype(jnp.float32)
        if moments.shape[-1] % 2:
            raise ValueError(f"Gaussian moments need an even channel count, got {moments.shape}.")
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, self.logvar_min, self.logvar_max)
        std = jnp.exp(0.5 * logvar)
        z = mean
        if sample:
            z = mean + std * jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
        kl_per_token = 0.5 * jnp.sum(mean * mean + std * std - 1.0 - logvar, axis=-1)
        aux = dict(mean=mean, logvar=logvar, std=std, kl_per_token=kl_per_token,
                   kl_loss=jnp.sum(kl_per_token) / moments.shape[0])
        return z, aux
