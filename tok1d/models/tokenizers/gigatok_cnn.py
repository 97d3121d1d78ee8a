"""The convolutional halves of the GigaTok hybrid tokenizer (SilentView/GigaTok `blocks.Encoder`
and `blocks.Decoder`), NHWC.

    images (B, H, W, 3) in [-1, 1]
      -> GigaTokCNNEncoder -> "spatial" map (B, H/f, W/f, z_channels), f = 2 ** (L - 1)
      ... (transformer encoder, quantiser, transformer decoder: elsewhere) ...
    rec_spatial (B, h, w, z_channels)
      -> GigaTokCNNDecoder -> pixels (B, h*f, w*f, 3), not clamped

with L = len(ch_mult). Behaviour of the official code this port reproduces:

* GroupNorm(32 groups, eps 1e-6) + swish everywhere; all convolutions have a bias;
* residual blocks: GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus the block input, which
  goes through a 1x1 `nin_shortcut` when the channel count changes (the standard VQGAN block, not
  MaskGIT's);
* encoder: conv_in 3x3, per level `num_res_blocks` blocks then (all levels but the last) a
  down-sampler = zero-pad right/bottom by one, 3x3 conv stride 2 without padding; two mid blocks;
  GN -> swish -> conv_out 3x3 (C_last -> z);
* decoder: conv_in 3x3 (z -> C_last), two mid blocks, then L levels from the deepest
  (`conv_blocks_0`) to the finest (`conv_blocks_{L-1}`), each starting with an adaptive GroupNorm
  (`adaptive_gn`), then `num_res_blocks + 1` blocks, then (all levels but the last) an
  up-sampler: depth-to-space (`d2s_up`: 3x3 conv C -> 4C, DCR order) or nearest x2 + 3x3 conv;
  GN -> swish -> conv_out 3x3 (-> 3);
* AdaGN: GroupNorm without affine, then gamma(sigma) * h + beta(mu), where mu and sigma are the
  per-channel spatial mean and sqrt(unbiased variance + 1e-6) of the decoder *input*, and gamma,
  beta are Linear(z -> C);
* no attention blocks (`use_attn` is false in every released config; True is rejected).

Parameter layout (Flax names; the PyTorch key under `encoder.` / `decoder.` in brackets):

    encoder/conv_in/{kernel,bias}                                  [conv_in]
    encoder/conv_blocks_{i}/res_{j}/{norm1,norm2}/{scale,bias}     [conv_blocks.{i}.res.{j}.norm*]
    encoder/conv_blocks_{i}/res_{j}/{conv1,conv2,nin_shortcut}/{kernel,bias}
    encoder/conv_blocks_{i}/downsample/conv/{kernel,bias}          [conv_blocks.{i}.downsample.conv]
    encoder/mid_{j}/...                                            [mid.{j}]
    encoder/norm_out/{scale,bias}, encoder/conv_out/{kernel,bias}
    decoder/conv_in, decoder/mid_{j}, decoder/norm_out, decoder/conv_out   (as above)
    decoder/adaptive_{i}/{gamma,beta}/{kernel (z, C), bias}        [adaptive.{i}.{gamma,beta}]
    decoder/conv_blocks_{i}/res_{j}/...                            [conv_blocks.{i}.res.{j}]
    decoder/conv_blocks_{i}/upsample/conv1/{kernel,bias}  (d2s)    [conv_blocks.{i}.upsample.conv1]
    decoder/conv_blocks_{i}/upsample/conv/{kernel,bias}   (nearest)[conv_blocks.{i}.upsample.conv]

Hooks: with `mutable=["intermediates"]` every residual block, AdaGN and up-sampler sows its
output as `output`, e.g. `intermediates/encoder/mid_1/output`, `intermediates/decoder/mid_1/output`,
`intermediates/decoder/adaptive_0/output`, `intermediates/decoder/conv_blocks_0/upsample/output`
(the official module names `encoder.mid.1`, `decoder.adaptive.0`, ...).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.cnn import TORCH_CONV_INIT, ResnetBlock
from tok1d.layers.cnn import conv as _conv, group_norm as _group_norm
from tok1d.layers.transformer import logical, maybe_remat

Dtype = Any
PrecisionLike = Any

# The released configs (every GigaTok tokenizer): `ch` 128 is a hard-coded constructor default.
GIGATOK_CNN_256 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256)

def depth_to_space_dcr(x: jax.Array, block: int = 2) -> jax.Array:
    """(B, H, W, b*b*C) -> (B, b*H, b*W, C) in DCR order: channel (i*b + j)*C + c of cell (h, w)
    becomes pixel (b*h + i, b*w + j), channel c (the official `depth_to_space`, not PyTorch's
    CRD `pixel_shuffle`)."""
    b, h, w, c = x.shape
    out_c = c // (block * block)
    x = x.reshape(b, h, w, block, block, out_c)          # (B, H, W, i, j, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)                    # (B, H, i, W, j, C)
    return x.reshape(b, h * block, w * block, out_c)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    channels: int
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self.channels, 3, name="conv", stride=2, padding=((0, 1), (0, 1)),
                     precision=self.precision, dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
    """Doubles the resolution keeping the channel count: `d2s` = 3x3 conv C -> 4C (`conv1`) then
    depth-to-space (DCR); otherwise nearest x2 then a 3x3 conv (`conv`)."""

    channels: int
    d2s: bool = True
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.d2s:
            x = depth_to_space_dcr(_conv(4 * self.channels, 3, name="conv1", **kw)(x), 2)
        else:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(self.channels, 3, name="conv", **kw)(x)
        self.sow("intermediates", "output", x)
        return x


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm (no affine) modulated by the statistics of a style map:
    gamma(sigma) * GN(x) + beta(mu), mu / sigma = per-channel spatial mean / sqrt(unbiased var +
    eps) of `style` (B, h, w, z)."""

    channels: int
    epsilon: float = 1e-6
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(  # noqa: E731
            self.channels, precision=self.precision, dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(TORCH_CONV_INIT, ("conv_in", "conv_out")),
            bias_init=logical(nn.initializers.zeros, ("conv_out",)), name=name)
        s = style.astype(jnp.float32).reshape(style.shape[0], -1, style.shape[-1])
        mu = jnp.mean(s, axis=1)
        sigma = jnp.sqrt(jnp.var(s, axis=1, ddof=1) + self.epsilon)
        scale = dense("gamma")(sigma.astype(self.dtype))[:, None, None, :]
        bias = dense("beta")(mu.astype(self.dtype))[:, None, None, :]
        h = _group_norm(self.dtype, self.param_dtype, "gn", affine=False)(x)
        out = scale * h + bias
        self.sow("intermediates", "output", out)
        return out


def _check_switches(use_attn: bool) -> None:
    if use_attn:
        raise NotImplementedError("GigaTok CNN attention blocks (`use_attn: True`) are not "
                                  "implemented; every released config has use_attn False.")


class _Level(nn.Module):
    """One resolution level (`conv_blocks_{i}`): `num_blocks` ResnetBlocks `res_{j}` (the first
    does the channel change), then "down" (`downsample`), "up" (`upsample`) or nothing."""

    out_channels: int
    num_blocks: int
    resample: str = "none"
    d2s: bool = True
    remat: str = "none"
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_blocks):
            h = maybe_remat(ResnetBlock, self.remat)(self.out_channels, **kw, name=f"res_{j}")(h)
        if self.resample == "down":
            h = Downsample(self.out_channels, **kw, name="downsample")(h)
        elif self.resample == "up":
            h = Upsample(self.out_channels, d2s=self.d2s, **kw, name="upsample")(h)
        elif self.resample != "none":
            raise ValueError(f"Unknown resample {self.resample!r}.")
        return h


class GigaTokCNNEncoder(nn.Module):
    """(B, H, W, 3) images -> (B, H/f, W/f, z_channels) map, f = 2 ** (len(ch_mult) - 1).
    Level i works at ch * ch_mult[i] channels; its first block does the channel change."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    use_attn: bool = False
    remat: str = "none"  # rematerialise each ResnetBlock (`layers.maybe_remat`)
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _check_switches(self.use_attn)
        kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        h = _conv(self.ch, 3, name="conv_in", **kw)(images.astype(self.dtype))
        for i, mult in enumerate(self.ch_mult):
            h = _Level(self.ch * mult, self.num_res_blocks,
                       resample="down" if i != levels - 1 else "none", remat=self.remat,
                       **kw, name=f"conv_blocks_{i}")(h)
        channels = self.ch * self.ch_mult[-1]
        for j in range(2):
            h = maybe_remat(ResnetBlock, self.remat)(channels, **kw, name=f"mid_{j}")(h)
        h = nn.silu(_group_norm(self.dtype, self.param_dtype, "norm_out")(h))
        return _conv(self.z_channels, 3, name="conv_out", **kw)(h)


class GigaTokCNNDecoder(nn.Module):
    """(B, h, w, z_channels) map (the transformer decoder's `rec_spatial`, or the encoder map for
    the shortcut reconstruction) -> (B, h*f, w*f, out_channels) pixels, not clamped.

    conv_in 3x3 (z -> ch * ch_mult[-1]) -> 2 mid blocks -> levels `conv_blocks_0` (official
    i_level L-1, deepest) .. `conv_blocks_{L-1}` (finest): [AdaGN `adaptive_k` conditioned on the
    decoder input] -> `num_res_blocks + 1` blocks -> up-sample (all but the last) -> GN -> swish ->
    conv_out 3x3."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    out_channels: int = 3
    adaptive_gn: bool = True
    d2s_up: bool = True
    use_attn: bool = False
    remat: str = "none"  # rematerialise each ResnetBlock (`layers.maybe_remat`)
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        _check_switches(self.use_attn)
        if z.shape[-1] != self.z_channels:
            raise ValueError(f"GigaTokCNNDecoder expects {self.z_channels} input channels, got "
                             f"shape {z.shape}.")
        kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        style = z
        channels = self.ch * self.ch_mult[-1]
        h = _conv(channels, 3, name="conv_in", **kw)(z.astype(self.dtype))
        for j in range(2):
            h = maybe_remat(ResnetBlock, self.remat)(channels, **kw, name=f"mid_{j}")(h)
        for k in range(levels):
            i_level = levels - 1 - k
            if self.adaptive_gn:
                h = AdaptiveGroupNorm(h.shape[-1], **kw, name=f"adaptive_{k}")(h, style)
            h = _Level(self.ch * self.ch_mult[i_level], self.num_res_blocks + 1,
                       resample="up" if i_level != 0 else "none", d2s=self.d2s_up,
                       remat=self.remat, **kw, name=f"conv_blocks_{k}")(h)
        h = nn.silu(_group_norm(self.dtype, self.param_dtype, "norm_out")(h))
        return _conv(self.out_channels, 3, name="conv_out", **kw)(h)


def init_shapes(module: nn.Module, spatial: int, in_channels: int = 3):
    """Abstract (shape-only) variables of an encoder (`in_channels` 3) or decoder
    (`in_channels` = z_channels) on a (1, spatial, spatial, in_channels) input, via
    `jax.eval_shape`."""
    x = jax.ShapeDtypeStruct((1, spatial, spatial, in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)
