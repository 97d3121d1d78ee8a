"""Convolutional pieces shared by the CNN halves of the tokenizers (MaskGIT-VQGAN, GigaTok), the
discriminators and the frozen nets: PyTorch-default-initialised convs with logical axis names,
GroupNorm with PyTorch statistics, the taming-style residual block and a depthwise conv with a
fast CPU form (NHWC)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.transformer import constrain, logical

Dtype = Any
PrecisionLike = Any

# PyTorch's nn.Conv2d default: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
TORCH_CONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Logical axis names of a conv kernel (kh, kw, in, out).
CONV_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out")


# A conv output's logical sharding: the batch over the data axes, nothing else split.
CONV_ACT = ("act_batch", None, None, None)


class Conv(nn.Conv):
    """`nn.Conv` whose output keeps the batch sharding (`CONV_ACT`; a no-op outside a mesh).
    Without it XLA (jax 0.10.2, Shardy and GSPMD alike) computes wrong gradients for a strided
    conv followed by another conv when the kernels are split over fsdp and tensor and the batch
    over data x fsdp: 20-100% off on 2 x 2 x 2 and 4 x 2 x 2 meshes, the forward exact
    (tests/test_parallel.py::test_strided_conv_gradients_on_a_data_fsdp_tensor_mesh). Every
    trained conv of tok1d is one (same parameters and names as `nn.Conv`)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return constrain(super().__call__(inputs), CONV_ACT)


def conv(features: int, kernel_size: int, name: str, use_bias: bool = True, stride: int = 1,
         padding: Any = "SAME", precision: PrecisionLike = None, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
    """k x k conv, kernel (k, k, I, O). "SAME" at stride 1 pads (k-1)//2 before and k//2 after:
    PyTorch's symmetric padding for odd k, and TF / `Conv2dSame` for any k."""
    return Conv(
        features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
        use_bias=use_bias, precision=precision, dtype=dtype, param_dtype=param_dtype,
        kernel_init=logical(TORCH_CONV_INIT, CONV_NAMES),
        bias_init=logical(nn.initializers.zeros, ("conv_out",)),
        name=name)


# How `depthwise_conv` computes: "conv" is XLA's grouped convolution (feature_group_count = C),
# what cuDNN and the TPU's convolution units run; "shifts" sums kh x kw shifted (strided) slices of
# the padded input, each times its tap's per-channel weights, which XLA fuses into one loop (and
# its input gradient into another). XLA:CPU runs the grouped convolution as a dense one over a
# block-diagonal filter: for ConvNeXt's 7x7 depthwise convs "shifts" is about 10x faster there,
# forward and backward. "auto": "shifts" on the CPU backend, "conv" on GPU / TPU.
DEPTHWISE_IMPLS = ("auto", "conv", "shifts")


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                   padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
                   impl: str = "auto") -> jax.Array:
    """Depthwise 2-D convolution (cross-correlation, as PyTorch's `groups=C` conv) of NHWC `x`
    with `kernel` (kh, kw, 1, C): out[b, i, j, c] = sum_{a, d} x_pad[b, s0 i + a, s1 j + d, c] *
    kernel[a, d, 0, c], with explicit zero `padding` ((top, bottom), (left, right)). `impl`: one of
    `DEPTHWISE_IMPLS` (both give the same values up to float rounding)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_conv: impl={impl!r}; expected one of {DEPTHWISE_IMPLS}.")
    kh, kw, one, channels = kernel.shape
    if one != 1 or channels != x.shape[-1]:
        raise ValueError(f"depthwise_conv: kernel {kernel.shape} for input {x.shape}; expected "
                         f"(kh, kw, 1, {x.shape[-1]}).")
    if impl == "auto":
        impl = "shifts" if jax.default_backend() == "cpu" else "conv"
    if impl == "conv":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=tuple(strides), padding=tuple(map(tuple, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    return depthwise_shifts(x, kernel, tuple(strides), tuple(map(tuple, padding)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def depthwise_shifts(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """`depthwise_conv`'s "shifts" form. A jitted function of its own so that it shows up in a
    jaxpr as one call named `depthwise_shifts` (its linearized and transposed parts keep that
    name: jax 0.10.2 and 0.12): FLOP counters (`tok1d.cli.bench.jaxpr_flops`) count its
    multiplies as the depthwise conv's 2 * out * kh * kw; XLA inlines it, so the compiled
    program is the same."""
    kh, kw = kernel.shape[:2]
    (s0, s1), (pt, pb), (pl, pr) = strides, *padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    out_h = (xp.shape[1] - kh) // s0 + 1
    out_w = (xp.shape[2] - kw) // s1 + 1
    out = None
    for a in range(kh):
        for d in range(kw):
            tap = xp[:, a:a + s0 * (out_h - 1) + 1:s0, d:d + s1 * (out_w - 1) + 1:s1, :]
            term = tap * kernel[a, d, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv(nn.Module):
    """`nn.Conv(C, kernel_size, feature_group_count=C)` with explicit padding, computed by
    `depthwise_conv` (same parameters: kernel (kh, kw, 1, C), bias (C,))."""

    kernel_size: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    strides: tuple[int, int] = (1, 1)
    use_bias: bool = True
    impl: str = "auto"
    kernel_init: Any = TORCH_CONV_INIT
    bias_init: Any = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, channels),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (channels,), self.param_dtype) \
            if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = depthwise_conv(x, kernel, self.strides, self.padding, self.impl)
        return y if bias is None else y + bias


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

