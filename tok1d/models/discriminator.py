"""GAN discriminators for tokenizer training (NHWC, Flax Linen).

Two discriminators, each a faithful port of the one an official recipe trains:

`TiTokDiscriminator`
    The `NLayerDiscriminator` of TiTok / MaskBit (bytedance/1d-tokenizer,
    `modeling/modules/discriminator.py`), used in TiTok stage 2 and the single-stage recipe:

        conv 5x5 (C -> w) + LeakyReLU(0.1)
        3 x [conv 3x3 -> blur (1,3,3,1) stride 2 -> GroupNorm(32, eps 1e-5) -> LeakyReLU(0.1)]
            with widths w -> w -> 2w -> 4w               (w = 128: 128, 256, 512)
        adaptive max pool to 16 x 16
        conv 1x1 (4w -> 4w) + LeakyReLU(0.1), conv 5x5 (4w -> 1)

    Output: (B, 16, 16, 1) float32 logits for any input size. 1,909,889 parameters at the
    default size. The official loss feeds it images in **[0, 1]** (TiTok's pixel range); nothing
    in the network rescales its input.

    Details reproduced from the official code:
      * every conv uses TF-style "SAME" padding (`Conv2dSame`; symmetric for these odd stride-1
        kernels), with bias;
      * the blur is a depthwise conv with the outer product of the 1-D kernel, normalised to sum
        1, stride 2, on a zero-padded input whose padding is always computed **as for a 4-tap
        kernel** (`calc_same_pad(k=4, s=2)`: 1 on each side for an even size, 1 before / 2 after
        for an odd one), even when another blur kernel is configured (an official quirk; with the
        default 4-tap kernel it is ordinary "SAME" padding and the output is ceil(H / 2));
      * `AdaptiveMaxPool2d((16, 16))` has PyTorch's bin rule (bin i covers
        [floor(i H / 16), ceil((i + 1) H / 16))): a 2x2 max pool for the 32x32 map of a 256
        input, the identity for a 16x16 map, and overlapping / repeated bins (an upsampling) for
        smaller maps;
      * PyTorch default init: conv kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        GroupNorm scale 1 / bias 0 (the official code applies no custom init).

`PatchGANDiscriminator`
    The pix2pix / taming `NLayerDiscriminator` as used by LlamaGen and GigaTok
    (`tokenizer/tokenizer_image/discriminator_patchgan.py`); GigaTok's configs use
    `disc_type: patchgan, disc_dim: 64, disc_num_layers: 3, kw: 4, norm: batch, blur_ds: False`:

        conv 4x4 s2 (C -> 64, bias) + LeakyReLU(0.2)
        conv 4x4 s2 (64 -> 128) -> BatchNorm -> LeakyReLU(0.2)
        conv 4x4 s2 (128 -> 256) -> BatchNorm -> LeakyReLU(0.2)
        conv 4x4 s1 (256 -> 512) -> BatchNorm -> LeakyReLU(0.2)
        conv 4x4 s1 (512 -> 1, bias)

    All convs pad 1 on every side (so a 256 input gives (B, 30, 30, 1) logits); the convs before
    a BatchNorm have no bias. 2,765,633 parameters. Inputs in [-1, 1] (GigaTok / LlamaGen pixel
    range). Init as the official `_init_weights`: conv kernels N(0, 0.02), BatchNorm scale
    N(1, 0.02) and bias 0; the two biased convs keep PyTorch's default bias init
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    BatchNorm in a pure-functional trainer. The official trainers keep the loss module (and so
    the discriminator) in train mode for the whole run: BatchNorm always normalises with the
    statistics of the batch it is given, its running averages are updated but never read, and
    DDP without SyncBatchNorm makes those statistics per GPU. The discriminator is called
    separately on the real and on the fake batch (and once more on the fake batch in the
    generator step), so each call has its own statistics. By default this port therefore has
    **no running statistics and no `batch_stats` collection**: `apply` needs no mutable
    collections, and the module is a pure function of (params, images). With
    `track_running_stats=True` (the GigaTok recipes, whose checkpoints carry them) the running
    averages live in a "batch_stats" collection that every `train=True` call applied with it
    mutable advances as torch does (the trainer threads it through every D call of a step, in the
    official order, as `disc_state`); they never change a logit. Under jit with the batch sharded
    over devices the mean/variance are computed over the whole global batch (SyncBatchNorm
    semantics); set `batch_norm_group_size` to the official per-GPU batch to normalise
    contiguous groups of that many images separately instead (DDP semantics; with the batch
    sharded in contiguous blocks the groups stay device-local). Call the discriminator on real
    and fake images separately, as the official code does: concatenating them into one batch
    would mix their statistics. `norm="group"` (GroupNorm(32), biased convs) is a tok1d option
    for BatchNorm-free training; the official `norm: group` path would crash
    (`nn.GroupNorm(C)` lacks its second argument).

Official PyTorch state dicts of both become params (and PatchGAN "batch_stats") through
`tok1d.weights.convert.discriminator`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.layers.cnn import TORCH_CONV_INIT, Conv, depthwise_conv, group_norm
from tok1d.layers.transformer import logical

Dtype = Any

# Logical axis names of a conv kernel (kh, kw, in, out) and of its bias / norm params.
CONV = ("conv_h", "conv_w", "conv_in", "conv_out")
CONV_TO_ONE = ("conv_h", "conv_w", "conv_in", None)  # width-1 logit convs: never shard `out`.


# --------------------------------------------------------------------------- initialisers

# PyTorch's nn.Conv2d default kernel init (shared with the tokenizers' CNNs).
torch_default_kernel_init = TORCH_CONV_INIT


def torch_default_bias_init(fan_in: int):
    """PyTorch's default conv / linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def _normal_around(mean: float, stddev: float):
    def init(key, shape, dtype=jnp.float32):
        return (mean + stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


# --------------------------------------------------------------------------- functional pieces

def adaptive_max_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """PyTorch `AdaptiveMaxPool2d` on NHWC: bin i of an axis of length n covers
    [floor(i n / out), ceil((i + 1) n / out)). Exact for every size (bins may overlap or repeat
    when n is not a multiple of out, including n < out)."""
    for axis, out in zip((1, 2), output_size):
        n = x.shape[axis]
        if n == out:
            continue
        if n % out == 0:
            k = n // out
            x = jnp.max(x.reshape(x.shape[:axis] + (out, k) + x.shape[axis + 1:]), axis=axis + 1)
            continue
        # One gather: every bin reads `longest` indices, clamped to its last element (repeats
        # do not change a max).
        starts = [(i * n) // out for i in range(out)]
        ends = [-((-(i + 1) * n) // out) for i in range(out)]
        longest = max(e - s for s, e in zip(starts, ends))
        idx = np.array([[min(s + j, e - 1) for j in range(longest)]
                        for s, e in zip(starts, ends)], np.int32)
        g = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)
        x = jnp.max(g.reshape(x.shape[:axis] + (out, longest) + x.shape[axis + 1:]), axis=axis + 1)
    return x


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def blur_downsample(x: jax.Array, kernel: Sequence[float] = (1, 3, 3, 1)) -> jax.Array:
    """TiTok's `BlurBlock` on NHWC: zero padding computed as for a 4-tap kernel at stride 2
    (the official code hard-codes k=4), then a depthwise conv with the normalised outer-product
    kernel at stride 2."""
    a = np.asarray(kernel, np.float64)
    k2 = np.outer(a, a)
    k2 = k2 / k2.sum()
    channels = x.shape[-1]
    w = jnp.asarray(np.broadcast_to(k2[:, :, None, None], k2.shape + (1, channels)), x.dtype)
    pads = (_same_pad(x.shape[1], 4, 2), _same_pad(x.shape[2], 4, 2))
    return depthwise_conv(x, w, strides=(2, 2), padding=pads)


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.AvgPool2d(2, 2)` (floor mode) on NHWC, the official non-blur option."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class BatchNorm(nn.Module):
    """BatchNorm that always uses the statistics of the current batch (PyTorch train mode).
    Statistics in float32, biased variance, two-pass.

    `group_size`: normalise contiguous groups of this many examples separately (ghost batch
    norm; emulates per-GPU BatchNorm under DDP). None: the whole (global) batch.

    `track_running_stats`: also keep PyTorch's running averages (never read: train mode), in
    the "batch_stats" collection: `mean`, `var` and `count` (= `running_mean`, `running_var`,
    `num_batches_tracked`), updated by every `train` call applied with "batch_stats" mutable as torch
    does (momentum 0.1, the unbiased batch variance); a call without it mutable leaves them
    alone. With groups, the first group's statistics (DDP rank 0, whose buffers a checkpoint
    saves) feed them."""

    epsilon: float = 1e-5
    group_size: Optional[int] = None
    scale_init: Any = nn.initializers.ones
    track_running_stats: bool = False
    momentum: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", logical(self.scale_init, ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros, ("norm",)), (c,),
                          self.param_dtype)
        b = x.shape[0]
        g = self.group_size or b
        if b % g:
            raise ValueError(f"batch {b} is not a multiple of batch_norm_group_size {g}")
        xf = x.astype(jnp.float32).reshape((b // g, g) + x.shape[1:])
        axes = tuple(range(1, xf.ndim - 1))
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        if self.track_running_stats and self.is_mutable_collection("batch_stats"):
            self._running_stats(mean[0].reshape(c), var[0].reshape(c), xf[0].size // c, train)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.reshape(x.shape).astype(self.dtype)

    def _running_stats(self, mean: jax.Array, var: jax.Array, n: int, train: bool) -> None:
        """Creates the running averages (at init) and advances them (train calls)."""
        c = mean.shape[0]
        r_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        r_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        count = self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
        if self.is_initializing() or not train:
            return
        m = jnp.float32(self.momentum)
        unbiased = var * jnp.float32(n / max(n - 1, 1))
        r_mean.value = (1 - m) * r_mean.value + m * jax.lax.stop_gradient(mean)
        r_var.value = (1 - m) * r_var.value + m * jax.lax.stop_gradient(unbiased)
        count.value = count.value + 1


# --------------------------------------------------------------------------- TiTok / MaskBit

class TiTokDiscriminator(nn.Module):
    """TiTok / MaskBit `NLayerDiscriminator` (see the module docstring). Input (B, H, W, C) in
    [0, 1]; output (B, pool_size, pool_size, 1) float32 logits."""

    hidden_channels: int = 128
    num_stages: int = 3
    blur_kernel: Optional[Sequence[float]] = (1, 3, 3, 1)  # None: AvgPool 2x2 (blur_resample=False)
    num_groups: int = 32
    norm_epsilon: float = 1e-5
    negative_slope: float = 0.1
    pool_size: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def pixel_range(self) -> tuple[float, float]:
        """The input range of the official loss (TiTok's pixel range)."""
        return (0.0, 1.0)

    def _conv(self, x: jax.Array, features: int, k: int, name: str,
              names: tuple = CONV) -> jax.Array:
        fan_in = x.shape[-1] * k * k
        return Conv(features, (k, k), padding="SAME", use_bias=True, dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       kernel_init=logical(torch_default_kernel_init, names),
                       bias_init=logical(torch_default_bias_init(fan_in), names[-1:]),
                       name=name)(x)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no state: the same function in both modes
        if self.num_stages < 1:
            raise ValueError("TiTokDiscriminator needs at least one stage.")
        act = lambda t: nn.leaky_relu(t, self.negative_slope)  # noqa: E731
        x = images.astype(self.dtype)
        x = act(self._conv(x, self.hidden_channels, 5, "conv_in"))
        for i in range(self.num_stages):
            width = self.hidden_channels * 2 ** i
            x = self._conv(x, width, 3, f"stage_{i}_conv")
            x = _avg_pool_2x2(x) if self.blur_kernel is None else blur_downsample(
                x, self.blur_kernel)
            x = group_norm(self.dtype, self.param_dtype, f"stage_{i}_norm",
                           num_groups=self.num_groups, epsilon=self.norm_epsilon)(x)
            x = act(x)
        x = adaptive_max_pool(x, (self.pool_size, self.pool_size))
        x = act(self._conv(x, x.shape[-1], 1, "logits_hidden"))
        x = self._conv(x, 1, 5, "logits_out", names=CONV_TO_ONE)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------- PatchGAN

class PatchGANDiscriminator(nn.Module):
    """pix2pix PatchGAN `NLayerDiscriminator` of LlamaGen / GigaTok (see the module docstring).
    Input (B, H, W, C) in [-1, 1]; output (B, H', W', 1) float32 logits (30x30 at 256)."""

    base_channels: int = 64      # ndf
    num_layers: int = 3          # n_layers
    kernel_size: int = 4         # kw
    max_mult: int = 8
    norm: str = "batch"          # "batch" (official) | "group" (tok1d option, GroupNorm(32))
    batch_norm_group_size: Optional[int] = None
    track_running_stats: bool = False  # BatchNorm running averages in "batch_stats" (GigaTok)
    norm_epsilon: float = 1e-5
    negative_slope: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def pixel_range(self) -> tuple[float, float]:
        """The input range of the official loss (LlamaGen / GigaTok pixel range)."""
        return (-1.0, 1.0)

    def _conv(self, x: jax.Array, features: int, stride: int, use_bias: bool, name: str,
              names: tuple = CONV) -> jax.Array:
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        return Conv(features, (k, k), strides=(stride, stride), padding=((1, 1), (1, 1)),
                       use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=logical(nn.initializers.normal(0.02), names),
                       bias_init=logical(torch_default_bias_init(fan_in), names[-1:]),
                       name=name)(x)

    def _norm(self, x: jax.Array, name: str, train: bool) -> jax.Array:
        if self.norm == "batch":
            return BatchNorm(epsilon=self.norm_epsilon, group_size=self.batch_norm_group_size,
                             scale_init=_normal_around(1.0, 0.02),
                             track_running_stats=self.track_running_stats, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)(x, train=train)
        if self.norm == "group":
            return group_norm(self.dtype, self.param_dtype, name,
                              epsilon=self.norm_epsilon)(x)
        raise ValueError(f"Unknown PatchGAN norm {self.norm!r}; expected 'batch' or 'group'.")

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """`train`: advance the BatchNorm running averages (with `track_running_stats`, applied
        with "batch_stats" mutable); the logits normalise with batch statistics either way."""
        act = lambda t: nn.leaky_relu(t, self.negative_slope)  # noqa: E731
        ndf, bias = self.base_channels, self.norm != "batch"
        x = act(self._conv(images.astype(self.dtype), ndf, 2, True, "conv_0"))
        for n in range(1, self.num_layers + 1):
            last = n == self.num_layers
            width = ndf * min(2 ** n, self.max_mult)
            x = self._conv(x, width, 1 if last else 2, bias, f"conv_{n}")
            x = act(self._norm(x, f"norm_{n}", train))
        x = self._conv(x, 1, 1, True, "conv_out", names=CONV_TO_ONE)
        return x.astype(jnp.float32)
