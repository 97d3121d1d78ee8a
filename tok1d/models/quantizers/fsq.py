"""Finite scalar quantization (Mentzer et al. 2023; GigaTok's FSQ option, Cosmos, FlexTok): no
codebook; each channel is bounded and rounded to one of `levels[c]` values, and the implicit
codebook is the product of the channels' levels.

    bound(z)_c = tanh(z_c + atanh(o_c / h_c)) * h_c - o_c,  h_c = (L_c - 1)(1 + 1e-3) / 2,
                 o_c = 0.5 for even L_c else 0
    q_c        = round_ste(bound(z)_c) / (L_c // 2)        (values in [-1, 1])
    code       = sum_c (q_c (L_c // 2) + L_c // 2) * prod_{c' < c} L_c'   (channel 0 varies fastest)

The code is one index in [0, prod L): a generator reads it as one vocabulary.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.models.quantizers.common import straight_through


class FSQ(nn.Module):
    """Finite scalar quantization over `levels` (one entry per channel; the input has
    len(levels) channels). aux: codes, quantizer_loss (0: FSQ has no auxiliary loss)."""

    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    eps: float = 1e-3

    @property
    def num_codes(self) -> int:
        return int(math.prod(self.levels))

    @property
    def code_dim(self) -> int:
        return len(self.levels)

    codes_per_token = 1

    def _consts(self):
        levels = np.asarray(self.levels, np.int64)
        basis = np.concatenate([[1], np.cumprod(levels[:-1])])
        return (jnp.asarray(levels, jnp.float32), jnp.asarray(basis, jnp.int32),
                jnp.asarray(levels // 2, jnp.float32))

    def bound(self, z: jax.Array) -> jax.Array:
        levels, _, _ = self._consts()
        half = (levels - 1) * (1 + self.eps) / 2
        offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
        return jnp.tanh(z + jnp.arctanh(offset / half)) * half - offset

    def __call__(self, z: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"FSQ with levels {self.levels} expects vectors of size "
                             f"{self.code_dim}, got {z.shape}.")
        _, basis, half_width = self._consts()
        bounded = self.bound(z.astype(jnp.float32))
        rounded = straight_through(bounded, jnp.round(bounded))
        z_q = rounded / half_width
        digits = jnp.round(jax.lax.stop_gradient(rounded) + half_width).astype(jnp.int32)
        codes = jnp.sum(digits * basis, axis=-1)
        return z_q, dict(codes=codes, quantizer_loss=jnp.zeros((), jnp.float32))

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codes (any shape) -> values (shape + (len(levels),)) in [-1, 1], float32."""
        levels, basis, half_width = self._consts()
        digits = (codes[..., None] // basis) % levels.astype(jnp.int32)
        return (digits.astype(jnp.float32) - half_width) / half_width
