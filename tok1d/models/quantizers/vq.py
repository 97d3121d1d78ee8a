"""Nearest-neighbour vector quantization (optionally l2-normalised, with GigaTok's rotation
trick) and SimVQ (the codebook is a learned linear map of a frozen one)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.transformer import logical
from tok1d.models.quantizers.common import (HIGHEST, entropy_loss, l2_normalize, rotate_onto,
                                            straight_through, symmetric_uniform)

Dtype = Any


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

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    codes_per_token = 1

    def __call__(self, z: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self.quantize(z)[:2]

    def quantize(self, z: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """(straight-through output, aux, the (tokens, K) squared distances)."""
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
        z_st = rotate_onto(z, z_q) if self.rotation_trick else straight_through(z, z_q)
        aux = dict(codes=codes.reshape(z.shape[:-1]), commitment_loss=commitment,
                   codebook_loss=codebook_loss, quantizer_loss=commitment + codebook_loss,
                   entropy_loss=entropy_loss(-dist, self.entropy_temperature))
        return z_st, aux, dist

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Code indices (any shape) -> code vectors (shape + (code_dim,)), float32."""
        return jnp.take(self.codebook(), codes, axis=0)


class SimVQ(VectorQuantizer):
    """SimVQ (Zhu et al. 2024; GigaTok's `simvq` option with `codebook_transform="linear"`):
    the codebook is a learned linear map W of a frozen base codebook, rows e_k W^T (then
    l2-normalised with `l2_norm`), so every code moves with W whichever codes the batch picks.
    Everything else is `VectorQuantizer`'s. Params: `embedding` (the base; no gradient with
    `freeze_codebook`, GigaTok's default leaves it trainable) and `codebook_transform`
    (code_dim x code_dim, no bias). A frozen base still gets weight decay from an optimizer that
    decays every matrix: add "embedding" to `optim.no_decay_names` (TiTok's rule does)."""

    freeze_codebook: bool = True

    def setup(self):
        super().setup()
        self.transform = self.param(
            "codebook_transform", logical(nn.initializers.lecun_normal(), (None, "code_dim")),
            (self.code_dim, self.code_dim), self.param_dtype)

    def codebook(self) -> jax.Array:
        e = self.embedding.astype(jnp.float32)
        if self.freeze_codebook:
            e = jax.lax.stop_gradient(e)
        e = jnp.dot(e, self.transform.astype(jnp.float32), precision=HIGHEST)
        return l2_normalize(e) if self.l2_norm else e
