"""The diagonal-Gaussian (KL / VAE) bottleneck: a continuous quantizer (no codes)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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

    num_codes = None      # continuous: no codes
    codes_per_token = 1

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
