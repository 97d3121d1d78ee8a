"""Per-image reconstruction metrics: PSNR and SSIM.

SSIM is the standard definition (Wang et al. 2004) as `tf.image.ssim` and scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=max_value, channel_axis=-1)` compute it: local means, variances and the covariance
are taken under a normalised 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,

  SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
  C1 = (K1 max_value)^2, C2 = (K2 max_value)^2, s^2 = E[x^2] - E[x]^2 (population moments),

evaluated only where the window lies inside the image ('valid'), and averaged over those
positions and the channels. The filtering is separable (two 1-D passes of shifted, weighted
sums in float32: element-wise arithmetic, so no reduced-precision conv / matmul path on an
accelerator). Each image is first shifted by its own per-channel mean, which leaves SSIM
unchanged mathematically but keeps the float32 variances E[x^2] - E[x]^2 from cancelling
(scikit-image works in float64; agreement is ~1e-6).

`window="box"` is scikit-image's default instead (`structural_similarity(x, y, data_range=L,
channel_axis=-1)` with nothing else set): a uniform 7x7 window and the sample (co)variances,
i.e. the moments above times 49 / 48. `data_range` is the L of C1 and C2 (default max_value).

Conventions of whole evaluations (`pixel_metrics`, evaluation.pixel_metrics):
  "standard"  PSNR and the Gaussian SSIM above of the reconstructions as they are (clipped);
  "gigatok"   GigaTok's tokenizer/tokenizer_image/reconstruction_ddp.py: the reconstructions
              saved as 8-bit images first (uint8(clamp(127.5 x + 128, 0, 255)) of x in
              [-1, 1], `to_8bit`), then scikit-image's PSNR (range 1) and its default SSIM
              called with data_range=2.0 on [0, 1] images (the box window; C1, C2 four times
              the range-1 ones): the numbers of its tables. Its LPIPS (`ImageMetrics`) reads
              the decoder output unclipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
BOX_WINDOW = 7  # scikit-image's default win_size
PIXEL_METRICS = ("standard", "gigatok")


def psnr(recon: jax.Array, target: jax.Array, max_value: float = 1.0) -> jax.Array:
    """Per-image PSNR in dB of images in [0, max_value]; recon is clipped to the range first."""
    recon = jnp.clip(recon.astype(jnp.float32), 0.0, max_value)
    mse = jnp.mean(jnp.square(recon - target.astype(jnp.float32)), axis=tuple(range(1, recon.ndim)))
    return 10.0 * jnp.log10(max_value ** 2 / jnp.maximum(mse, 1e-10))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian taps (float64), centred on the middle tap."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-0.5 * np.square(x / sigma))
    return w / w.sum()


def _filter_valid(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of (B, H, W, C) over H and W with the 1-D `taps`."""
    n = len(taps)
    h, w = x.shape[1] - n + 1, x.shape[2] - n + 1
    taps = [np.float32(t) for t in taps]
    y = sum(taps[i] * x[:, i:i + h] for i in range(n))
    return sum(taps[i] * y[:, :, i:i + w] for i in range(n))


def ssim(recon: jax.Array, target: jax.Array, max_value: float = 1.0, *,
         window: str = "gaussian", data_range: float | None = None) -> jax.Array:
    """Per-image SSIM (B,) of NHWC images in [0, max_value] (any number of channels, e.g. RGB
    or grey); recon is clipped to the range first, as in `psnr`. `window`: "gaussian" (11x11,
    sigma 1.5, population moments) or "box" (scikit-image's default: 7x7, sample moments);
    `data_range`: L of C1 = (K1 L)^2, C2 = (K2 L)^2 (default max_value). Jit-able; float32."""
    if window not in ("gaussian", "box"):
        raise ValueError(f"SSIM window {window!r} is not 'gaussian' or 'box'.")
    taps = gaussian_window() if window == "gaussian" else np.full(BOX_WINDOW, 1.0 / BOX_WINDOW)
    size = len(taps)
    if recon.shape != target.shape:
        raise ValueError(f"SSIM needs images of one shape, got {recon.shape} and {target.shape}.")
    if recon.ndim != 4:
        raise ValueError(f"SSIM needs (batch, height, width, channels) images, got shape "
                         f"{recon.shape}.")
    if min(recon.shape[1], recon.shape[2]) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels (its "
                         f"{window} window), got {recon.shape[1]}x{recon.shape[2]}.")
    x = jnp.clip(recon.astype(jnp.float32), 0.0, max_value)
    y = target.astype(jnp.float32)
    # Shift each image by its per-channel mean: covariances are unchanged, the means are
    # restored below, and the float32 moments lose far less to cancellation.
    x_mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    y_mean = jnp.mean(y, axis=(1, 2), keepdims=True)
    x, y = x - x_mean, y - y_mean
    channels = x.shape[-1]
    stats = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
    mu_x, mu_y, xx, yy, xy = (stats[..., i * channels:(i + 1) * channels] for i in range(5))
    # scikit-image's sample moments: N / (N - 1) over the N = size^2 window pixels
    norm = 1.0 if window == "gaussian" else size * size / (size * size - 1.0)
    var_x = norm * (xx - mu_x * mu_x)
    var_y = norm * (yy - mu_y * mu_y)
    cov = norm * (xy - mu_x * mu_y)
    mu_x, mu_y = mu_x + x_mean, mu_y + y_mean
    data_range = max_value if data_range is None else data_range
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))


def to_8bit(images: jax.Array) -> jax.Array:
    """[0, 1] images y as GigaTok saves its reconstructions, back in [0, 1]: the decoder's
    x = 2 y - 1, then uint8(clamp(127.5 x + 128, 0, 255)) (the cast truncates), in that
    float32 arithmetic (floor(255 y + 0.5) would move ~3e-5 of the values at a level's
    boundary by one level)."""
    x = 2.0 * images.astype(jnp.float32) - 1.0
    return jnp.floor(jnp.clip(127.5 * x + 128.0, 0.0, 255.0)) / 255.0


def pixel_metrics(recon: jax.Array, target: jax.Array, convention: str = "standard"
                  ) -> dict[str, jax.Array]:
    """Per-image {"psnr", "ssim"} (B,) of [0, 1] reconstructions against their inputs under one
    of PIXEL_METRICS (the module docstring)."""
    if convention == "standard":
        return {"psnr": psnr(recon, target), "ssim": ssim(recon, target)}
    if convention == "gigatok":
        recon = to_8bit(recon)
        return {"psnr": psnr(recon, target),
                "ssim": ssim(recon, target, window="box", data_range=2.0)}
    raise ValueError(f"Unknown pixel-metric convention {convention!r}; expected one of "
                     f"{PIXEL_METRICS}.")
