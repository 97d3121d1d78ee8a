"""Binary quantizers: one bit per channel, an implicit codebook of 2**code_dim codes.

LFQ (lookup-free quantization, MAGVIT-v2 / Open-MAGVIT2; GigaTok's LFQ option):
    q = sign(z) in {-1, 1}^d (z > 0 -> +1), code = sum_c [q_c > 0] 2**c (channel 0 least
    significant), straight-through output.
    commitment_loss = commitment_cost * mean((z - sg(q))**2)
    entropy over the 2**d codes with affinity 2 z . c_k (a distance up to a constant) at
    `entropy_temperature`: per_sample_entropy (mean token entropy, minimised) and
    codebook_entropy (entropy of the batch mean, maximised);
    entropy_loss = sample_weight * per_sample - batch_weight * codebook (weighted by
    `losses.entropy`, GigaTok's `entropy_loss_ratio`). The full 2**d softmax is computed, as
    upstream: keep d small (<= ~14) or the entropy term's memory grows with 2**d per token.

BSQ (binary spherical quantization, Zhao et al. 2024):
    u = z / |z|, q = sign(u) / sqrt(d) (on the unit sphere), same codes as LFQ,
    straight-through output q with gradient of u.
    commitment_loss = commitment_cost * mean((u - sg(q))**2)
    entropy terms factorised over the bits (BSQ's approximation; exact for the per-sample
    term): p_c = sigmoid(4 u_c / (sqrt(d) T)) the soft probability of bit c being +1
    (softmax over the two values +-1/sqrt(d) of the affinity 2 u_c q_c / T), per_sample =
    mean_tokens sum_c H(p_c), codebook = sum_c H(mean_tokens p_c);
    entropy_loss = sample_weight * per_sample - batch_weight * codebook.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.models.quantizers.common import HIGHEST, entropy_terms, l2_normalize, straight_through


def bits_to_codes(bits: jax.Array) -> jax.Array:
    """Bool bits (..., d) -> int32 codes, bit c worth 2**c."""
    weights = 2 ** jnp.arange(bits.shape[-1], dtype=jnp.int32)
    return jnp.sum(bits.astype(jnp.int32) * weights, axis=-1)


def codes_to_signs(codes: jax.Array, num_bits: int) -> jax.Array:
    """Int codes (...) -> (..., num_bits) float32 values in {-1, 1}."""
    bits = (codes[..., None] >> jnp.arange(num_bits, dtype=jnp.int32)) & 1
    return bits.astype(jnp.float32) * 2.0 - 1.0


def _binary_entropy(p: jax.Array, eps: float) -> jax.Array:
    return -(p * jnp.log(p + eps) + (1.0 - p) * jnp.log(1.0 - p + eps))


class _Binary(nn.Module):
    """The fields shared by LFQ and BSQ: `code_dim` bits per vector, 2**code_dim codes."""

    code_dim: int = 10
    commitment_cost: float = 0.25
    entropy_temperature: float = 0.01
    sample_weight: float = 1.0
    batch_weight: float = 1.0

    @property
    def num_codes(self) -> int:
        return 2 ** self.code_dim

    codes_per_token = 1

    def check(self, z: jax.Array) -> None:
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"{type(self).__name__} expects vectors of size {self.code_dim}, "
                             f"got {z.shape}.")

    def outputs(self, z, q, codes, commitment, sample, batch):
        return straight_through(z, q), dict(
            codes=codes, commitment_loss=commitment, quantizer_loss=commitment,
            per_sample_entropy_loss=sample, codebook_entropy_loss=batch,
            entropy_loss=self.sample_weight * sample - self.batch_weight * batch)


class LFQ(_Binary):
    """Lookup-free quantization (module docstring). aux: codes, commitment_loss,
    quantizer_loss (= commitment), per_sample_entropy_loss, codebook_entropy_loss,
    entropy_loss."""

    def __call__(self, z: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        self.check(z)
        z = z.astype(jnp.float32)
        q = jnp.where(z > 0, 1.0, -1.0)
        codes = bits_to_codes(z > 0)
        commitment = self.commitment_cost * jnp.mean(jnp.square(z - jax.lax.stop_gradient(q)))
        codebook = codes_to_signs(jnp.arange(self.num_codes, dtype=jnp.int32), self.code_dim)
        affinity = 2.0 * jnp.dot(z.reshape(-1, self.code_dim), codebook.T, precision=HIGHEST)
        sample, batch = entropy_terms(affinity, self.entropy_temperature)
        return self.outputs(z, q, codes, commitment, sample, batch)

    def lookup(self, codes: jax.Array) -> jax.Array:
        return codes_to_signs(codes, self.code_dim)


class BSQ(_Binary):
    """Binary spherical quantization (module docstring); aux as `LFQ`."""

    entropy_temperature: float = 1.0

    def __call__(self, z: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        self.check(z)
        scale = self.code_dim ** -0.5
        u = l2_normalize(z.astype(jnp.float32))
        q = jnp.where(u > 0, scale, -scale)
        codes = bits_to_codes(u > 0)
        commitment = self.commitment_cost * jnp.mean(jnp.square(u - jax.lax.stop_gradient(q)))
        p = jax.nn.sigmoid(4.0 * scale * u.reshape(-1, self.code_dim) / self.entropy_temperature)
        sample = jnp.mean(jnp.sum(_binary_entropy(p, 1e-5), axis=-1))
        batch = jnp.sum(_binary_entropy(jnp.mean(p, axis=0), 1e-5))
        return self.outputs(u, q, codes, commitment, sample, batch)

    def lookup(self, codes: jax.Array) -> jax.Array:
        return codes_to_signs(codes, self.code_dim) * self.code_dim ** -0.5
