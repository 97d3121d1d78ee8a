"""DINOv2 ViT (facebookresearch/dinov2 `DinoVisionTransformer`) in Flax, as a frozen feature
extractor -- the teacher of GigaTok's semantic regularisation.

Architecture (hub `dinov2_vit{s,b,l,g}14`): 14x14 patch conv, class token, optional register
tokens, learned absolute position table for a 37x37 grid (518 px) that is bicubically resampled to
the input grid, pre-norm blocks with LayerScale
    x = x + ls1 * attn(norm1(x));  x = x + ls2 * ffn(norm2(x))
(LayerNorm eps 1e-6, fused qkv with bias, GELU MLP or -- ViT-g -- SwiGLU), final LayerNorm.

Inputs are NHWC images already normalised with the ImageNet mean/std (see `preprocess_gigatok`
for GigaTok's [-1, 1] -> 224 px pipeline). Only the inference path is ported: iBOT masking (the
`mask_token`), the DINO/iBOT heads and stochastic depth are training-only and absent.

Resampling helpers reproduce PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`
exactly as separable weight matrices (built in NumPy at trace time, so shapes stay static):
  * antialias=False: cubic kernel a=-0.75, 4 taps clamped at the edges; sampling positions from
    `scale` (= 1/scale_factor when a scale factor is passed, else in/out).
  * antialias=True: cubic kernel a=-0.5 widened by the down-scale factor, weights renormalised
    over in-image taps (PIL style) -- what timm's `resample_abs_pos_embed` uses.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.layers import transformer
from tok1d.layers.transformer import logical

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (embed_dim, depth, num_heads, ffn) of the official hub models (patch 14, 518 px).
DINOV2_SIZES: dict[str, tuple[int, int, int, str]] = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),  # hub ffn_layer="swiglufused"
}


def dinov2_kwargs(name: str, registers: bool = False, **overrides: Any) -> dict[str, Any]:
    """`DinoV2` kwargs of the hub model `dinov2_{name}` (`name` in DINOV2_SIZES, with or without
    the "dinov2_" prefix / "_reg" suffix). The register variants use 4 register tokens and
    antialiased pos-embed interpolation without the 0.1 offset, as the hub builds them."""
    key = name.removeprefix("dinov2_")
    if key.endswith("_reg"):
        key, registers = key[:-4], True
    if key not in DINOV2_SIZES:
        raise ValueError(f"Unknown DINOv2 size {name!r}; known: {sorted(DINOV2_SIZES)}.")
    d, depth, heads, ffn = DINOV2_SIZES[key]
    kw: dict[str, Any] = dict(embed_dim=d, depth=depth, num_heads=heads, ffn=ffn)
    if registers:
        kw.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    kw.update(overrides)
    return kw


def kwargs_from_fixture_meta(meta: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """`DinoV2` kwargs from the golden fixture's `meta_json` (hub kwargs + reduced sizes)."""
    hub = meta["hub_kwargs"]
    if hub.get("block_chunks", 0) not in (0, None):
        raise ValueError("block_chunks > 0 is not supported (only changes key names upstream).")
    ffn = {"mlp": "mlp", "swiglu": "swiglu", "swiglufused": "swiglu"}[hub["ffn_layer"]]
    kw = dict(embed_dim=meta["embed_dim"], depth=meta["depth"], num_heads=meta["num_heads"],
              patch_size=hub["patch_size"], img_size=hub["img_size"],
              mlp_ratio=meta.get("mlp_ratio", 4), ffn=ffn,
              layer_scale_init=hub["init_values"],
              num_register_tokens=hub["num_register_tokens"],
              interpolate_antialias=hub["interpolate_antialias"],
              interpolate_offset=hub["interpolate_offset"],
              norm_eps=meta.get("layer_norm_eps", 1e-6))
    kw.update(overrides)
    return kw


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """Hidden width of the official `SwiGLUFFNFused` (2/3 of the MLP width, rounded up to 8)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


# --------------------------------------------------------------------------- resampling

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, scale: Optional[float] = None,
                   antialias: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 matrix of PyTorch's 1-D bicubic resampling
    (align_corners=False). `scale` is the source step per output pixel: in/out by default,
    1/scale_factor when the caller passes `scale_factor` to F.interpolate."""
    scale = in_size / out_size if scale is None else float(scale)
    m = np.zeros((out_size, in_size), np.float64)
    if not antialias:
        for i in range(out_size):
            real = scale * (i + 0.5) - 0.5
            base = math.floor(real)
            t = real - base
            taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
            for k, w in enumerate(taps):
                m[i, min(max(base - 1 + k, 0), in_size - 1)] += w
        return m
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * inv, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def _resize_hw(x: jax.Array, mh: np.ndarray, mw: np.ndarray, h_axis: int) -> jax.Array:
    """Applies (out_h, in_h), (out_w, in_w) matrices to axes h_axis, h_axis + 1 of x (float32,
    full-precision matmuls)."""
    hi = jax.lax.Precision.HIGHEST
    x = jnp.moveaxis(x.astype(jnp.float32), (h_axis, h_axis + 1), (-2, -1))
    x = jnp.einsum("...hw,oh->...ow", x, jnp.asarray(mh, jnp.float32), precision=hi)
    x = jnp.einsum("...hw,pw->...hp", x, jnp.asarray(mw, jnp.float32), precision=hi)
    return jnp.moveaxis(x, (-2, -1), (h_axis, h_axis + 1))


def resize_bicubic(images: jax.Array, size: tuple[int, int], antialias: bool = False
                   ) -> jax.Array:
    """NHWC `F.interpolate(size=size, mode="bicubic", align_corners=False, antialias=...)`
    (float32 result)."""
    _, h, w, _ = images.shape
    return _resize_hw(images, bicubic_matrix(h, size[0], antialias=antialias),
                      bicubic_matrix(w, size[1], antialias=antialias), 1)


def preprocess_gigatok(images: jax.Array, size: int = 224) -> jax.Array:
    """GigaTok's `preprocess_raw_image(x, "dinov2")` on NHWC images in [-1, 1]: (x+1)/2, ImageNet
    mean/std normalisation, then bicubic resize to size x size (no antialias; skipped when the
    images already have that size, as F.interpolate would be the identity)."""
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    if x.shape[1:3] == (size, size):
        return x
    return resize_bicubic(x, (size, size), antialias=False)


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int],
                       num_prefix_tokens: int = 1, antialias: bool = True) -> np.ndarray:
    """timm `resample_abs_pos_embed` in NumPy: (prefix + M*M, D) or (1, prefix + M*M, D) table ->
    (prefix + gh*gw, D) (bicubic to `size`, antialiased by default; prefix rows kept). GigaTok
    resamples the DINOv2 teacher's 37x37 table to 16x16 this way once at load time."""
    pos = np.asarray(pos_embed, np.float64)
    if pos.ndim == 3:
        pos = pos[0]
    prefix, grid = pos[:num_prefix_tokens], pos[num_prefix_tokens:]
    m = math.isqrt(grid.shape[0])
    if m * m != grid.shape[0]:
        raise ValueError(f"position table with {grid.shape[0]} patch rows is not square")
    gh, gw = new_grid
    if (gh, gw) == (m, m):
        return np.asarray(pos, np.float32)
    mh = bicubic_matrix(m, gh, antialias=antialias)
    mw = bicubic_matrix(m, gw, antialias=antialias)
    g = np.einsum("oh,hwd,pw->opd", mh, grid.reshape(m, m, -1), mw).reshape(gh * gw, -1)
    return np.concatenate([prefix, g], axis=0).astype(np.float32)


def interpolate_pos_embed(pos_embed: jax.Array, grid_h: int, grid_w: int, offset: float,
                          antialias: bool) -> jax.Array:
    """DINOv2's `interpolate_pos_encoding` for a (1 + M*M, D) table and a grid_h x grid_w input.

    With offset != 0 the official code passes scale_factor = (grid + offset) / M, so the output
    size is floor(M * scale_factor) and sampling steps are M / (grid + offset), not M / grid."""
    n = pos_embed.shape[0] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table with {n} patch rows is not square")
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    scales: list[Optional[float]] = [None, None]
    if offset:
        for i, g in enumerate((grid_h, grid_w)):
            sf = float(g + offset) / m
            if math.floor(float(m) * sf) != g:
                raise ValueError(f"interpolate_offset {offset} gives size "
                                 f"{math.floor(m * sf)} != grid {g}")
            scales[i] = 1.0 / sf
    mh = bicubic_matrix(m, grid_h, scales[0], antialias)
    mw = bicubic_matrix(m, grid_w, scales[1], antialias)
    grid = _resize_hw(pos_embed[1:].reshape(m, m, -1), mh, mw, 0)
    return jnp.concatenate([pos_embed[:1].astype(jnp.float32),
                            grid.reshape(grid_h * grid_w, -1)], axis=0)


# --------------------------------------------------------------------------- modules

class LayerScale(nn.Module):
    """Per-channel residual-branch scale `gamma * x` (official `LayerScale`)."""

    init_value: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", logical(nn.initializers.constant(self.init_value), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(self.dtype)


class DinoBlock(nn.Module):
    """Pre-norm ViT block with LayerScale. `transformer.Block` has no LayerScale, so this composes
    `transformer.LayerNorm`, `transformer.Attention` (scale head_dim**-0.5, as the official fused-qkv
    attention) and `transformer.Mlp` (GELU fc1/fc2, or SwiGLU gate/up/fc2)."""

    num_heads: int
    mlp_dim: int
    ffn: str = "mlp"
    layer_scale_init: Optional[float] = 1.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    mlp_activation: str = "gelu"  # for ffn="mlp"; "gelu_tanh" for GigaTok's DINO discriminator
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(transformer.LayerNorm, epsilon=self.norm_eps, **kw)

        def scale(name):
            if self.layer_scale_init is None:
                return lambda y: y
            return LayerScale(self.layer_scale_init, name=name, **kw)

        x = transformer.constrain(x)
        y = transformer.Attention(self.num_heads, qkv_bias=self.qkv_bias,
                             implementation=self.attention_impl, name="attn",
                             **kw)(norm(name="norm1")(x))
        x = x + scale("ls1")(y)
        act = {"mlp": self.mlp_activation, "swiglu": "swiglu"}[self.ffn]
        y = transformer.Mlp(self.mlp_dim, activation=act, name="mlp", **kw)(norm(name="norm2")(x))
        x = x + scale("ls2")(y)
        return transformer.constrain(x)


class DinoV2(nn.Module):
    """DINOv2 ViT. `__call__(images)` takes NHWC images normalised with the ImageNet mean/std
    (H, W multiples of patch_size) and returns

      cls           (B, D)        CLS token after the final norm (x_norm_clstoken)
      patch_tokens  (B, N, D)     patch tokens after the final norm, raster order
                                  (x_norm_patchtokens)
      registers     (B, R, D)     register tokens after the final norm (R may be 0)
      prenorm       (B, 1+R+N, D) last block output before the final norm (x_prenorm)
      embeddings    (B, 1+R+N, D) the tokens entering block 0 (position table added)
      hidden_states the output of every block: a tuple of (B, 1+R+N, D), or with `scan` one
                    (depth, B, 1+R+N, D) array (`hidden_states[i]` reads block i either way)

    The position table covers a `pos_grid` x `pos_grid` patch grid (default img_size //
    patch_size = 37 for the official 518 px models); for other input grids it is resampled on the
    fly like the official `interpolate_pos_encoding`. GigaTok instead stores a table resampled
    to 16x16 (see `resample_pos_embed` / the converter's `pos_grid`), so 224 px inputs use it
    directly.
    """

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    img_size: int = 518
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (official "swiglufused"/"swiglu", ViT-g)
    layer_scale_init: Optional[float] = 1.0  # None: no LayerScale (init_values=None upstream)
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    num_register_tokens: int = 0
    pos_grid: Optional[int] = None
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    mlp_activation: str = "gelu"  # MLP activation (ffn="mlp"); see transformer.ACTIVATIONS
    attention_impl: Optional[str] = None
    # scan: the blocks as one `nn.scan` (params stacked under `blocks` with a leading "layers"
    # axis; one block compiled whatever the depth); hidden_states is then one stacked array.
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def table_grid(self) -> int:
        return self.pos_grid if self.pos_grid is not None else self.img_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        if self.ffn == "mlp":
            return int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":
            return swiglu_hidden_dim(self.embed_dim, self.mlp_ratio)
        raise ValueError(f"Unknown ffn {self.ffn!r}; expected 'mlp' or 'swiglu' (the official "
                         "'identity' FFN is not supported).")

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, Any]:
        b, h, w, _ = images.shape
        p, d = self.patch_size, self.embed_dim
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
        gh, gw = h // p, w // p
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=logical(transformer.default_kernel_init,
                                        ("conv_h", "conv_w", "conv_in", "embed")),
                    bias_init=logical(nn.initializers.zeros, ("embed",)),
                    name="patch_embed")(images.astype(self.dtype))
        x = x.reshape(b, gh * gw, d)
        init = logical(nn.initializers.normal(1e-6), (None, "embed"))
        cls = self.param("cls_token", init, (1, d), self.param_dtype)
        g = self.table_grid
        pos = self.param("pos_embed", logical(transformer.default_kernel_init, ("length", "embed")),
                         (1 + g * g, d), self.param_dtype)
        pos = interpolate_pos_embed(pos, gh, gw, self.interpolate_offset,
                                    self.interpolate_antialias)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        r = self.num_register_tokens
        if r:
            reg = self.param("register_tokens", init, (r, d), self.param_dtype)
            x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b, r, d)).astype(x.dtype),
                                 x[:, 1:]], axis=1)
        embeddings = x
        block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, ffn=self.ffn,
                     layer_scale_init=self.layer_scale_init, norm_eps=self.norm_eps,
                     qkv_bias=self.qkv_bias, mlp_activation=self.mlp_activation,
                     attention_impl=self.attention_impl, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        if self.scan:
            stack = transformer.scan_stack(transformer.scan_body(DinoBlock, emit=True),
                                           self.depth, 0)
            x, hidden = stack(name="blocks", **block)(x)
        else:
            hidden = []
            for i in range(self.depth):
                x = DinoBlock(name=f"blocks_{i}", **block)(x)
                hidden.append(x)
            hidden = tuple(hidden)
        y = transformer.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="norm")(x)
        return dict(cls=y[:, 0], registers=y[:, 1:1 + r], patch_tokens=y[:, 1 + r:],
                    prenorm=x, embeddings=embeddings, hidden_states=hidden)
