"""GigaTok's transformer halves: the 1D Q-Former encoder (CNN map -> N latent tokens) and the
1D -> 2D Q-Former decoder (N tokens -> a grid for the CNN decoder), with the semantic
regularisation head.

    CNN map (B, h, w, z) -> ln_pre -> encoder_embed -> memory (B, hw, W)
        queries = global_proj(multi-level average pools of the memory grid)  (B, N, W)
        depth x QFormerLayer(queries, memory) -> ln_post -> conv_out -> (B, N, z)
    tokens (B, N, z) -> ln_pre -> decoder_embed -> memory (B, N, W)
        queries = the first embedded token at every grid position          (B, hw, W)
        depth x QFormerLayer(queries, memory) [distill_mlp after layer distill_depth]
        -> ln_post -> 3x3 conv_out -> (B, h, w, z)

A QFormerLayer is DETR's pre-norm decoder layer: self-attention with the query position added
to queries and keys, cross-attention with the query position on the queries and the memory
position on the keys, then a GELU MLP; LayerNorm eps 1e-5. Official sizes: `VIT_SIZES`.

The 2D layout (`ViT2DEncoder` / `ViT2DDecoder`) transforms the h*w grid tokens themselves, with
plain pre-norm ViT blocks (S-B 2D, B-L 2D) or QFormerLayers whose memory is their own input
(S-S 2D); see `_vit_layers`.

`scan=True` (the recipes in configs/gigatok.py) runs each half's layers as one `nn.scan`
(`transformer.scan_stack`: one layer compiled whatever the depth; XL-XXL has 36 + 48), their
params stacked along a leading "layers" axis under `layers`, the distillation tap read inside
the scan (`transformer.scan_body`). The default `scan=False` unrolls them as `layer_{i}`: the
same outputs up to float32 summation order (the scan's backward sums the broadcast inputs'
gradients layer by layer), which the float32 train-step fixtures' trajectory bounds were
measured with; the converter writes either layout.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers import transformer
from tok1d.layers.transformer import logical
from tok1d.models.interfaces import TokenizerAux, check_images, vq_aux
from tok1d.models import presets, quantizers
from tok1d.models.tokenizers import nested
from tok1d.models.tokenizers.gigatok_cnn import GigaTokCNNDecoder, GigaTokCNNEncoder

Dtype = Any

# GigaTok's ViT sizes (width, layers, heads; MLP 4x width).
VIT_SIZES = {
    "tiny": dict(width=256, depth=4, num_heads=4),
    "small": dict(width=512, depth=6, num_heads=8),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
    "xl": dict(width=1280, depth=36, num_heads=20),
    "xxl": dict(width=1536, depth=48, num_heads=24),
    "xxxl": dict(width=2560, depth=48, num_heads=40),
}


def multi_level_queries(grid: jax.Array, num_tokens: int) -> jax.Array:
    """(B, H, W, C) -> (B, num_tokens, C): group 0 is the global mean, group i >= 1 the average
    pools over a grid of 2**((i - 1) // 2) rows x 2**(i // 2) columns (columns double first),
    row-major within a group; num_tokens = 2**n gives n + 1 groups of 1, 1, 2, 4, ... tokens."""
    b, h, w, c = grid.shape
    levels = round(math.log2(num_tokens))
    if 2 ** levels != num_tokens:
        raise ValueError(f"multi-level queries need a power-of-two token count, got {num_tokens}.")
    groups = []
    for i in range(levels + 1):
        level = max(i - 1, 0)
        rows, cols = 2 ** (level // 2), 2 ** ((level + 1) // 2)
        if h % rows or w % cols:
            raise ValueError(f"a {h}x{w} grid cannot be pooled into {rows}x{cols} blocks.")
        pooled = grid.reshape(b, rows, h // rows, cols, w // cols, c).mean(axis=(2, 4))
        groups.append(pooled.reshape(b, rows * cols, c))
    return jnp.concatenate(groups, axis=1)


def _apply_layers(module: nn.Module, layer_cls, kwargs: dict, x: jax.Array, args: tuple,
                  tap: int = 0) -> tuple[jax.Array, Optional[jax.Array]]:
    """`module.depth` layers `layer_cls(**kwargs)` applied as x = layer(x, *args), rematerialised
    with `module.remat`; scanned as `layers` (params stacked along a leading "layers" axis) or
    unrolled as `layer_{i}` by `module.scan`. Returns (x, x after layer `tap` or None)."""
    depth = module.depth
    if not module.scan:
        layer_cls = transformer.maybe_remat(layer_cls, module.remat)
        tapped = None
        for i in range(depth):
            x = layer_cls(**kwargs, name=f"layer_{i}")(x, *args)
            if tap and i + 1 == tap:
                tapped = x
        return x, tapped
    inside = tap if 0 < tap < depth else 0
    body = transformer.maybe_remat(transformer.scan_body(layer_cls, inside), module.remat,
                                   prevent_cse=False)
    stack = transformer.scan_stack(body, depth, len(args))(**kwargs, name="layers")
    if inside:
        (x, tapped, _), _ = stack((x, jnp.zeros_like(x), jnp.zeros((), jnp.int32)), *args)
        return x, tapped
    x, _ = stack(x, *args)
    return x, (x if tap == depth else None)


class QFormerLayer(nn.Module):
    """DETR pre-norm decoder layer (self-attn, cross-attn, MLP), see the module docstring."""

    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-5
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array, memory: jax.Array, query_pos: jax.Array,
                 memory_pos: jax.Array) -> jax.Array:
        norm = lambda name: transformer.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype,  # noqa
                                             param_dtype=self.param_dtype, name=name)
        attn = lambda name: transformer.Attention(  # noqa: E731
            self.num_heads, implementation=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name=name)
        t = transformer.constrain(t)
        h = norm("norm1")(t)
        t = t + attn("self_attn")(h, q_pos=query_pos, k_pos=query_pos)
        h = norm("norm2")(t)
        t = t + attn("cross_attn")(h, kv=memory, q_pos=query_pos, k_pos=memory_pos)
        t = t + transformer.Mlp(self.mlp_dim, activation="gelu", dtype=self.dtype,
                           param_dtype=self.param_dtype, name="mlp")(norm("norm3")(t))
        return transformer.constrain(t)


def _position(module: nn.Module, name: str, length: int, width: int, dtype) -> jax.Array:
    return transformer.embedding_param(module, name, (length, width), ("length", "embed"),
                                  width ** -0.5, dtype)


def _layer_norm(module: nn.Module, name: str) -> transformer.LayerNorm:
    return transformer.LayerNorm(epsilon=1e-5, dtype=module.dtype, param_dtype=module.param_dtype,
                            name=name)


def _embed_in(module: nn.Module, x: jax.Array, name: str) -> jax.Array:
    """ln_pre over the z channels, then the linear embedding to the transformer width."""
    x = _layer_norm(module, "ln_pre")(x.astype(module.dtype))
    return nn.Dense(module.width, dtype=module.dtype, param_dtype=module.param_dtype,
                    kernel_init=logical(transformer.default_kernel_init, ("code_dim", "embed")),
                    bias_init=logical(nn.initializers.zeros, ("embed",)), name=name)(x)


def _tokens_out(module: nn.Module, x: jax.Array, z: int) -> jax.Array:
    """Encoder head: ln_post, then the 1x1 `conv_out` to z channels (a per-token Dense).
    Returns (tokens, features after ln_post)."""
    feat = _layer_norm(module, "ln_post")(x)
    tokens = nn.Dense(z, dtype=module.dtype, param_dtype=module.param_dtype,
                      kernel_init=logical(transformer.default_kernel_init, ("embed", "code_dim")),
                      bias_init=logical(nn.initializers.zeros, ("code_dim",)),
                      name="conv_out")(feat)
    return tokens, feat


def _grid_out(module: nn.Module, x: jax.Array, grid: int, z: int) -> jax.Array:
    """Decoder head: ln_post, the (B, grid*grid, W) queries as a row-major grid, 3x3 `conv_out`."""
    x = _layer_norm(module, "ln_post")(x)
    return nn.Conv(z, (3, 3), padding="SAME", dtype=module.dtype,
                   param_dtype=module.param_dtype,
                   kernel_init=logical(transformer.default_kernel_init,
                                       ("conv_h", "conv_w", "embed", "code_dim")),
                   bias_init=logical(nn.initializers.zeros, ("code_dim",)),
                   name="conv_out")(x.reshape(x.shape[0], grid, grid, module.width))


class QFormerEncoder(nn.Module):
    """CNN map (B, h, w, z) -> (latent tokens (B, N, z), features after ln_post (B, N, W))."""

    width: int
    depth: int
    num_heads: int
    num_latent_tokens: int
    multi_level_query_init: bool = True
    scan: bool = False
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cnn_map: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, z = cnn_map.shape
        n, width = self.num_latent_tokens, self.width
        memory = _embed_in(self, cnn_map.reshape(b, h * w, z), "encoder_embed")
        if self.multi_level_query_init:
            queries = multi_level_queries(memory.reshape(b, h, w, width), n)
        else:
            queries = jnp.broadcast_to(jnp.mean(memory, axis=1, keepdims=True), (b, n, width))
        queries = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=logical(transformer.default_kernel_init, ("embed", "mlp")),
                           bias_init=logical(nn.initializers.zeros, ("mlp",)),
                           name="global_proj")(queries)
        self.sow("intermediates", "queries", queries)
        pos = _position(self, "positional_embedding", h * w, width, self.param_dtype)
        query_pos = _position(self, "latent_token_positional_embedding", n, width,
                              self.param_dtype)
        queries, _ = _apply_layers(self, QFormerLayer, _layer_kwargs(self), queries,
                                   (memory, query_pos.astype(self.dtype), pos.astype(self.dtype)))
        return _tokens_out(self, queries, z)


class QFormerDecoder(nn.Module):
    """Tokens (B, N, z) -> (grid (B, g, g, z), distill-MLP features (B, g*g, out_inner_dim) or
    None, raw queries after layer `distill_depth` (B, g*g, W) or None)."""

    width: int
    depth: int
    num_heads: int
    num_latent_tokens: int
    grid_size: int
    distill_depth: int = 0            # 0: no semantic-regularisation head
    out_inner_dim: int = 768
    scan: bool = False
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, Optional[jax.Array],
                                                   Optional[jax.Array]]:
        b, n, z = tokens.shape
        g, width = self.grid_size, self.width
        memory = _embed_in(self, tokens, "decoder_embed")
        queries = jnp.broadcast_to(memory[:, :1], (b, g * g, width))
        query_pos = _position(self, "positional_embedding", g * g, width, self.param_dtype)
        pos = _position(self, "latent_token_positional_embedding", self.num_latent_tokens, width,
                        self.param_dtype)[:n]
        queries, layer_feat = _apply_layers(
            self, QFormerLayer, _layer_kwargs(self), queries,
            (memory, query_pos.astype(self.dtype), pos.astype(self.dtype)), self.distill_depth)
        return _grid_out(self, queries, g, z), _distill(self, layer_feat), layer_feat


def _layer_kwargs(module: nn.Module) -> dict:
    return dict(num_heads=module.num_heads, mlp_dim=4 * module.width,
                attention_impl=module.attention_impl, dtype=module.dtype,
                param_dtype=module.param_dtype)


def _distill(module: nn.Module, layer_feat: Optional[jax.Array]) -> Optional[jax.Array]:
    """The distill MLP on the features tapped after layer `distill_depth` (None: no head)."""
    if layer_feat is None:
        return None
    return DistillMlp(module.width, module.out_inner_dim, dtype=module.dtype,
                      param_dtype=module.param_dtype, name="distill_mlp")(layer_feat)


class DistillMlp(nn.Module):
    """Semantic-regularisation projection: W -> 4W -> 4W -> out_dim with SiLU in between."""

    width: int
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda feats, names, name: nn.Dense(  # noqa: E731
            feats, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical(transformer.default_kernel_init, names),
            bias_init=logical(nn.initializers.zeros, names[1:]), name=name)
        x = nn.silu(dense(4 * self.width, ("embed", "mlp"), "fc_0")(x))
        x = nn.silu(dense(4 * self.width, ("embed", "mlp"), "fc_1")(x))
        return dense(self.out_dim, ("mlp", "embed"), "fc_2")(x).astype(jnp.float32)


# GigaTok's tokenizer linear-probe features (`GigaTok.probe_features`); the last needs the
# semantic head (distill_depth > 0).
PROBE_TAPS = ("encoder", "encoder_tokens", "decoder")

# The 2D halves' block types: GigaTok's `transformer_layer_type` -> ours.
LAYER_TYPES_2D = {"TransformerLayer": "vit", "TransformerDecoderLayer": "detr"}


class ViT2DEncoder(nn.Module):
    """GigaTok 2D encoder: CNN map (B, h, w, z) -> ln_pre -> encoder_embed -> `depth` blocks
    (see `_vit_layers`) -> ln_post -> 1x1 conv_out; returns (tokens (B, h*w, z) in raster
    order, features after ln_post (B, h*w, W))."""

    width: int
    depth: int
    num_heads: int
    layer_type: str = "vit"           # "vit" (TransformerLayer) or "detr" (TransformerDecoderLayer)
    scan: bool = False
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cnn_map: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, z = cnn_map.shape
        x = _embed_in(self, cnn_map.reshape(b, h * w, z), "encoder_embed")
        pos = _position(self, "positional_embedding", h * w, self.width, self.param_dtype)
        x = _vit_layers(self, x, pos.astype(self.dtype), 0)[0]
        return _tokens_out(self, x, z)


class ViT2DDecoder(nn.Module):
    """GigaTok 2D decoder: tokens (B, g*g, z) -> ln_pre -> decoder_embed -> `depth` blocks
    (distill MLP after layer `distill_depth`) -> ln_post -> 3x3 conv_out (B, g, g, z).
    Returns (grid, distill features or None, raw features after `distill_depth` or None)."""

    width: int
    depth: int
    num_heads: int
    grid_size: int
    distill_depth: int = 0
    out_inner_dim: int = 768
    layer_type: str = "vit"           # "vit" (TransformerLayer) or "detr" (TransformerDecoderLayer)
    scan: bool = False
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, Optional[jax.Array],
                                                   Optional[jax.Array]]:
        z = tokens.shape[-1]
        g = self.grid_size
        x = _embed_in(self, tokens, "decoder_embed")
        pos = _position(self, "positional_embedding", g * g, self.width, self.param_dtype)
        x, layer_feat = _vit_layers(self, x, pos.astype(self.dtype), self.distill_depth)
        return _grid_out(self, x, g, z), _distill(self, layer_feat), layer_feat


def _vit_layers(module, x, pos, distill_depth):
    """`module.depth` blocks (`_apply_layers`) over the grid tokens x (B, L, W) with positions
    pos (L, W); returns (x, x after layer `distill_depth` or None). LayerNorm eps 1e-5, exact
    GELU. `module.layer_type`:

    * "vit": pos added once to x, then pre-norm ViT blocks (self-attention, MLP).
    * "detr": no addition to x; every layer is a `QFormerLayer` whose memory is that layer's own
      input (not normalised), with pos on the self-attention queries/keys, the cross-attention
      queries and the memory keys: two attentions over the grid per layer (S-S 2D).
    """
    if module.layer_type not in LAYER_TYPES_2D.values():
        raise ValueError(f"Unknown GigaTok 2D layer type {module.layer_type!r}; expected one "
                         f"of {sorted(LAYER_TYPES_2D.values())}.")
    if module.layer_type == "vit":
        kw = dict(_layer_kwargs(module), pre_norm=True, norm_eps=1e-5, activation="gelu")
        return _apply_layers(module, transformer.Block, kw, x + pos, (), distill_depth)
    return _apply_layers(module, _SelfMemoryQFormerLayer, _layer_kwargs(module), x, (pos,),
                         distill_depth)


class _SelfMemoryQFormerLayer(QFormerLayer):
    """A `QFormerLayer` whose memory is its own input, with `pos` on queries and keys (S-S 2D)."""

    @nn.compact
    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:  # type: ignore[override]
        return super().__call__(x, x, pos, pos)


class GigaTok(nn.Module):
    """GigaTok hybrid tokenizer (1D Q-Former or 2D ViT layout).

        images (B, H, W, 3) in [-1, 1] -> CNN encoder -> map (B, h, w, z)
          -> transformer encoder -> (B, N, z) -> quant_conv -> l2 VQ (rotation trick) -> codes
          -> post_quant_conv -> transformer decoder -> grid (B, h, w, z) -> CNN decoder -> pixels

    `__call__(images, train=True)` is the training forward: its `TokenizerAux` carries the
    quantizer losses and `fea_rec` = MSE(rec_spatial, sg(CNN map)), and the features `cnn_map`,
    `shortcut_pixels` (the CNN decoder on the encoder's map: GigaTok's early-phase auxiliary
    reconstruction) and `semantic_features` (the distill-MLP output aligned with DINOv2 when
    distill_depth > 0).

    `nested_dropout` (1D layout; "none", "uniform", "pow2"): ordered variable-length tokens, a
    random prefix kept per example in the training forward and the rest replaced by a learned
    mask vector before post_quant_conv (`tok1d.models.tokenizers.nested`). Off by default.
    """

    layout: str = "1d"                # "1d" (Q-Former, num_latent_tokens) or "2d" (raster grid)
    layer_type: str = "vit"           # 2D blocks: "vit" (S-B, B-L) or "detr" (S-S); see _vit_layers
    image_size: int = 256
    encoder_ch: int = 128
    decoder_ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    num_latent_tokens: int = 256
    multi_level_query_init: bool = True
    quantizer: str = "vq"             # a name of tok1d.models.quantizers.QUANTIZERS (not "vae")
    quantizer_options: Any = None     # a mapping of the quantizer's own fields
    codebook_size: int = 16384
    code_dim: int = 8
    l2_norm: bool = True
    commitment_cost: float = 0.25
    rotation_trick: bool = True
    entropy_temperature: float = 0.01
    adaptive_gn: bool = True
    d2s_up: bool = True
    distill_depth: int = 0
    out_inner_dim: int = 768
    nested_dropout: str = "none"
    scan: bool = False                # True: the halves' layers as nn.scan stacks (recipes)
    remat: str = "none"
    cnn_remat: str = "none"           # the CNN halves' ResnetBlocks (transformer.maybe_remat)
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        # A mapping of options built here ({"depth": 2}, as models.create gets them) hashes
        # as a Linen module's fields must (jit's static arguments): "Failed to hash" before.
        object.__setattr__(self, "quantizer_options", presets.hashable(self.quantizer_options))
        super().__post_init__()

    def setup(self):
        if self.layout not in ("1d", "2d"):
            raise ValueError(f"Unknown GigaTok layout {self.layout!r}; expected '1d' or '2d'.")
        if self.layout == "1d" and self.layer_type != "vit":
            raise ValueError(f"layer_type={self.layer_type!r} applies to the 2D layout only (the "
                             "1D halves are always Q-Former layers).")
        nested.check_schedule(self.nested_dropout)
        if self.layout == "2d" and self.nested_dropout != "none":
            raise ValueError("nested_dropout applies to the 1D layout only (2D tokens are a "
                             "grid, not an ordered sequence).")
        self.tail_mask = (nested.TailMask(self.num_latent_tokens, self.code_dim,
                                          param_dtype=self.param_dtype)
                          if self.nested_dropout != "none" else None)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tkw = dict(scan=self.scan, remat=self.remat, attention_impl=self.attention_impl, **kw)
        self.encoder = GigaTokCNNEncoder(ch=self.encoder_ch, ch_mult=tuple(self.encoder_ch_mult),
                                         num_res_blocks=self.num_res_blocks,
                                         z_channels=self.z_channels, remat=self.cnn_remat,
                                         **kw)
        self.decoder = GigaTokCNNDecoder(ch=self.decoder_ch, ch_mult=tuple(self.decoder_ch_mult),
                                         num_res_blocks=self.num_res_blocks,
                                         z_channels=self.z_channels,
                                         adaptive_gn=self.adaptive_gn, d2s_up=self.d2s_up,
                                         remat=self.cnn_remat, **kw)
        grid = self.grid_size
        if self.layout == "1d":
            self.vit_encoder = QFormerEncoder(
                self.encoder_width, self.encoder_depth, self.encoder_heads,
                self.num_latent_tokens, multi_level_query_init=self.multi_level_query_init, **tkw)
            self.vit_decoder = QFormerDecoder(
                self.decoder_width, self.decoder_depth, self.decoder_heads,
                self.num_latent_tokens, grid, distill_depth=self.distill_depth,
                out_inner_dim=self.out_inner_dim, **tkw)
        else:
            self.vit_encoder = ViT2DEncoder(self.encoder_width, self.encoder_depth,
                                            self.encoder_heads, layer_type=self.layer_type,
                                            **tkw)
            self.vit_decoder = ViT2DDecoder(self.decoder_width, self.decoder_depth,
                                            self.decoder_heads, grid,
                                            distill_depth=self.distill_depth,
                                            out_inner_dim=self.out_inner_dim,
                                            layer_type=self.layer_type, **tkw)
        dense = lambda feats, names: nn.Dense(  # noqa: E731
            feats, kernel_init=logical(transformer.default_kernel_init, names),
            bias_init=logical(nn.initializers.zeros, names[1:]), **kw)
        self.quant_conv = dense(self.code_dim, ("embed", "code_dim"))
        self.post_quant_conv = dense(self.z_channels, ("code_dim", "embed"))
        if self.quantizer == "vae":
            raise ValueError("GigaTok takes a discrete quantizer; quantizer='vae' is TiTok's.")
        self.quantize = self._quantizer()

    def _quantizer(self, detached: bool = False) -> nn.Module:
        return quantizers.for_tokenizer(self, self.code_dim, detached=detached)

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def semantic_grid(self) -> int:
        """The decoder grid whose features the semantic loss aligns (`SemanticTokenizer`)."""
        return self.grid_size

    @property
    def num_codes(self) -> int:
        return self._quantizer(detached=True).num_codes

    @property
    def pixel_range(self) -> tuple[float, float]:
        return (-1.0, 1.0)

    @property
    def outputs_pixels(self) -> bool:
        return True

    @property
    def input_size(self) -> int:
        return self.image_size

    @property
    def decodes_prefixes(self) -> bool:
        """The 1D layout decodes the first k tokens (nested.py); the 2D grid does not."""
        return self.layout == "1d"

    @property
    def codes_per_token(self) -> int:
        """The quantizer's codes per latent token (residual VQ: its depth; else 1)."""
        return self._quantizer(detached=True).codes_per_token

    @property
    def num_tokens(self) -> int:
        tokens = self.num_latent_tokens if self.layout == "1d" else self.grid_size ** 2
        return tokens * self.codes_per_token

    def check_images(self, images: jax.Array) -> None:
        check_images("GigaTok", images, self.image_size, self.pixel_range)

    def encode_latents(self, images: jax.Array, train: bool = False
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Images in [-1, 1] -> (quantised latents (B, N, code_dim), the quantizer's outputs
        (`codes` (B, N), the quantizer losses) and the CNN map `cnn_map`)."""
        self.check_images(images)
        cnn_map = self.encoder(images)
        tokens, _ = self.vit_encoder(cnn_map)
        z_q, aux = self.quantize(self.quant_conv(tokens), train=train)
        aux["cnn_map"] = cnn_map
        return z_q, aux

    def encode(self, images: jax.Array) -> jax.Array:
        """Images in [-1, 1] -> codes (B, num_tokens) int32 (residual VQ's (B, N, depth)
        flattened token-major)."""
        codes = self.encode_latents(images)[1]["codes"]
        return codes.reshape(codes.shape[0], -1)

    @property
    def probe_taps(self) -> tuple[str, ...]:
        """The features GigaTok's tokenizer linear probe reads (`probe_features`)."""
        return PROBE_TAPS if self.distill_depth > 0 else PROBE_TAPS[:2]

    def probe_features(self, images: jax.Array, tap: str = "encoder") -> jax.Array:
        """Images in [-1, 1] -> the features (B, L, D) of GigaTok's tokenizer linear probe
        (`tokenizer/lin_probe/lin_probe.py`), which averages them over L:

        * "encoder": the transformer encoder's tokens after ln_post, before conv_out (upstream
          `encode(return_feat=True)`, the default; D = encoder_width);
        * "encoder_tokens": the same after conv_out, before quant_conv (`--fix-dim`,
          `return_fix_dim_feat`; D = z_channels);
        * "decoder": the transformer decoder's queries after layer `distill_depth`, the input
          of the semantic head's MLP, decoding all the quantised tokens (`--from-decoder`,
          `decode(return_feat=True)`; D = decoder_width; needs distill_depth > 0).

        Upstream implements the last two for the 1D layout only (its 2D model fails on them);
        here both layouts have all three. L: latent tokens (1D), grid positions (2D and the
        decoder)."""
        if tap not in self.probe_taps:
            why = (" (the decoder tap is the semantic head's input: distill_depth > 0)"
                   if tap == "decoder" else "")
            raise ValueError(f"GigaTok has no probe tap {tap!r}{why}; taps: "
                             f"{', '.join(self.probe_taps)}.")
        if tap == "decoder":
            return self._vit_decode(self.encode_latents(images)[0], None)[2]
        self.check_images(images)
        tokens, feat = self.vit_encoder(self.encoder(images))
        return feat if tap == "encoder" else tokens

    def _vit_decode(self, z_q: jax.Array, prefix_lengths: nested.PrefixLengths
                    ) -> tuple[jax.Array, Optional[jax.Array], Optional[jax.Array]]:
        """Latents -> the transformer decoder's (grid, semantic features, raw features after
        layer distill_depth); see `decode_with_features`."""
        if self.layout == "1d":
            z_q = nested.apply_prefix(z_q, prefix_lengths, self.num_latent_tokens,
                                      self.tail_mask)
        elif prefix_lengths is not None or z_q.shape[1] != self.grid_size ** 2:
            raise ValueError(f"the 2D layout decodes all {self.grid_size ** 2} tokens (a prefix "
                             "needs the 1D layout).")
        return self.vit_decoder(self.post_quant_conv(z_q))

    def decode_with_features(self, z_q: jax.Array, prefix_lengths: nested.PrefixLengths = None
                             ) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        """Latents (B, n, code_dim) -> (pixels, rec_spatial grid, semantic features). 1D
        layout: n <= N is a prefix of the tokens, `prefix_lengths` (an int, or (B,) per
        example) keeps fewer (`nested.apply_prefix`)."""
        rec_spatial, inner, _ = self._vit_decode(z_q, prefix_lengths)
        return self.decoder(rec_spatial), rec_spatial, inner

    def decode_latents(self, z_q: jax.Array, prefix_lengths: nested.PrefixLengths = None
                       ) -> jax.Array:
        """Latents (B, n, code_dim) -> pixels in [-1, 1] (not clamped); see
        `decode_with_features`."""
        return self.decode_with_features(z_q, prefix_lengths)[0]

    def decode_cnn_map(self, cnn_map: jax.Array) -> jax.Array:
        """The CNN decoder applied straight to the CNN encoder's map (the warm-up shortcut)."""
        return self.decoder(cnn_map)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Codes (B, k) int (1D: k <= num_tokens, a prefix of whole tokens; residual VQ: a
        multiple of its depth) -> pixels in [-1, 1]."""
        return self.decode_latents(quantizers.lookup_codes(self.quantize, codes))

    def __call__(self, images: jax.Array, *, train: bool = False,
                 prefix_lengths: nested.PrefixLengths = None) -> tuple[jax.Array, TokenizerAux]:
        """The training forward: (pixels, TokenizerAux with the fea_rec loss, `cnn_map`,
        `semantic_features` (distill_depth > 0) and, with `train`, `shortcut_pixels`).
        `train` with `nested_dropout` draws the prefix lengths (rng "sample");
        `prefix_lengths` decodes the first k tokens only (evaluation)."""
        z_q, quantized = self.encode_latents(images, train=train)
        prefix_lengths = nested.forward_lengths(self, prefix_lengths, train, z_q.shape[0])
        pixels, rec_spatial, inner = self.decode_with_features(z_q, prefix_lengths)
        cnn_map = quantized["cnn_map"]
        fea_rec = jnp.mean(jnp.square(
            rec_spatial.astype(jnp.float32) - jax.lax.stop_gradient(cnn_map).astype(jnp.float32)))
        features = {"cnn_map": cnn_map}
        if inner is not None:
            features["semantic_features"] = inner
        if train:
            features["shortcut_pixels"] = self.decoder(cnn_map)
        aux = vq_aux(quantized, **features)
        return pixels, aux.replace(losses={**aux.losses, "fea_rec": fea_rec})
