"""Per-image reconstruction metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(recon: jax.Array, target: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB of images in [0, max_value]; recon is clipped to the range first."""
    recon = jnp.clip(recon.astype(jnp.float32), 0.0, max_value)
    mse = jnp.mean(jnp.square(recon - target.astype(jnp.float32)), axis=tuple(range(1, recon.ndim)))
    return 10.0 * jnp.log10(max_value ** 2 / jnp.maximum(mse, 1e-10))
