"""GigaTok's DINO discriminator (`tokenizer/tokenizer_image/discriminator_dino.py`, `DinoDisc`,
trained by `configs/vq/VQ_BL256_dino_disc.yaml`: `disc_type: dinodisc`) in Flax Linen, NHWC.

What one call computes (images in [-1, 1], float32 throughout the preprocessing):

  1. ImageNet normalisation written as x * (0.5 / std) + (0.5 - mean) / std.
  2. Resize to `img_size` (224): when H > 224 and W > 224, with probability 1/2 (one coin for the
     whole batch) a random 224x224 crop at one offset for the whole batch (torchvision
     `RandomCrop`); otherwise `F.interpolate(size=224, mode="area")` if H > 224 (adaptive
     average pooling) and `mode="bicubic"` (a=-0.75, no antialias, align_corners=False) if not.
     The coin and the offset come from the `"crop"` rng stream (field `random_crop`; with
     random_crop=False the area / bicubic resize is always used and no rng is needed). The
     recipe trains at 256 px, so half of the calls crop and half area-downsample.
  3. A frozen DINO (v1) ViT-S/16 trunk (`tok1d.models.frozen.dinov2.DinoV2` with patch 16, no
     LayerScale, LayerNorm eps 1e-6, qkv bias, and -- as GigaTok's `MLPNoDrop` -- the tanh GELU,
     not DINO's exact GELU). Its final norm is never used. The official loader zeroes the key
     part of every qkv bias (a no-op for softmax attention); `tok1d.weights.convert.dino_disc` does the
     same.
  4. Taps: the tokens entering block 0 (patch embedding + position table) and the output of
     every block in `key_depths` (2, 5, 8, 11), each read out as patch tokens + cls token
     (B, 196, 384), in float32.
  5. One head per tap (5 heads, channels-last Conv1d over the 196 tokens in raster order):
        SpectralConv1d(C, C, k=1) -> BatchNormLocal -> LeakyReLU(0.2)
        residual: (block(h) + h) / sqrt(2), block = SpectralConv1d(C, C, k=9, circular
                  padding 4) -> BatchNormLocal -> LeakyReLU(0.2)
        SpectralConv1d(C, 1, k=1)
     BatchNormLocal: no running statistics; the batch is split into G = ceil(B / 8) contiguous
     groups of B / G images (B must be divisible by G), each normalised over (images, tokens) per
     channel with biased variance, eps 1e-6, in float32, then an affine scale (init 1) and bias
     (init 0). Under data parallelism the groups stay device-local when the per-device batch is a
     multiple of the group size.
  6. Output: the per-tap logits (B, 196) concatenated -> (B, 5 * 196) float32.

Variables (what `init` returns and `apply` needs):
  params["trunk"]   the frozen ViT (21.7M; converted from `dino_deitsmall16_pretrain.pth` by
                    `tok1d.weights.convert.dino_disc`). Gradients never reach it (`stop_gradient` on its
                    params; gradients still flow through it to the images), but it must also be
                    kept out of the optimizer, or weight decay would change it: use
                    `trunk_frozen_labels(params)` with `optax.multi_transform` (label "frozen" ->
                    `optax.set_to_zero()`), or split params into trunk / rest before the update.
  params["heads_i"] the trainable heads (7,386,245 parameters at the default size, the
                    official "7.39M"), PyTorch default init (U(+-1/sqrt(fan_in)) kernels and
                    biases). With `scan_heads`: params["heads"], every leaf stacked along a
                    leading head axis (logical axis "layers"), head i at index i.
  "spectral"        collection of the spectral-norm state: heads_i/.../{u, v} (stacked under
                    "heads" with `scan_heads`), torch's `weight_u`
                    (out,) and `weight_v` (in * k,) (in the torch (in, k) flattening order),
                    initialised as normalised N(0, 1) draws from the "params" rng.

Spectral norm (torch `SpectralNorm`, one power iteration, eps 1e-12): the weight is divided by
sigma = u . (W v), W the (out, in * k) matrix of the kernel, u and v treated as constants
(gradients flow through W in both numerator and sigma). With `train=True` a power iteration runs
first (v = normalize(W^T u), u = normalize(W v)) and the new u, v are written back: apply with
`mutable=["spectral"]`. With `train=False` the stored u, v are used as they are (torch eval
mode); nothing is written. The official trainer keeps the discriminator in train mode, so every
call -- the generator's call on the fake batch and the discriminator step's calls on fake and
real -- advances the power iteration. The init call does not iterate (torch's registration
does not either).

How a trainer calls it (GigaTok recipe: hinge losses, DiffAug on both inputs):

    model = DinoDiscriminator()
    model, variables = build_dino_discriminator(
        tok1d.weights.convert.dino_disc.convert_file(trunk_file, model), jax.random.key(0))
    x = tok1d.objectives.augment.diff_augment(aug_key, images_pm1)            # [-1, 1], (B, 256, 256, 3)
    logits, upd = model.apply({"params": params, "spectral": spectral}, x, train=True,
                              rngs={"crop": crop_key}, mutable=["spectral"])
    spectral = upd["spectral"]

Parity with the official code (measured once, not part of the test suite): the official
`DinoDisc(norm_type="bn")` and `DiffAug` files were run unmodified on CPU (float32) from a scratch
copy, with random trunk weights in the official key layout (converted by
`tok1d.weights.convert.dino_disc.convert_trunk`) and the official heads' own init (converted by
`convert_heads`), B = 16, consecutive train-mode calls; max |diff| / max |ref|:
  taps (trunk readouts, 256 px area path)            <= 1.3e-6
  logits, eval mode, area path                          2.9e-6
  logits, train mode: area 2.6e-6, crop (same offset) 3.0e-6, 224 px (no resize) 2.9e-6,
    192 px bicubic upsampling 2.3e-5 (torch's float32 bicubic itself is 1.8e-5 from float64;
    ours 1.7e-7)
  u, v after each train-mode call                    <= 5.6e-7
  DiffAug on identical uniforms (prob 1, 0.5, -1)    <= 3.1e-7
  loss value: hinge 7.3e-8, mean squared logit 2.4e-7
Gradients are limited by the heads' LeakyReLU kinks (and the hinge's), which make them
discontinuous in the inputs: perturbing the taps by 1e-7 relative moves the float64 head-kernel
gradient by 1.7e-3. Measured: end to end, image gradients 4e-4..7e-4, head kernels up to 1.2e-2;
heads alone on identical taps 5e-5 (squared-logit loss) / 1.6e-3 (hinge); with the LeakyReLU
slope set to 1 on both sides (no kinks) 1.0e-5 for kernels and norm affines and 1.1e-6 for the
tap gradients, i.e. the implementations agree and the spread is the function's own.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.layers.cnn import TORCH_CONV_INIT
from tok1d.models.frozen.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DinoV2, _resize_hw, bicubic_matrix
from tok1d.models.discriminator import BatchNorm, torch_default_bias_init
from tok1d.layers import transformer
from tok1d.layers.transformer import logical

Dtype = Any

SPECTRAL = "spectral"   # variable collection of the spectral-norm u / v vectors
TRUNK = "trunk"         # params[TRUNK]: the frozen ViT
HEADS = "heads"         # params[f"{HEADS}_{i}"] (or params[HEADS], stacked): the heads
CROP_RNG = "crop"       # rng stream of the random-crop coin and offset


# --------------------------------------------------------------------------- preprocessing

def normalize_pm1(images: jax.Array) -> jax.Array:
    """[-1, 1] -> ImageNet-normalised, as the official x * (0.5 / s) + (0.5 - m) / s (float32
    constants computed like torch's)."""
    m = np.asarray(IMAGENET_MEAN, np.float32)
    s = np.asarray(IMAGENET_STD, np.float32)
    scale = np.float32(0.5) / s
    shift = (np.float32(0.5) - m) / s
    return images.astype(jnp.float32) * jnp.asarray(scale) + jnp.asarray(shift)


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of PyTorch's `F.interpolate(mode="area")` = adaptive average pooling:
    output i averages inputs [floor(i in / out), ceil((i + 1) in / out))."""
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        lo = (i * in_size) // out_size
        hi = -((-(i + 1) * in_size) // out_size)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def resize_to(x: jax.Array, size: int) -> jax.Array:
    """The official non-crop resize of NHWC `x` to size x size: area if H > size, else bicubic
    (the identity when the image already has that size)."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x.astype(jnp.float32)
    if h > size:
        return _resize_hw(x, area_matrix(h, size), area_matrix(w, size), 1)
    return _resize_hw(x, bicubic_matrix(h, size), bicubic_matrix(w, size), 1)


def crop_or_resize(x: jax.Array, size: int, use_crop: jax.Array, top: jax.Array,
                   left: jax.Array) -> jax.Array:
    """`x[:, top:top+size, left:left+size]` where `use_crop`, else `resize_to(x, size)` (needs
    H > size and W > size)."""
    b, _, _, c = x.shape
    x = x.astype(jnp.float32)
    return jax.lax.cond(
        use_crop,
        lambda t: jax.lax.dynamic_slice(t, (0, top, left, 0), (b, size, size, c)),
        lambda t: resize_to(t, size), x)


def preprocess(images: jax.Array, size: int, crop_key: Optional[jax.Array]) -> jax.Array:
    """Steps 1-2 of the module docstring; `crop_key` None disables the random crop."""
    x = normalize_pm1(images)
    h, w = x.shape[1:3]
    if crop_key is None or not (h > size and w > size):
        return resize_to(x, size)
    return crop_or_resize(x, size, *crop_draw(crop_key, h, w, size))


def crop_draw(key: jax.Array, h: int, w: int, size: int
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(use_crop, top, left): a fair coin and a uniform offset in [0, h - size] x [0, w - size].

    One threefry draw of 3 words: every split / uniform / randint is a threefry call of its
    own, which on CPU compiles to a while loop of a few dozen kernels, and a train step calls
    this 3 times. The coin is the top bit; the offsets are residues, whose bias towards small
    offsets is below (h - size + 1) / 2**32."""
    coin, top, left = jax.random.bits(key, (3,), jnp.uint32)
    return (coin < jnp.uint32(2 ** 31),
            (top % jnp.uint32(h - size + 1)).astype(jnp.int32),
            (left % jnp.uint32(w - size + 1)).astype(jnp.int32))


# --------------------------------------------------------------------------- heads

def _l2_normalize(v: jax.Array, eps: float) -> jax.Array:
    return v / jnp.maximum(jnp.linalg.norm(v), eps)


class SpectralConv1d(nn.Module):
    """Conv1d over (B, L, C) with torch `SpectralNorm` on its weight (see the module docstring).
    Kernel (k, in, out), bias (out,); "same" length, circular padding k // 2 (for k = 1 no
    padding). u, v live in the `spectral` collection."""

    features: int
    kernel_size: int = 1
    eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k, c_in, c_out = self.kernel_size, x.shape[-1], self.features
        out_axis = "conv_out" if c_out > 1 else None  # never shard a width-1 logit conv
        kernel = self.param("kernel", logical(TORCH_CONV_INIT, ("conv_w", "conv_in", out_axis)),
                            (k, c_in, c_out), self.param_dtype)
        bias = self.param("bias", logical(torch_default_bias_init(c_in * k), (out_axis,)),
                          (c_out,), self.param_dtype)
        normal = lambda n: _l2_normalize(  # noqa: E731
            jax.random.normal(self.make_rng("params"), (n,), jnp.float32), self.eps)
        u = self.variable(SPECTRAL, "u", normal, c_out)
        v = self.variable(SPECTRAL, "v", normal, c_in * k)
        # torch's (out, in, k) weight flattened to (out, in * k)
        w_mat = jnp.transpose(kernel.astype(jnp.float32), (2, 1, 0)).reshape(c_out, c_in * k)
        hi = jax.lax.Precision.HIGHEST
        u_vec, v_vec = u.value, v.value
        if train and not self.is_initializing():
            if not self.is_mutable_collection(SPECTRAL):
                raise ValueError(f"train=True updates the spectral-norm state: apply with "
                                 f"mutable=[{SPECTRAL!r}]")
            w_const = jax.lax.stop_gradient(w_mat)
            v_vec = _l2_normalize(jnp.dot(w_const.T, u_vec, precision=hi), self.eps)
            u_vec = _l2_normalize(jnp.dot(w_const, v_vec, precision=hi), self.eps)
            u.value, v.value = u_vec, v_vec
        u_vec, v_vec = jax.lax.stop_gradient(u_vec), jax.lax.stop_gradient(v_vec)
        sigma = jnp.dot(u_vec, jnp.dot(w_mat, v_vec, precision=hi), precision=hi)
        w = (kernel.astype(jnp.float32) / sigma).astype(self.dtype)
        x = x.astype(self.dtype)
        if k > 1:
            x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)), mode="wrap")
        y = jax.lax.conv_general_dilated(x, w, (1,), "VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + bias.astype(self.dtype)


def virtual_group_size(batch: int, virtual_batch_size: int) -> int:
    """Images per BatchNormLocal group: B / ceil(B / virtual_batch_size) (must divide B)."""
    groups = -(-batch // virtual_batch_size)
    if batch % groups:
        raise ValueError(f"BatchNormLocal cannot split a batch of {batch} into {groups} equal "
                         f"groups (virtual batch size {virtual_batch_size})")
    return batch // groups


class HeadBlock(nn.Module):
    """SpectralConv1d(C, C, k) -> BatchNormLocal -> LeakyReLU (the official `make_block`)."""

    kernel_size: int
    virtual_batch_size: int = 8
    norm_eps: float = 1e-6
    negative_slope: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = SpectralConv1d(x.shape[-1], self.kernel_size, name="conv", **kw)(x, train)
        x = BatchNorm(epsilon=self.norm_eps,
                      group_size=virtual_group_size(x.shape[0], self.virtual_batch_size),
                      name="norm", **kw)(x)
        return nn.leaky_relu(x, self.negative_slope)


class DinoDiscHead(nn.Module):
    """One tap's head: k=1 block, residual k-block scaled by 1/sqrt(2), k=1 conv to one logit
    per token. (B, L, C) -> (B, L) float32."""

    kernel_size: int = 9
    virtual_batch_size: int = 8
    norm_eps: float = 1e-6
    negative_slope: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(virtual_batch_size=self.virtual_batch_size, norm_eps=self.norm_eps,
                  negative_slope=self.negative_slope, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        h = HeadBlock(1, name="block_in", **kw)(x, train)
        h = (HeadBlock(self.kernel_size, name="block_res", **kw)(h, train) + h) \
            * (1.0 / math.sqrt(2.0))
        y = SpectralConv1d(1, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="logits")(h, train)
        return y[..., 0].astype(jnp.float32)


class _ScannedHead(DinoDiscHead):
    """`DinoDiscHead` as an `nn.scan` body over the taps: (carry, tap, train) -> (carry,
    logits); the carry is unused."""

    @nn.compact
    def __call__(self, carry, x, train=False):  # type: ignore[override]
        return carry, super().__call__(x, train)


# --------------------------------------------------------------------------- discriminator

def _stop_gradient(tree: Any) -> Any:
    return jax.tree.map(jax.lax.stop_gradient, tree)


# DinoV2 whose params are constants for autodiff (the frozen trunk). It cannot create params
# (map_variables' init=True would re-run the trunk whenever any collection is mutable), so `init`
# builds the plain DinoV2 under the same name; the param paths are identical.
FrozenViT = nn.map_variables(DinoV2, "params", trans_in_fn=_stop_gradient)


class DinoDiscriminator(nn.Module):
    """GigaTok's DINO discriminator (see the module docstring). `__call__(images, train=False)`:
    NHWC images in [-1, 1] (any size; 256 in the recipe) -> (B, (1 + #taps) * N) float32 logits,
    N = (img_size / patch_size)^2. Needs rng "crop" when random_crop and H, W > img_size, and
    mutable=["spectral"] when train=True. Smaller trunks (depth, width, img_size) are accepted
    for tests."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    key_depths: Sequence[int] = (2, 5, 8, 11)
    kernel_size: int = 9
    virtual_batch_size: int = 8
    norm_eps: float = 1e-6
    negative_slope: float = 0.2
    random_crop: bool = True
    attention_impl: Optional[str] = None
    scan: bool = False  # the trunk's blocks as one nn.scan (`DinoV2.scan`; params stacked)
    # The heads (identical, one per tap) as one nn.scan: one head compiled instead of
    # 1 + #taps; params and spectral state stacked under "heads".
    scan_heads: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def pixel_range(self) -> tuple[float, float]:
        """The input range the pretrained trunk expects (trainers convert to it)."""
        return (-1.0, 1.0)

    @property
    def taps(self) -> tuple[int, ...]:
        """Block indices whose outputs are tapped (after the embedding tap)."""
        return tuple(sorted({int(d) for d in self.key_depths if int(d) < self.depth}))

    def head_kwargs(self) -> dict[str, Any]:
        """`DinoDiscHead` kwargs of every head."""
        return dict(kernel_size=self.kernel_size, virtual_batch_size=self.virtual_batch_size,
                    norm_eps=self.norm_eps, negative_slope=self.negative_slope,
                    dtype=self.dtype, param_dtype=self.param_dtype)

    def trunk_kwargs(self) -> dict[str, Any]:
        """`DinoV2` kwargs of the frozen trunk."""
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    patch_size=self.patch_size, img_size=self.img_size, mlp_ratio=self.mlp_ratio,
                    layer_scale_init=None, norm_eps=self.norm_eps, qkv_bias=True,
                    mlp_activation="gelu_tanh", attention_impl=self.attention_impl,
                    scan=self.scan, dtype=self.dtype, param_dtype=self.param_dtype)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False,
                 return_taps: bool = False) -> jax.Array:
        """Logits (B, (1 + #taps) * N); with return_taps, also the list of taps (B, N, D)
        float32 (patch tokens + cls token, steps 1-4)."""
        h, w = images.shape[1:3]
        needs_key = self.random_crop and h > self.img_size and w > self.img_size
        crop_key = self.make_rng(CROP_RNG) if needs_key else None
        x = preprocess(images, self.img_size, crop_key)
        trunk_cls = DinoV2 if self.is_initializing() else FrozenViT
        out = trunk_cls(**self.trunk_kwargs(), name=TRUNK)(x)
        tokens = [out["embeddings"]] + [out["hidden_states"][d] for d in self.taps]
        taps = [t[:, 1:].astype(jnp.float32) + t[:, :1].astype(jnp.float32) for t in tokens]
        if self.scan_heads:
            heads = transformer.scan_stack(_ScannedHead, len(taps), num_args=1, per_layer_args=1,
                                           collections=(SPECTRAL,))
            _, stacked = heads(**self.head_kwargs(), name=HEADS)(None, jnp.stack(taps), train)
            logits = jnp.moveaxis(stacked, 0, 1).reshape(stacked.shape[1], -1)
        else:
            logits = jnp.concatenate([
                DinoDiscHead(**self.head_kwargs(), name=f"{HEADS}_{i}")(t, train)
                for i, t in enumerate(taps)], axis=1)
        return (logits, taps) if return_taps else logits


# --------------------------------------------------------------------------- helpers

def trunk_frozen_labels(params: Mapping[str, Any]) -> dict[str, Any]:
    """Pytree of labels matching `params`: "frozen" under params["trunk"], "trainable"
    elsewhere (for `optax.multi_transform`)."""
    return {k: jax.tree.map(lambda _: "frozen" if k == TRUNK else "trainable", v)
            for k, v in params.items()}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_head(head: DinoDiscHead, rng: jax.Array, shape: tuple[int, ...]) -> Any:
    return head.init({"params": rng}, jnp.zeros(shape, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _init_trunk(trunk: DinoV2, rng: jax.Array) -> Any:
    return trunk.init({"params": rng}, jnp.zeros((1, trunk.img_size, trunk.img_size, 3)))


def init_variables(model: DinoDiscriminator, rng: jax.Array,
                   trunk: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Random `{"params", "spectral"}` of `model` (unboxed arrays), the same tree as
    `model.init` gives, built per part: one compiled head init reused for every head (keys
    split from `rng`), and the trunk from `trunk` (converted params) or, when None, a random
    DinoV2 init (tests)."""
    k_trunk, *k_heads = jax.random.split(rng, len(model.taps) + 2)
    head = DinoDiscHead(**model.head_kwargs())
    shape = (model.virtual_batch_size, (model.img_size // model.patch_size) ** 2,
             model.embed_dim)
    params: dict[str, Any] = {}
    spectral: dict[str, Any] = {}
    heads = [nn.unbox(_init_head(head, key, shape)) for key in k_heads]
    if model.scan_heads:  # the same heads, stacked
        heads = [jax.tree.map(lambda *xs: jnp.stack(xs), *heads)]
    for i, v in enumerate(heads):
        name = HEADS if model.scan_heads else f"{HEADS}_{i}"
        params[name], spectral[name] = v["params"], v[SPECTRAL]
    if trunk is None:
        trunk = nn.unbox(_init_trunk(DinoV2(**model.trunk_kwargs()), k_trunk))["params"]
    params[TRUNK] = jax.tree.map(jnp.asarray, dict(trunk))
    return {"params": params, SPECTRAL: spectral}


def build_dino_discriminator(trunk: Optional[Mapping[str, Any]] = None,
                             rng: Optional[jax.Array] = None,
                             **fields: Any) -> tuple[DinoDiscriminator, dict[str, Any]]:
    """(model, variables). `trunk`: the converted trunk param tree (`tok1d.weights.convert.
    dino_disc.convert_file` of `dino_deitsmall16_pretrain.pth`), or None for a random trunk
    (tests). The heads and the spectral state are initialised from `rng` (default key 0).
    `fields` override `DinoDiscriminator` fields."""
    model = DinoDiscriminator(**fields)
    return model, init_variables(model, jax.random.key(0) if rng is None else rng, trunk)
