"""The FID InceptionV3 of pytorch-fid (the TF-2015 graph of the original FID code), in Flax.

This is the network behind `pytorch_fid.inception.fid_inception_v3()` wrapped by pytorch-fid's
`InceptionV3` (PyPI `pytorch-fid` 0.3.0): torchvision's Inception3 layout with the FID variants
of the Mixed blocks, plus its 1008-way `fc` head (used for the Inception Score). It differs from
torchvision's ImageNet Inception-v3 in the weights *and* in the pooling of the Mixed blocks:

  * Mixed_5b/5c/5d (`InceptionA`), Mixed_6b..6e (`InceptionC`) and Mixed_7b (`InceptionE`,
    pool="avg") pool their last branch with a 3x3 / stride-1 / pad-1 average pool that leaves
    the padding out of the divisor (PyTorch `count_include_pad=False`);
  * Mixed_7c (`InceptionE`, pool="max") uses a 3x3 / stride-1 / pad-1 *max* pool there.

Every convolution is a `BasicConv2d`: conv without bias -> BatchNorm in eval mode (running
statistics, eps 0.001) -> ReLU. The BatchNorm statistics are ordinary params of a frozen
`FrozenBatchNorm` (`scale`, `bias`, `mean`, `var`), so the whole network is one "params" tree.

Module names are the official ones (`Conv2d_1a_3x3`, `Mixed_5b`, `branch3x3dbl_2`, `conv`, `bn`,
`fc`), so `tok1d.weights.convert.inception` maps `Mixed_5b.branch1x1.conv.weight` to
`params["Mixed_5b"]["branch1x1"]["conv"]["kernel"]` and so on.

`FIDInceptionV3` takes NHWC images in [0, 1] of any size, resizes them to 299x299 without
antialiasing (`resize_bilinear`) and scales them as `input_convention` says: "tf1" (the
default: the TF graph's own input ops, TF1's bilinear resize of the 0-255 values and
(x - 128) / 128, as ADM's evaluator and torch-fidelity compute them) or "pytorch_fid"
(PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` and 2x - 1, as pytorch-fid).
It returns pytorch-fid's four feature blocks ("block0" .. "block2" as NHWC maps, "pool3" = the
(B, 2048) FID feature), the (B, 1008) "logits" and "logits_unbiased" (the fc without its bias,
which the Inception Score takes) and "spatial", the (B, 2023) features of ADM's sFID. Get the
real weights with `tok1d convert
inception_fid` and load them with `tok1d.weights.loaders.load_inception`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
REGISTRY_NAME = "inception_fid"
INPUT_SIZE = 299
POOL3_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
# ADM's sFID features: the TF graph's `mixed_6/conv` (the 1x1 branch of Mixed_6d, whose 192
# channels come first in that block's output), its first 7 channels, flattened (h, w, c).
SPATIAL_BLOCK = "Mixed_6d"
SPATIAL_CHANNELS = 7

# The official top-level modules of each of pytorch-fid's four output blocks (the max pools and
# the final average pool have no parameters).
BLOCK_MODULES: tuple[tuple[str, ...], ...] = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


# --------------------------------------------------------------------------- resize

def _linear_taps(in_size: int, out_size: int, half_pixel: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a 1-D linear interpolation: out = (1 - l) x[i0] + l x[i1],
    i0 = floor(src), i1 = min(i0 + 1, in - 1), l = src - i0, where src is
    - `half_pixel`: PyTorch's (align_corners=False): (dst + 0.5) * in / out - 0.5, clamped at 0,
      computed with torch's float32 roundings (scale = float32(in / out), src rounded to
      float32);
    - else TF1's `resize_bilinear` (align_corners=False, no half-pixel centres; the TF FID
      Inception graph, ADM's evaluator, torch-fidelity): dst * in / out."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    offset = 0.5 if half_pixel else 0.0
    src = (np.float64(scale) * (dst + offset) - offset).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    l0 = (np.float32(1) - l1).astype(np.float32)
    return i0.astype(np.int32), i1.astype(np.int32), l0, l1


def _resize_axis(x: jax.Array, axis: int, size: int, half_pixel: bool) -> jax.Array:
    i0, i1, l0, l1 = _linear_taps(x.shape[axis], size, half_pixel)
    shape = [1] * x.ndim
    shape[axis] = size
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a * jnp.asarray(l0).reshape(shape) + b * jnp.asarray(l1).reshape(shape)


def resize_bilinear(x: jax.Array, size: int, half_pixel: bool = True) -> jax.Array:
    """NHWC float -> (B, size, size, C) float32, without antialiasing (`jax.image.resize`
    antialiases when downsampling and so differs). `half_pixel`: PyTorch `F.interpolate(size=
    (size, size), mode="bilinear", align_corners=False)` (as pytorch-fid resizes); else TF1's
    `resize_bilinear` (see `_linear_taps`). Separable: width first, then height, like torch's
    CPU kernel; an axis that already has `size` is left untouched."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear expects NHWC images, got shape {x.shape}")
    if x.shape[2] != size:
        x = _resize_axis(x, 2, size, half_pixel)
    if x.shape[1] != size:
        x = _resize_axis(x, 1, size, half_pixel)
    return x


# --------------------------------------------------------------------------- layers

def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class FrozenBatchNorm(nn.Module):
    """Eval-mode BatchNorm over the last axis with its statistics as params:
    (x - mean) / sqrt(var + eps) * scale + bias, computed in float32."""

    eps: float = BN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        mean = self.param("mean", nn.initializers.zeros, (c,), self.param_dtype)
        var = self.param("var", nn.initializers.ones, (c,), self.param_dtype)
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)
        y = (x.astype(jnp.float32) - mean.astype(jnp.float32)) * mul + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: Conv (no bias; `conv`) -> FrozenBatchNorm (`bn`) -> ReLU.
    `padding` is PyTorch's symmetric (pad_h, pad_w) or an int."""

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: int | Sequence[int] = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                    name="conv")(x)
        x = FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 / stride 1 / pad 1 average pool, divisor = number of non-padding pixels
    (PyTorch `avg_pool2d(x, 3, 1, 1, count_include_pad=False)`)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def max_pool_3x3_same(x: jax.Array) -> jax.Array:
    """3x3 / stride 1 / pad 1 max pool (PyTorch pads with -inf)."""
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """3x3 / stride 2 max pool without padding (floor mode)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    """Shared fields / conv factory of the Mixed blocks (input channels are inferred)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, name: str, features: int, kernel_size, strides=1, padding=0) -> BasicConv2d:
        return BasicConv2d(features, kernel_size, strides, padding, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)


class InceptionA(_Block):
    """pytorch-fid `FIDInceptionA` (Mixed_5b/5c/5d): branches [1x1, 5x5, 3x3dbl, pool];
    the pool branch averages with count_include_pad=False. Output 224 + pool_features."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_1", 48, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """torchvision `InceptionB` (Mixed_6a, grid reduction): branches [3x3 stride 2, 3x3dbl,
    3x3/2 max pool]. Output 480 + in channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(_Block):
    """pytorch-fid `FIDInceptionC` (Mixed_6b..6e): branches [1x1, 7x7 (1x7, 7x1), 7x7dbl
    (7x1, 1x7, 7x1, 1x7), pool] with the count_include_pad=False average pool. Output 768."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """torchvision `InceptionD` (Mixed_7a, grid reduction): branches [3x3 (1x1, 3x3/2),
    7x7x3 (1x1, 1x7, 7x1, 3x3/2), 3x3/2 max pool]. Output 512 + in channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_1", 192, 1)(x)
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(_Block):
    """pytorch-fid `FIDInceptionE_1` (pool="avg", Mixed_7b; count_include_pad=False) or
    `FIDInceptionE_2` (pool="max", Mixed_7c): branches [1x1, cat(1x3, 3x1) after a 1x1,
    cat(1x3, 3x1) after 1x1 + 3x3, pool]. Output 2048."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)],
                             axis=-1)
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)],
                             axis=-1)
        pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool_3x3_same(x)
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# --------------------------------------------------------------------------- network

INPUT_CONVENTIONS = ("pytorch_fid", "tf1")


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 (all four blocks, resize + input scaling) plus the 1008-way fc
    head.

    `__call__(images)` takes NHWC images in [0, 1] (resized to 299x299 when `resize_input`) and
    returns {"block0": (B,73,73,64), "block1": (B,35,35,192), "block2": (B,17,17,768) (NHWC, at
    299 px), "pool3": (B, 2048) float32, "logits": (B, 1008) float32, "logits_unbiased" (the fc
    without its bias: what ADM's evaluator and torch-fidelity take the Inception Score of),
    "spatial": (B, 2023) float32 (ADM's sFID features, `block2_and_spatial`)}.
    The stages are also methods (`preprocess`, `block0` .. `block3`, `head`) for
    `apply(..., method=...)` with a partial params tree.

    `input_convention`: "pytorch_fid" (PyTorch's half-pixel bilinear resize, then 2x - 1) or
    "tf1" (the TF FID Inception graph's own input ops, which ADM's evaluator and torch-fidelity
    reproduce, i.e. what the official gFID / rFID numbers saw: TF1's bilinear resize of the
    0-255 values, then (x - 128) / 128).
    """

    resize_input: bool = True
    input_size: int = INPUT_SIZE  # the resize target; FID is defined at 299 (smaller: tests)
    input_convention: str = "tf1"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.Conv2d_1a_3x3 = BasicConv2d(32, 3, strides=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(192, 3, **kw)
        self.Mixed_5b = InceptionA(pool_features=32, **kw)
        self.Mixed_5c = InceptionA(pool_features=64, **kw)
        self.Mixed_5d = InceptionA(pool_features=64, **kw)
        self.Mixed_6a = InceptionB(**kw)
        self.Mixed_6b = InceptionC(channels_7x7=128, **kw)
        self.Mixed_6c = InceptionC(channels_7x7=160, **kw)
        self.Mixed_6d = InceptionC(channels_7x7=160, **kw)
        self.Mixed_6e = InceptionC(channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(**kw)
        self.Mixed_7b = InceptionE(pool="avg", **kw)
        self.Mixed_7c = InceptionE(pool="max", **kw)
        self.fc = nn.Dense(NUM_LOGITS, dtype=self.dtype, param_dtype=self.param_dtype)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """[0, 1] NHWC -> (resized to `input_size` (299) when `resize_input`) -> the network's
        input range, in float32 (`input_convention`)."""
        if self.input_convention not in INPUT_CONVENTIONS:
            raise ValueError(f"input_convention={self.input_convention!r} is not one of "
                             f"{INPUT_CONVENTIONS}.")
        tf1 = self.input_convention == "tf1"
        x = jnp.asarray(images, jnp.float32) * (255.0 if tf1 else 1.0)
        if self.resize_input:
            x = resize_bilinear(x, self.input_size, half_pixel=not tf1)
        return (x - 128.0) / 128.0 if tf1 else 2.0 * x - 1.0

    def block0(self, x: jax.Array) -> jax.Array:
        x = self.Conv2d_1a_3x3(x.astype(self.dtype))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(x))
        return max_pool_3x3_stride2(x)

    def block1(self, x: jax.Array) -> jax.Array:
        return max_pool_3x3_stride2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))

    def block2(self, x: jax.Array) -> jax.Array:
        return self.block2_and_spatial(x)[0]

    def block2_and_spatial(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """block2's output and ADM's sFID features (B, h * w * 7) float32 (h = w = 17 at 299
        px): the first SPATIAL_CHANNELS channels of SPATIAL_BLOCK's 1x1 branch."""
        spatial = None
        for name in BLOCK_MODULES[2]:
            x = getattr(self, name)(x)
            if name == SPATIAL_BLOCK:
                spatial = x[..., :SPATIAL_CHANNELS].astype(jnp.float32)
                spatial = spatial.reshape(spatial.shape[0], -1)
        return x, spatial

    def block3(self, x: jax.Array) -> jax.Array:
        """Mixed_7a/7b/7c + global average pool -> pool3 (B, 2048) float32."""
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def head(self, pool3: jax.Array) -> jax.Array:
        """fc: (B, 2048) -> (B, 1008) float32 logits."""
        return self.fc(pool3.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        b0 = self.block0(self.preprocess(images))
        b1 = self.block1(b0)
        b2, spatial = self.block2_and_spatial(b1)
        pool3 = self.block3(b2)
        logits = self.head(pool3)
        return {"block0": b0, "block1": b1, "block2": b2, "pool3": pool3, "logits": logits,
                "spatial": spatial,
                "logits_unbiased": logits if self.is_initializing() else self.head_unbiased(pool3)}

    def head_unbiased(self, pool3: jax.Array) -> jax.Array:
        """The fc without its bias: (B, 2048) -> (B, 1008) float32."""
        kernel = self.fc.variables["params"]["kernel"]
        return jnp.dot(pool3.astype(self.dtype), kernel.astype(self.dtype)).astype(jnp.float32)


# --------------------------------------------------------------------------- params

def abstract_params(model: nn.Module | None = None, image_size: int = 75,
                    in_channels: int = 3) -> dict[str, Any]:
    """The params tree of `model` (default: FIDInceptionV3) as ShapeDtypeStructs (no compile).
    Blocks infer their input channels: pass `in_channels` for them."""
    model = FIDInceptionV3(resize_input=False) if model is None else model
    x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def random_params(seed: int = 0, model: nn.Module | None = None,
                  in_channels: int = 3) -> dict[str, Any]:
    """A NumPy-drawn params tree (default: the full FIDInceptionV3) where every parameter
    matters, for tests and smoke runs: kernels ~ N(0, 2 / fan_in), BN scale ~ U(0.5, 1.5),
    bias ~ 0.2 N(0, 1), mean ~ 0.1 N(0, 1), var ~ U(0.5, 1.5), fc bias ~ 0.1 N(0, 1)."""
    rng = np.random.default_rng(seed)
    shapes = abstract_params(model, in_channels=in_channels)

    def draw(path: tuple[str, ...], leaf) -> np.ndarray:
        name, shape = path[-1], tuple(leaf.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
        elif name == "scale":
            v = rng.uniform(0.5, 1.5, shape)
        elif name == "bias":
            v = (0.1 if path[-2] == "fc" else 0.2) * rng.standard_normal(shape)
        elif name == "mean":
            v = 0.1 * rng.standard_normal(shape)
        elif name == "var":
            v = rng.uniform(0.5, 1.5, shape)
        else:  # pragma: no cover - the model has no other leaves
            raise ValueError(f"unexpected parameter {'/'.join(path)}")
        return np.asarray(v, dtype=leaf.dtype)

    def walk(tree, path=()):
        return {k: walk(v, path + (k,)) if isinstance(v, dict) else draw(path + (k,), v)
                for k, v in tree.items()}

    return walk(dict(shapes))
