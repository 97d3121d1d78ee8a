"""Residual VQ (RQ-VAE, Lee et al. 2022): `depth` codebooks quantize the input, then what each
leaves over. r_0 = z; q_d = nearest code of level d to r_{d-1}; r_d = r_{d-1} - sg(q_d);
output z + sg(sum_d q_d - z). Codes (..., depth): a token's codes from coarse to fine.
quantizer_loss is the sum over levels of each level's codebook + commitment loss (on its own
residual); entropy_loss the mean of the levels'. A generator reads the codes flattened,
token-major ((t0, d0), (t0, d1), ..., (t1, d0), ...), over one vocabulary of `codebook_size`
(the tokenizer's `encode` returns them so: num_tokens = tokens x depth).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.models.quantizers.common import straight_through
from tok1d.models.quantizers.vq import VectorQuantizer

Dtype = Any


class ResidualVQ(nn.Module):
    """Residual vector quantization with `depth` levels named level_{d}, each a
    `VectorQuantizer` of `codebook_size` x `code_dim` (not l2-normalised by default: residuals
    shrink)."""

    codebook_size: int
    code_dim: int
    depth: int = 4
    l2_norm: bool = False
    commitment_cost: float = 0.25
    entropy_temperature: float = 0.01
    param_dtype: Dtype = jnp.float32

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    @property
    def codes_per_token(self) -> int:
        return self.depth

    def setup(self):
        self.levels = [VectorQuantizer(self.codebook_size, self.code_dim, l2_norm=self.l2_norm,
                                       commitment_cost=self.commitment_cost,
                                       entropy_temperature=self.entropy_temperature,
                                       param_dtype=self.param_dtype, name=f"level_{d}")
                       for d in range(self.depth)]

    def __call__(self, z: jax.Array, train: bool = False, depth: int | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`depth` (default all) quantizes with the first levels only (codes (..., depth))."""
        z = z.astype(jnp.float32)
        residual, total, codes, auxes = z, jnp.zeros_like(z), [], []
        for level in self.levels[:depth or self.depth]:
            _, aux = level(residual)
            q = level.lookup(aux["codes"])
            residual = residual - jax.lax.stop_gradient(q)
            total = total + q
            codes.append(aux["codes"])
            auxes.append(aux)
        mean = lambda k: sum(a[k] for a in auxes) / len(auxes)  # noqa: E731
        add = lambda k: sum(a[k] for a in auxes)  # noqa: E731
        return straight_through(z, total), dict(
            codes=jnp.stack(codes, axis=-1), commitment_loss=add("commitment_loss"),
            codebook_loss=add("codebook_loss"), quantizer_loss=add("quantizer_loss"),
            entropy_loss=mean("entropy_loss"))

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Codes (..., d <= depth) -> the sum of the first d levels' vectors."""
        return sum(self.levels[d].lookup(codes[..., d]) for d in range(codes.shape[-1]))
