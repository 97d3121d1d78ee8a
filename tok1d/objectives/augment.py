"""Differentiable augmentation (DiffAugment) for discriminator inputs, as GigaTok's DINO
discriminator recipe applies it (`tokenizer/tokenizer_image/diffaug.py`, `DiffAug(prob=1.0,
cutout=0.2)`, itself StyleGAN-T's `training/diffaug.py`).

`diff_augment(key, images)` takes NHWC float images (GigaTok: [-1, 1]) and returns augmented
images of the same shape, float32. Semantics of one call (one official `DiffAug.aug`):

  * three batch-wide coin flips u_t, u_c, u_k ~ U[0, 1): translation runs when u_t <= prob,
    colour when u_c <= prob, cutout when u_k <= prob and prob > 0 (a negative `prob` means
    |prob| without cutout, as upstream). prob = 1 (the recipe) runs all three every call;
    prob < 1e-6 returns the input unchanged.
  * seven per-image uniforms r_0..r_6 ~ U[0, 1) parameterise the operations:
      translation  shift by t_h = floor(r_0 (2 d_h + 1)) - d_h rows and t_w likewise (r_1)
                   columns, d = round(0.125 * size) (Python rounding); pixels shifted in from
                   outside are 0 (the official zero-pads by one pixel and clamps the source index)
      colour       x += r_2 - 0.5 (brightness);
                   x = (x - mean_c) * 2 r_3 + mean_c, mean over channels (saturation);
                   x = (x - mean) * (r_4 + 0.5) + mean, mean over C, H, W (contrast)
      cutout       a c_h x c_w rectangle, c = round(cutout * size), centred at
                   floor(r_5 (H + 1 - c_h mod 2)) - c_h // 2 .. (likewise r_6 for columns), cut
                   to the image, is set to 0 (about cutout^2 = 4% of the area for cutout 0.2)
    in that order. Operations that are skipped still consume their uniforms (as upstream).

The official warm-up blur (`warmup_blur_schedule > 0`) is not ported: GigaTok's VQ loss always
passes 0.

Randomness: the draws come from `key` (`jax.random.uniform`), so a fixed key gives a fixed
result and the PyTorch RNG stream is not reproduced; `diff_augment_with_uniforms` takes the
uniforms explicitly (used to check parity with the official code on identical draws).
Gradients flow to `images` (every operation is a gather, an affine map or a mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TRANSLATION_RATIO = 0.125


def _shift(x: jax.Array, shift: jax.Array, axis: int) -> jax.Array:
    """out[b, i] = x[b, i + shift[b]] along `axis` (1 or 2 of NHWC), 0 where that is outside."""
    n = x.shape[axis]
    src = jnp.arange(n)[None, :] + shift[:, None]                     # (B, n)
    valid = (src >= 0) & (src < n)
    idx_shape = [x.shape[0], 1, 1, 1]
    idx_shape[axis] = n
    idx = jnp.clip(src, 0, n - 1).reshape(idx_shape)
    out = jnp.take_along_axis(x, jnp.broadcast_to(idx, x.shape[:axis] + (n,) + x.shape[axis + 1:]),
                              axis=axis)
    return out * valid.reshape(idx_shape).astype(x.dtype)


def _cut_interval(r: jax.Array, size: int, cut: int) -> tuple[jax.Array, jax.Array]:
    """Start (inclusive) and end (exclusive) of the cutout along one axis, per image."""
    offset = jnp.floor(r * jnp.float32(size + (1 - cut % 2))).astype(jnp.int32)
    start = offset - cut // 2
    return start, start + cut


def diff_augment_with_uniforms(images: jax.Array, flags: jax.Array, rand01: jax.Array,
                               prob: float = 1.0, cutout: float = 0.2) -> jax.Array:
    """DiffAugment with explicit uniforms: `flags` (3,) for translation / colour / cutout and
    `rand01` (7, B) per-image parameters (see the module docstring)."""
    x = images.astype(jnp.float32)
    p = abs(prob)
    if p < 1e-6:
        return x
    b, h, w, _ = x.shape
    rand01 = rand01.astype(jnp.float32)
    if rand01.shape != (7, b) or flags.shape != (3,):
        raise ValueError(f"expected flags (3,) and rand01 (7, {b}); got {flags.shape}, "
                         f"{rand01.shape}")
    do_trans, do_color, do_cut = (flags[i] <= p for i in range(3))

    # translation
    dh, dw = round(h * TRANSLATION_RATIO), round(w * TRANSLATION_RATIO)
    th = jnp.floor(rand01[0] * jnp.float32(2 * dh + 1)).astype(jnp.int32) - dh
    tw = jnp.floor(rand01[1] * jnp.float32(2 * dw + 1)).astype(jnp.int32) - dw
    x = jnp.where(do_trans, _shift(_shift(x, th, 1), tw, 2), x)

    # colour: brightness, saturation, contrast
    per_image = lambda r: r[:, None, None, None]  # noqa: E731
    y = x + per_image(rand01[2] - 0.5)
    mean = jnp.mean(y, axis=-1, keepdims=True)
    y = (y - mean) * per_image(rand01[3] * 2.0) + mean
    mean = jnp.mean(y, axis=(1, 2, 3), keepdims=True)
    y = (y - mean) * per_image(rand01[4] + 0.5) + mean
    x = jnp.where(do_color, y, x)

    # cutout
    if prob > 0:
        ch, cw = round(h * cutout), round(w * cutout)
        h0, h1 = _cut_interval(rand01[5], h, ch)
        w0, w1 = _cut_interval(rand01[6], w, cw)
        rows = jnp.arange(h)[None, :]
        cols = jnp.arange(w)[None, :]
        in_rows = (rows >= h0[:, None]) & (rows < h1[:, None])           # (B, H)
        in_cols = (cols >= w0[:, None]) & (cols < w1[:, None])           # (B, W)
        keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
        x = jnp.where(do_cut, x * keep[..., None].astype(x.dtype), x)
    return x


def diff_augment(key: jax.Array, images: jax.Array, prob: float = 1.0,
                 cutout: float = 0.2) -> jax.Array:
    """DiffAugment of NHWC `images` with the randomness of `key` (see the module docstring).
    GigaTok's DINO-discriminator recipe: prob=1.0, cutout=0.2, applied independently (separate
    keys) to the real and the fake batch of every discriminator call."""
    flags, rand01 = draw_uniforms(key, images.shape[0])
    return diff_augment_with_uniforms(images, flags, rand01, prob=prob, cutout=cutout)


def draw_uniforms(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """The draws of one DiffAugment call from `key`: (flags (3,), rand01 (7, batch)), U[0, 1)
    float32 (the official `torch.rand(3)` and `torch.rand(7, B, 1, 1)`). One draw split in two:
    each random call is a threefry call of its own, a while loop of a few dozen kernels in the
    compiled step on CPU."""
    u = jax.random.uniform(key, (3 + 7 * batch,), jnp.float32)
    return u[:3], u[3:].reshape(7, batch)
