"""ConvNeXt image classifier (torchvision `convnext_*`), NHWC, for the ConvNeXt logit loss.

Architecture (torchvision `models/convnext.py`, eval mode):
  stem        conv 4x4 / stride 4 (bias) -> LayerNorm over channels (eps 1e-6)
  stage i     depths[i] CNBlocks of width dims[i]; stages 1..3 start with a downsample:
              LayerNorm (eps 1e-6) -> conv 2x2 / stride 2 (bias)
  CNBlock     x + layer_scale * fc2(gelu(fc1(LN(dwconv7x7(x)))))  (depthwise conv with bias,
              LayerNorm eps 1e-6, fc1 = Linear C->4C, exact erf GELU, fc2 = Linear 4C->C,
              layer_scale a per-channel vector); stochastic depth is the identity in eval
  head        global average pool -> LayerNorm (eps 1e-6) -> Linear C->num_classes

`convnext_small` = depths (3, 3, 27, 3), dims (96, 192, 384, 768) (`CONVNEXT_SMALL`).
With `scan=True` (default) the blocks of a stage share one compiled body (`nn.scan`), their
parameters stacked along a leading "layers" axis; `remat` trades memory for recompute in the
backward pass (see `tok1d.layers.transformer.remat_policy`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers.cnn import DepthwiseConv
from tok1d.layers.transformer import gelu_exact, logical, maybe_remat

Dtype = Any

CONVNEXT_SMALL = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
NORM_EPS = 1e-6

# torchvision: trunc_normal_(std=0.02) cut at +-2 absolute (= an untruncated N(0, 0.02^2)) for
# convs and linears, zero bias.
_kernel_init = nn.initializers.normal(stddev=0.02)


def _norm(dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance (as PyTorch), not E[x^2] - E[x]^2: ConvNeXt features can have means
    # that are large compared to their spread.
    return nn.LayerNorm(epsilon=NORM_EPS, use_fast_variance=False, dtype=dtype,
                        param_dtype=param_dtype,
                        scale_init=logical(nn.initializers.ones, ("norm",)),
                        bias_init=logical(nn.initializers.zeros, ("norm",)), name=name)


class CNBlock(nn.Module):
    """One ConvNeXt block on NHWC input."""

    layer_scale_init: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        y = DepthwiseConv(
            (7, 7), padding=((3, 3), (3, 3)), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical(_kernel_init, ("conv_h", "conv_w", None, "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)), name="dwconv")(x)
        y = _norm(self.dtype, self.param_dtype, "norm")(y)
        y = dense(4 * dim, kernel_init=logical(_kernel_init, ("embed", "mlp")),
                  bias_init=logical(nn.initializers.zeros, ("mlp",)), name="fc1")(y)
        y = gelu_exact(y)
        y = dense(dim, kernel_init=logical(_kernel_init, ("mlp", "embed")),
                  bias_init=logical(nn.initializers.zeros, ("embed",)), name="fc2")(y)
        gamma = self.param("layer_scale",
                           logical(nn.initializers.constant(self.layer_scale_init), ("embed",)),
                           (dim,), self.param_dtype)
        return x + gamma.astype(y.dtype) * y


class _ScanCNBlock(CNBlock):
    @nn.compact
    def __call__(self, x: jax.Array, _=None):  # type: ignore[override]
        return super().__call__(x), None


class ConvNeXt(nn.Module):
    """NHWC images (ImageNet-normalised) -> (B, num_classes) float32 logits."""

    depths: tuple[int, ...] = CONVNEXT_SMALL["depths"]
    dims: tuple[int, ...] = CONVNEXT_SMALL["dims"]
    num_classes: int = 1000
    layer_scale_init: float = 1e-6
    scan: bool = True
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, features: int, size: int, name: str) -> nn.Conv:
        return nn.Conv(features, (size, size), strides=(size, size), padding="VALID",
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=logical(_kernel_init, ("conv_h", "conv_w", "conv_in", "embed")),
                       bias_init=logical(nn.initializers.zeros, ("embed",)), name=name)

    def _stage(self, x: jax.Array, i: int) -> jax.Array:
        kwargs = dict(layer_scale_init=self.layer_scale_init, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        block_cls = maybe_remat(_ScanCNBlock if self.scan else CNBlock, self.remat,
                                prevent_cse=not self.scan)
        if self.scan:
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=self.depths[i],
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**kwargs, name=f"stage{i}")(x, None)
            return x
        for j in range(self.depths[i]):
            x = block_cls(**kwargs, name=f"stage{i}_block{j}")(x)
        return x

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} differ in length.")
        x = x.astype(self.dtype)
        x = self._conv(self.dims[0], 4, "stem_conv")(x)
        x = _norm(self.dtype, self.param_dtype, "stem_norm")(x)
        for i, dim in enumerate(self.dims):
            if i:
                x = _norm(self.dtype, self.param_dtype, f"downsample{i}_norm")(x)
                x = self._conv(dim, 2, f"downsample{i}_conv")(x)
            x = self._stage(x, i)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        x = _norm(self.dtype, self.param_dtype, "head_norm")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=logical(_kernel_init, ("embed", None)),
                     bias_init=logical(nn.initializers.zeros, (None,)), name="head")(x)
        return x.astype(jnp.float32)
