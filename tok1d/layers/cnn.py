"""Convolutional pieces shared by the CNN halves of the tokenizers (MaskGIT-VQGAN, GigaTok) and
the discriminators: PyTorch-default-initialised convs with logical axis names, GroupNorm with
PyTorch statistics, and the taming-style residual block (NHWC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.transformer import logical

Dtype = Any
PrecisionLike = Any

# PyTorch's nn.Conv2d default: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Logical axis names of a conv kernel (kh, kw, in, out).
CONV_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out")


def conv(features: int, kernel_size: int, name: str, use_bias: bool = True, stride: int = 1,
         padding: Any = "SAME", precision: PrecisionLike = None, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
    """k x k conv, kernel (k, k, I, O). "SAME" at stride 1 pads (k-1)//2 before and k//2 after:
    PyTorch's symmetric padding for odd k, and TF / `Conv2dSame` for any k."""
    return nn.Conv(
        features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
        use_bias=use_bias, precision=precision, dtype=dtype, param_dtype=param_dtype,
        kernel_init=logical(TORCH_CONV_INIT, CONV_NAMES),
        bias_init=logical(nn.initializers.zeros, ("conv_out",)),
        name=name)


def group_norm(dtype: Dtype, param_dtype: Dtype, name: str, affine: bool = True,
               num_groups: int = 32, epsilon: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm (default 32 groups, eps 1e-6) with two-pass float32 variance like PyTorch."""
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
        use_scale=affine, use_bias=affine, use_fast_variance=False,
        scale_init=logical(nn.initializers.ones, ("norm",)),
        bias_init=logical(nn.initializers.zeros, ("norm",)),
        name=name)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3 plus a residual. When the channel count
    changes, a 1x1 `nin_shortcut` is applied to the block input (`shortcut="input"`, taming /
    GigaTok: x' + h) or - the MaskGIT-VQGAN quirk - to the block output
    (`shortcut="output"`: h + nin(h), the input dropped). `use_bias` applies to every conv."""

    out_channels: int
    use_bias: bool = True
    shortcut: str = "input"
    precision: PrecisionLike = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.shortcut not in ("input", "output"):
            raise ValueError(f"shortcut={self.shortcut!r}; expected 'input' or 'output'.")
        kw = dict(use_bias=self.use_bias, precision=self.precision, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.dtype, self.param_dtype, "norm1")(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.silu(group_norm(self.dtype, self.param_dtype, "norm2")(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] == self.out_channels:
            out = x.astype(h.dtype) + h
        elif self.shortcut == "output":
            out = h + conv(self.out_channels, 1, name="nin_shortcut", **kw)(h)
        else:
            out = conv(self.out_channels, 1, name="nin_shortcut", **kw)(x).astype(h.dtype) + h
        self.sow("intermediates", "output", out)
        return out

