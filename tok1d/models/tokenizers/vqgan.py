"""MaskGIT-VQGAN: the convolutional VQ tokenizer TiTok uses as its frozen proxy-code teacher
(stage 1) and whose decoder turns proxy codes into pixels (stage 2).

    images (B, H, W, 3) in [0, 1]
      -> VQGANEncoder  -> z (B, H/f, W/f, z_channels), f = 2 ** (len(channel_mult) - 1)
      -> VectorQuantizer (plain Euclidean, no l2-norm) -> codes (B, H/f, W/f)
      -> VQGANDecoder  -> images (B, H, W, 3), not clamped

NHWC throughout. Behaviour that differs from the usual taming-transformers VQGAN and that this
port reproduces (it comes from the MaskGIT JAX code the released weights were converted from):

* every convolution is "SAME"-padded (3x3 stride 1 -> pad 1 on each side);
* the encoder's `conv_in` and all convolutions inside residual blocks have no bias;
* no attention blocks; GroupNorm(32 groups, eps 1e-6) followed by SiLU everywhere;
* when a residual block changes the channel count, its 1x1 `nin_shortcut` (out -> out channels)
  is applied to the block's own output `h` and the block input is dropped: `h + nin(h)`;
* the encoder down-samples with a 2x2 average pool after every level but the last; the decoder
  up-samples with nearest x2 followed by a 3x3 conv (`upsample_conv`) after every level but 0;
* the middle stage has `num_res_blocks` residual blocks (2 in the released model).

Parameter layout (Flax names; the PyTorch key in brackets):

    encoder/conv_in/kernel                       [encoder.conv_in.weight]
    encoder/down_{i}/block_{j}/{norm1,norm2}/{scale,bias}, {conv1,conv2,nin_shortcut}/kernel
                                                 [encoder.down.{i}.block.{j}.*]
    encoder/mid_{j}/...                          [encoder.mid.{j}.*]
    encoder/norm_out/{scale,bias}, encoder/conv_out/{kernel,bias}
    decoder/conv_in/{kernel,bias}, decoder/mid_{j}/...
    decoder/up_{i}/block_{j}/..., decoder/up_{i}/upsample_conv/{kernel,bias}   (i = 0..L-1,
                                                 stored like the official ModuleList, run L-1 -> 0)
    decoder/norm_out/{scale,bias}, decoder/conv_out/{kernel,bias}
    quantize/embedding                           [quantize.embedding.weight]

Hooks: with `mutable=["intermediates"]` every residual block and every encoder/decoder level
sows its output as `output` (e.g. `intermediates/encoder/down_0/output` = after the level's
pool, `intermediates/decoder/up_2/output` = after the upsample + conv,
`intermediates/encoder/mid_0/output`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.cnn import ResnetBlock, conv as _conv, group_norm as _group_norm
from tok1d.layers.transformer import maybe_remat
from tok1d.models.interfaces import TokenizerAux, check_images, vq_aux
from tok1d.models.quantizers import VectorQuantizer, lookup_valid

Dtype = Any
PrecisionLike = Any

# The released ImageNet 256x256 model (maskgit-vqgan-imagenet-f16-256.bin): 16x16 codes.
MASKGIT_VQGAN_F16_256 = dict(hidden_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                             z_channels=256, codebook_size=1024)


class _Level(nn.Module):
    """One resolution level: `num_res_blocks` ResnetBlocks, then the level's resampling:
    "down" = 2x2 average pool, "up" = nearest x2 + 3x3 conv `upsample_conv`, "none"."""

    out_channels: int
    num_res_blocks: int
    resample: str = "none"
    remat: str = "none"
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_res_blocks):
            x = maybe_remat(ResnetBlock, self.remat)(
                self.out_channels, use_bias=False, shortcut="output", precision=self.precision,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"block_{j}")(x)
        if self.resample == "down":
            # F.avg_pool2d(kernel 2, stride 2): floors odd sizes, like a VALID pool.
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        elif self.resample == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(self.out_channels, 3, use_bias=True, precision=self.precision,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="upsample_conv")(x)
        elif self.resample != "none":
            raise ValueError(f"Unknown resample {self.resample!r}.")
        self.sow("intermediates", "output", x)
        return x


class VQGANEncoder(nn.Module):
    """(B, H, W, C) images in [0, 1] -> (B, H/f, W/f, z_channels) latents, f = 2**(L-1) with
    L = len(channel_mult). Level i works at hidden_channels * channel_mult[i] channels."""

    hidden_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    remat: str = "none"
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.channel_mult)
        x = images.astype(self.dtype)
        x = _conv(self.hidden_channels, 3, use_bias=False, **kw, name="conv_in")(x)
        for i, mult in enumerate(self.channel_mult):
            x = _Level(self.hidden_channels * mult, self.num_res_blocks,
                       resample="down" if i != levels - 1 else "none", remat=self.remat, **kw,
                       name=f"down_{i}")(x)
        channels = self.hidden_channels * self.channel_mult[-1]
        for j in range(self.num_res_blocks):
            x = maybe_remat(ResnetBlock, self.remat)(channels, use_bias=False,
                                                     shortcut="output", **kw, name=f"mid_{j}")(x)
        x = nn.silu(_group_norm(self.dtype, self.param_dtype, "norm_out")(x))
        return _conv(self.z_channels, 1, use_bias=True, **kw, name="conv_out")(x)


class VQGANDecoder(nn.Module):
    """(B, h, w, z_channels) latents -> (B, h*f, w*f, out_channels) images (not clamped).

    conv_in (z -> C_last, bias) -> `num_res_blocks` mid blocks -> levels L-1 .. 0 (level i ends
    at hidden_channels * channel_mult[i] channels, its first block does the channel change; all
    levels but 0 end with nearest x2 + upsample_conv) -> GN -> SiLU -> conv_out 3x3 (bias).
    Usable on its own (TiTok stage 2 builds one named "pixel_decoder")."""

    hidden_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    out_channels: int = 3
    remat: str = "none"
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        if z.shape[-1] != self.z_channels:
            raise ValueError(f"VQGANDecoder expects {self.z_channels} latent channels, got "
                             f"shape {z.shape}.")
        kw = dict(precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
        channels = self.hidden_channels * self.channel_mult[-1]
        x = _conv(channels, 3, use_bias=True, **kw, name="conv_in")(z.astype(self.dtype))
        for j in range(self.num_res_blocks):
            x = maybe_remat(ResnetBlock, self.remat)(channels, use_bias=False,
                                                     shortcut="output", **kw, name=f"mid_{j}")(x)
        for i in reversed(range(len(self.channel_mult))):
            x = _Level(self.hidden_channels * self.channel_mult[i], self.num_res_blocks,
                       resample="up" if i != 0 else "none", remat=self.remat, **kw,
                       name=f"up_{i}")(x)
        x = nn.silu(_group_norm(self.dtype, self.param_dtype, "norm_out")(x))
        return _conv(self.out_channels, 3, use_bias=True, **kw, name="conv_out")(x)


class MaskGITVQGAN(nn.Module):
    """The MaskGIT-VQGAN tokenizer (encoder, Euclidean VQ, decoder); defaults = the released
    ImageNet f16 256x256 model (hidden 128, mult (1,1,2,2,4), 2 blocks, z 256, 1024 codes).

    Note: the official `VectorQuantizer` of this model weights its loss terms the other way round
    from the usual VQ-VAE form (mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)); the teacher
    is frozen in TiTok so only `codes` matter. `aux` here comes from tok1d's shared quantizer.
    """

    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024
    image_size: int = 256  # the image size `num_tokens` refers to (any size encodes)
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(hidden_channels=self.hidden_channels, channel_mult=tuple(self.channel_mult),
                  num_res_blocks=self.num_res_blocks, z_channels=self.z_channels,
                  precision=self.precision, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = VQGANEncoder(**kw)
        self.quantize = VectorQuantizer(self.codebook_size, self.z_channels, l2_norm=False,
                                        param_dtype=self.param_dtype)
        self.decoder = VQGANDecoder(**kw)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.downsample_factor) ** 2

    codes_per_token = 1
    decodes_prefixes = False  # a 2D code grid

    @property
    def pixel_range(self) -> tuple[float, float]:
        return (0.0, 1.0)

    @property
    def input_size(self) -> None:
        """Fully convolutional: any size whose side is a multiple of `downsample_factor`."""
        return None

    @property
    def outputs_pixels(self) -> bool:
        return True

    def encode_latents(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """images (B, H, W, 3) in [0, 1] -> (z_q (B, h, w, z) float32 straight-through, the
        quantizer's outputs): `codes` (B, h, w) int32, `z` the unquantized encoder output, and
        the quantizer losses."""
        check_images("MaskGIT-VQGAN", images, None, self.pixel_range)
        z = self.encoder(images)
        z_q, aux = self.quantize(z)
        aux = dict(aux, z=z)
        return z_q, aux

    def encode(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) in [0, 1] -> codes (B, h, w) int32 (flatten row-major for the
        official (B, h*w) order)."""
        return self.encode_latents(images)[1]["codes"]

    def decode_latents(self, z_q: jax.Array) -> jax.Array:
        """(B, h, w, z) latents -> (B, h*f, w*f, 3) images (not clamped to [0, 1])."""
        return self.decoder(z_q)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """codes (B, h, w), or (B, N) with N a square (row-major, as the official
        `get_codebook_entry`) -> images (not clamped; NaN where a code is outside the
        codebook, `quantizers.lookup_valid`)."""
        if codes.ndim == 2:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"decode_codes: {codes.shape[1]} codes per image is not a "
                                 "square grid; pass codes as (B, h, w).")
            codes = codes.reshape(codes.shape[0], side, side)
        elif codes.ndim != 3:
            raise ValueError(f"decode_codes expects (B, h, w) or (B, N) codes, got {codes.shape}.")
        return self.decoder(lookup_valid(self.quantize, codes))

    def __call__(self, images: jax.Array, *, train: bool = False
                 ) -> tuple[jax.Array, TokenizerAux]:
        """images -> (reconstruction (not clamped), TokenizerAux with `encoder_map`); `train`
        changes nothing (the tokenizer interface's training forward)."""
        del train
        z_q, quantized = self.encode_latents(images)
        return self.decode_latents(z_q), vq_aux(quantized, encoder_map=quantized["z"])


def init_shapes(model: MaskGITVQGAN, image_size: Optional[int] = None):
    """Abstract (shape-only) variables of `model` via `jax.eval_shape` (no compute, no memory)."""
    size = image_size or model.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)
