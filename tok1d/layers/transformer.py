"""Transformer building blocks shared by every tok1d model.

Attention, MLPs, pre-/post-norm blocks and the (optionally scanned and rematerialised) block
stack are written once here and used by the tokenizers (TiTok, GigaTok) and the generators.

Every parameter carries logical axis names (see `tok1d.parallel` for the rules table that maps
them to mesh axes) and every module has a compute `dtype` and a `param_dtype`:

  embed   model width              mlp     MLP hidden width
  heads   attention heads          kv      per-head width
  length  sequence positions       layers  scanned layer axis
  norm    norm scales / biases     conv_h, conv_w, conv_in, conv_out  conv kernels

Activations are constrained at block boundaries with ("act_batch", "act_len", "act_embed").

Autoregressive decoding: `Attention(..., decode=True)` keeps a static key/value cache in the
"cache" collection (see `Attention`); `Block` and `Transformer` pass `decode` (and optional
rotary tables, `rope`) through, the scanned stack with the cache stacked along the layer axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

ACT = ("act_batch", "act_len", "act_embed")

# PyTorch's trunc_normal_(std=0.02) (cut at +-2 absolute, i.e. effectively untruncated).
default_kernel_init = nn.initializers.normal(stddev=0.02)


def packed_qkv_xavier_uniform(key, shape, dtype=jnp.float32):
    """PyTorch's xavier_uniform_ on nn.MultiheadAttention's packed (3W, W) in_proj_weight, for
    one (W, heads, head_dim) slice of it: U(-a, a) with a = sqrt(6 / (W + 3W)). This is what the
    official TiTok / CLIP-style blocks start from (std 1/sqrt(2W); 3x larger than 0.02 at W=128,
    which lets small models learn attention routing quickly)."""
    width = shape[0]
    bound = (6.0 / (4.0 * width)) ** 0.5
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


def logical(init: Initializer, names: tuple[Optional[str], ...]) -> Initializer:
    """Attaches logical axis names to an initializer."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[Optional[str], ...] = ACT) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, names)


def gelu_exact(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,  # PyTorch nn.GELU() default (erf).
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
    "relu": nn.relu,
    "tanh": jnp.tanh,
}


class LayerNorm(nn.Module):
    """LayerNorm with logically-named scale/bias; statistics in float32."""

    epsilon: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.LayerNorm(
            epsilon=self.epsilon, use_bias=self.use_bias, use_scale=self.use_scale,
            dtype=self.dtype, param_dtype=self.param_dtype,
            scale_init=logical(nn.initializers.ones, ("norm",)),
            bias_init=logical(nn.initializers.zeros, ("norm",)),
            name="norm")(x)


class RMSNorm(nn.Module):
    """RMSNorm (LLaMA style): x / rms(x) * scale, computed in float32."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", logical(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding on interleaved pairs (LLaMA / gpt-fast / LlamaGen `apply_rotary_emb`):
    (x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin), in float32.

    x: (B, L, heads, head_dim); cos, sin: (L, head_dim // 2) or (B, L, head_dim // 2).
    """
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    c = jnp.expand_dims(cos.astype(jnp.float32), -2)  # broadcast over heads
    s = jnp.expand_dims(sin.astype(jnp.float32), -2)
    x0, x1 = x32[..., 0], x32[..., 1]
    out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def make_norm(kind: str, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"Unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'.")


# cuDNN's fused attention trains only on even sequence lengths; `attend` pads to this multiple
# (its kernels' tile) instead.
CUDNN_MULTIPLE = 64


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
           implementation: Optional[str] = None,
           kv_lengths: Optional[jax.Array] = None) -> jax.Array:
    """`jax.nn.dot_product_attention` of (B, T, heads, head_dim) queries and (B, S, heads,
    head_dim) keys / values. `kv_lengths` (B,): only the first kv_lengths[b] keys count (a
    decoding step over a cache; cuDNN's kernel then needs no mask tensor). Otherwise, with
    `implementation="cudnn"` and no mask, T and S are padded to a multiple of `CUDNN_MULTIPLE`
    (`padded_attention`): cuDNN's fused attention cannot train on odd lengths such as TiTok's
    289 (256 patches + 32 latent tokens + the class token)."""
    if kv_lengths is not None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation,
                                            key_value_seq_lengths=kv_lengths)
    if implementation == "cudnn" and mask is None:
        return padded_attention(q, k, v, CUDNN_MULTIPLE, implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, multiple: int,
                     implementation: Optional[str] = None) -> jax.Array:
    """Unmasked attention computed on sequences zero-padded to a multiple of `multiple`, the
    padding masked out by sequence lengths (`query_seq_lengths` / `key_value_seq_lengths`)
    and cut from the output: the same result as without padding."""
    batch, t, s = q.shape[0], q.shape[1], k.shape[1]
    t_pad, s_pad = -(-t // multiple) * multiple, -(-s // multiple) * multiple
    if (t_pad, s_pad) == (t, s):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def pad(x, length):
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    y = jax.nn.dot_product_attention(
        pad(q, t_pad), pad(k, s_pad), pad(v, s_pad),
        query_seq_lengths=jnp.full((batch,), t, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), s, jnp.int32), implementation=implementation)
    return y[:, :t]


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    Uses `jax.nn.dot_product_attention` (`attend`), which XLA lowers to a fused kernel where the
    backend has one (`implementation="cudnn"` on recent NVIDIA GPUs, lengths padded to a
    multiple of 64 when unmasked); softmax statistics are float32.

    Static KV cache (`decode=True`, causal self-attention only), the usual Flax pattern: the
    first call with `decode=True` and an empty "cache" collection (apply with
    `mutable=["cache"]`) only *creates* `cached_key` / `cached_value` (B, max_len, heads,
    head_dim) zeros with max_len = that call's sequence length, and `cache_index` = 0; its output
    is meaningless. Every later call writes its L new keys/values at `cache_index` with
    `lax.dynamic_update_slice`, advances the index by L, and lets query i (absolute position
    index + i) attend to cached positions <= index + i (the unfilled tail is masked out, so the
    result equals causal attention over the filled prefix). `mask`, if given, is and-ed in (it
    must broadcast to (B, heads, L, max_len)). Writing past max_len is not checked
    (`dynamic_update_slice` clamps the start).

    `rope=(cos, sin)`: rotary tables for the L query positions, applied to q and k (before
    caching) with `apply_rope`.

    `qk_norm`: a `norm` ("layernorm" / "rmsnorm", epsilon `norm_eps`) over each head's query and
    key (`q_norm`, `k_norm`, shared by the heads; timm's `qk_norm`, before caching and rope).
    `dropout_rate`: dropout on the attention probabilities when not `deterministic` (then the
    attention is computed explicitly, softmax in float32; otherwise the fused kernel).
    """

    num_heads: int
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    dropout_rate: float = 0.0
    implementation: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    qkv_init: Initializer = packed_qkv_xavier_uniform
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
                 kv: Optional[jax.Array] = None, q_pos: Optional[jax.Array] = None,
                 k_pos: Optional[jax.Array] = None, decode: bool = False,
                 rope: Optional[tuple[jax.Array, jax.Array]] = None,
                 deterministic: bool = True) -> jax.Array:
        """Self-attention over x, or cross-attention from x to `kv` (DETR / Q-Former style:
        `q_pos` is added to the query input, `k_pos` to the key input, values see neither)."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"Width {width} is not divisible by num_heads={self.num_heads}.")
        head_dim = width // self.num_heads
        proj = functools.partial(
            HeadProjection, use_bias=self.qkv_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=self.qkv_init)
        cross = kv is not None
        kv = x if kv is None else kv
        q = proj(self.num_heads, head_dim, name="query")(x if q_pos is None else x + q_pos)
        k = proj(self.num_heads, head_dim, name="key")(kv if k_pos is None else kv + k_pos)
        v = proj(self.num_heads, head_dim, name="value")(kv)
        heads = ("act_batch", "act_len", "act_heads", None)
        q, k, v = (constrain(t, heads) for t in (q, k, v))
        if self.qk_norm:
            q = make_norm(self.norm, self.norm_eps, self.dtype, self.param_dtype, "q_norm")(q)
            k = make_norm(self.norm, self.norm_eps, self.dtype, self.param_dtype, "k_norm")(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kv_lengths = None
        fused = deterministic or not self.dropout_rate
        if decode:
            if cross:
                raise ValueError("decode=True supports self-attention only.")
            cached = self._update_cache(k, v)
            if cached is not None:
                k, v, cache_mask, filled = cached
                if mask is None and q.shape[1] == 1 and fused:
                    # one new position: the cache's filled length is its mask
                    kv_lengths = jnp.broadcast_to(filled, (q.shape[0],))
                else:
                    mask = cache_mask if mask is None else jnp.logical_and(mask, cache_mask)
        if fused:
            y = attend(q, k, v, mask, self.implementation, kv_lengths)
        else:
            y = self._attend_with_dropout(q, k, v, mask)
        y = constrain(y, heads)
        return HeadProjection(self.num_heads, head_dim, out_features=width,
                              use_bias=self.out_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              name="out")(y)

    def _attend_with_dropout(self, q: jax.Array, k: jax.Array, v: jax.Array,
                             mask: Optional[jax.Array]) -> jax.Array:
        """softmax(q k^T / sqrt(head_dim)) in float32, dropout on the probabilities, times v
        (what `dot_product_attention` computes, with PyTorch SDPA's `dropout_p`)."""
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * (q.shape[-1] ** -0.5)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate,
                                    probs.shape)
        probs = jnp.where(keep, probs / (1.0 - self.dropout_rate), 0.0)
        return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)

    def _update_cache(self, k: jax.Array, v: jax.Array):
        """Creates the cache (first call: returns None) or writes k, v at `cache_index` and
        returns (all keys, all values, mask (1, 1, L, max_len) over filled causal positions,
        the number of positions filled)."""
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return None
        length, max_len = k.shape[1], cached_key.value.shape[1]
        start = index.value
        zero = jnp.zeros((), jnp.int32)
        at = (zero, start, zero, zero)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), at)
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), at)
        index.value = start + length
        query_pos = start + jnp.arange(length, dtype=jnp.int32)
        mask = jnp.arange(max_len, dtype=jnp.int32)[None, :] <= query_pos[:, None]
        return cached_key.value, cached_value.value, mask[None, None], index.value


class HeadProjection(nn.Module):
    """Width <-> (heads, head_dim) projections of attention, with 3-D logically named kernels.

    Without `out_features`: (..., width) -> (..., heads, head_dim), kernel (embed, heads, kv).
    With `out_features`: (..., heads, head_dim) -> (..., out_features), kernel (heads, kv, embed).
    """

    num_heads: int
    head_dim: int
    out_features: Optional[int] = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, d = self.num_heads, self.head_dim
        if self.out_features is None:
            shape, names, eq = (x.shape[-1], h, d), ("embed", "heads", "kv"), "...e,ehd->...hd"
            bias_shape, bias_names = (h, d), ("heads", "kv")
        else:
            shape, names, eq = (h, d, self.out_features), ("heads", "kv", "embed"), "...hd,hde->...e"
            bias_shape, bias_names = (self.out_features,), ("embed",)
        kernel = self.param("kernel", logical(self.kernel_init, names), shape, self.param_dtype)
        y = jnp.einsum(eq, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, bias_names), bias_shape,
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Mlp(nn.Module):
    """Two-layer MLP (`activation` = gelu, gelu_tanh, ...) or gated SwiGLU (`activation="swiglu"`).
    `dropout_rate`: dropout on the hidden activations when not `deterministic` (timm `Mlp`'s
    `drop1`; the output's dropout is the block's)."""

    hidden_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        up = functools.partial(dense, self.hidden_dim,
                               kernel_init=logical(self.kernel_init, ("embed", "mlp")),
                               bias_init=logical(nn.initializers.zeros, ("mlp",)))
        if self.activation == "swiglu":
            h = nn.silu(up(name="gate")(x)) * up(name="up")(x)
        else:
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"Unknown activation {self.activation!r}; known: "
                                 f"{sorted(ACTIVATIONS) + ['swiglu']}.")
            h = ACTIVATIONS[self.activation](up(name="fc1")(x))
        h = nn.Dropout(self.dropout_rate, deterministic=deterministic or not self.dropout_rate)(h)
        h = constrain(h, ("act_batch", "act_len", "act_mlp"))
        return dense(width, kernel_init=logical(self.kernel_init, ("mlp", "embed")),
                     bias_init=logical(nn.initializers.zeros, ("embed",)), name="fc2")(h)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """DiT's adaptive-norm modulation: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class Block(nn.Module):
    """One transformer block: pre-norm (ViT/CLIP/LLaMA) or post-norm (BERT).

    `adaln=True` (pre-norm only): DiT's adaLN-Zero conditioning on `cond` (B, L or 1, W), one
    condition per position: `adaLN_modulation` = Linear(silu(cond)) -> (shift, scale, gate) of
    the attention branch and of the MLP branch (zero-initialised), x + gate * branch(
    modulate(norm(x), shift, scale)) (RAR's blocks). `qk_norm`: a norm over each head's q and k
    (`Attention`). Dropout: `dropout_rate` on each branch output (BERT, LlamaGen, timm's
    `proj_drop`), `attention_dropout` on the attention probabilities, `mlp_dropout` on the MLP's
    hidden activations (timm `Mlp`'s `drop1`)."""

    num_heads: int
    mlp_dim: int
    pre_norm: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    qkv_bias: bool = True
    use_bias: bool = True
    qk_norm: bool = False
    adaln: bool = False
    attention_impl: Optional[str] = None
    dropout_rate: float = 0.0  # on each branch output before the residual add (BERT, LlamaGen)
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    qkv_init: Optional[Initializer] = None  # None: Attention's default (packed xavier uniform)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
                 deterministic: bool = True, decode: bool = False,
                 rope: Optional[tuple[jax.Array, jax.Array]] = None,
                 cond: Optional[jax.Array] = None) -> jax.Array:
        """`decode` / `rope`: see `Attention` (KV cache, rotary tables); `cond`: the adaLN
        condition (with `adaln`)."""
        norm = functools.partial(make_norm, self.norm, self.norm_eps, self.dtype, self.param_dtype)
        init = {} if self.qkv_init is None else {"qkv_init": self.qkv_init}
        attn = functools.partial(
            Attention(self.num_heads, qkv_bias=self.qkv_bias, out_bias=self.use_bias,
                      qk_norm=self.qk_norm, norm=self.norm, norm_eps=self.norm_eps,
                      dropout_rate=self.attention_dropout, implementation=self.attention_impl,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="attn", **init),
            decode=decode, rope=rope, deterministic=deterministic)
        mlp = functools.partial(
            Mlp(self.mlp_dim, activation=self.activation, use_bias=self.use_bias,
                dropout_rate=self.mlp_dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                name="mlp"), deterministic=deterministic)
        drop = nn.Dropout(self.dropout_rate, deterministic=deterministic or not self.dropout_rate)
        x = constrain(x)
        if self.adaln:
            if cond is None or not self.pre_norm:
                raise ValueError("adaln=True needs a pre-norm block and its `cond` input.")
            mod = nn.Dense(6 * x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=logical(nn.initializers.zeros, ("embed", "mlp")),
                           bias_init=logical(nn.initializers.zeros, ("mlp",)),
                           name="adaLN_modulation")(nn.silu(cond))
            shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
            x = x + gate1 * drop(attn(modulate(norm(name="ln_1")(x), shift1, scale1), mask))
            x = x + gate2 * drop(mlp(modulate(norm(name="ln_2")(x), shift2, scale2)))
        elif self.pre_norm:
            x = x + drop(attn(norm(name="ln_1")(x), mask))
            x = x + drop(mlp(norm(name="ln_2")(x)))
        else:
            x = norm(name="ln_1")(x + drop(attn(x, mask)))
            x = norm(name="ln_2")(x + drop(mlp(x)))
        return constrain(x)


@functools.lru_cache(maxsize=None)
def scan_body(cls, tap: int = 0, emit: bool = False):
    """`cls` (a layer mapping (x, *args) -> x) with the (carry, *args) -> (carry, None)
    signature that `nn.scan` needs. With `tap` > 0 the carry is (x, tapped, layers done) and
    `tapped` becomes x after layer `tap` (a select per layer: features read between two layers
    of one stack, e.g. GigaTok's distillation head). `emit` (without `tap`): every layer's
    output is also the scan's per-layer output, (carry, x), stacked along a leading layer axis
    (DINO's hidden states)."""

    class ScanBody(cls):
        @nn.compact
        def __call__(self, carry, *args):  # type: ignore[override]
            if not tap:
                x = super().__call__(carry, *args)
                return x, (x if emit else None)
            x, tapped, done = carry
            x = super().__call__(x, *args)
            done = done + 1
            return (x, jnp.where(done == tap, x, tapped), done), None

    ScanBody.__name__ = ScanBody.__qualname__ = f"Scan{cls.__name__}"
    return ScanBody


def scan_stack(body_cls, depth: int, num_args: int, per_layer_args: int = 0,
               collections: tuple[str, ...] = ()):
    """`depth` layers of `body_cls` (a `scan_body`, possibly rematerialised) as one `nn.scan`:
    their params, KV caches and `collections` stacked along a leading axis with the logical name
    "layers", one layer compiled whatever the depth. After the carry come `per_layer_args`
    inputs sliced along their leading axis (layer i gets row i), then `num_args` inputs
    broadcast to every layer. Every scanned stack (`Transformer`, GigaTok's halves, the DINO
    discriminator's heads) is built here."""
    return nn.scan(body_cls, variable_axes={"params": 0, "cache": 0,
                                            **{c: 0 for c in collections}},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(0,) * per_layer_args + (nn.broadcast,) * num_args, length=depth,
                   metadata_params={nn.PARTITION_NAME: "layers"})


class Transformer(Block):
    """`depth` identical blocks (the inherited fields configure each block).

    scan=True stacks the layer parameters along a leading "layers" axis and compiles one block
    (fast compiles, required for deep models); remat chooses what the backward pass recomputes:
    "none", "full" (save nothing inside a block) or "dots" (save matmul outputs without batch dims,
    i.e. `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`), or any other name in
    `jax.checkpoint_policies`.

    With `decode=True` every block keeps its KV cache (see `Attention`); when scanned, the cache
    variables are stacked along the leading layer axis like the parameters. `cond` (adaLN
    blocks) reaches every block.
    """

    depth: int = 1
    scan: bool = True
    remat: str = "none"

    def _block_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Block)
                if f.name not in ("parent", "name")}

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
                 deterministic: bool = True, decode: bool = False,
                 rope: Optional[tuple[jax.Array, jax.Array]] = None,
                 cond: Optional[jax.Array] = None) -> jax.Array:
        block_cls = maybe_remat(scan_body(Block) if self.scan else Block, self.remat,
                                prevent_cse=not self.scan, static_argnums=(3, 4))
        if self.scan:
            stack = scan_stack(block_cls, self.depth, 5)
            x, _ = stack(**self._block_kwargs(), name="blocks")(x, mask, deterministic, decode,
                                                                 rope, cond)
            return x
        for i in range(self.depth):
            x = block_cls(**self._block_kwargs(), name=f"blocks_{i}")(x, mask, deterministic,
                                                                      decode, rope, cond)
        return x


def remat_policy(name: str):
    """Maps a config string to a `jax.checkpoint_policies` policy (None = save nothing)."""
    if name == "full":
        return None
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        raise ValueError(f"Unknown remat policy {name!r}; use 'none', 'full', 'dots' or a name "
                         "from jax.checkpoint_policies.")
    return policy


def maybe_remat(cls, policy: str, **kwargs: Any):
    """`cls` itself for policy "none", else `nn.remat(cls, policy=remat_policy(policy),
    **kwargs)` (same parameter names: the backward pass recomputes what the policy does not
    save). Every rematerialisable block (transformer, Q-Former, ConvNeXt, CNN ResnetBlock)
    goes through here."""
    if policy == "none":
        return cls
    return nn.remat(cls, policy=remat_policy(policy), **kwargs)


def embedding_param(module: nn.Module, name: str, shape: tuple[int, ...],
                    names: tuple[Optional[str], ...], scale: float, dtype: Dtype) -> jax.Array:
    """A learned embedding table initialised as `scale * N(0, 1)` (TiTok's `W**-0.5 * randn`)."""
    return module.param(name, logical(nn.initializers.normal(stddev=scale), names), shape, dtype)


# --------------------------------------------------------------------------- cached decoding
# A model with cached decoding (the AR generators) has a `Transformer` child named "transformer"
# configured by its own `scan` / `depth` fields, and a method `init_cache(batch_size)` that runs
# its decoding forward once to create the "cache" collection (see `Attention`).


def init_cache(model: nn.Module, params: Any, batch_size: int) -> dict:
    """The empty "cache" collection of `model` for `batch_size` sequences."""
    _, variables = model.apply({"params": params}, batch_size, method=type(model).init_cache,
                               mutable=["cache"])
    return variables["cache"]


def cache_length(cache: Any) -> int:
    """The number of positions a "cache" collection holds (that of its first key cache)."""
    keys = [x for path, x in jax.tree_util.tree_leaves_with_path(cache)
            if getattr(path[-1], "key", None) == "cached_key"]
    if not keys:
        raise ValueError("The cache holds no `cached_key`; is it a decoding cache?")
    return keys[0].shape[-3]


def resize_cache(cache: Any, length: int) -> Any:
    """`cache` with every key / value cache cut or zero-padded to `length` positions (axis -3 of
    (..., max_len, heads, head_dim): the layer axis of a scanned stack stays in front); indices
    and positions unchanged. `Attention` attends over whatever length its cache has, masking
    the unfilled tail, so a decoding step on a shorter cache gives the same result as long as
    the cache holds every position written so far plus the step's own."""
    def fit(path, x):
        if getattr(path[-1], "key", None) not in ("cached_key", "cached_value"):
            return x
        axis = x.ndim - 3
        have = x.shape[axis]
        if length <= have:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, length - have)
        return jnp.pad(x, widths)
    return jax.tree_util.tree_map_with_path(fit, cache)


# The names of every layer stack's two layouts: scanned (one group, a leading layer axis) ->
# unrolled (one group per layer). `Transformer` ("blocks"), GigaTok's halves ("layers"), the
# DINO discriminator's heads ("heads").
STACK_NAMES = {"blocks": "blocks_{}", "layers": "layer_{}", "heads": "heads_{}"}


def match_stack_layout(flat: dict[tuple, Any], target: dict[tuple, Any],
                       sources: Optional[dict[tuple, tuple]] = None) -> dict[tuple, Any]:
    """`flat` (flattened params) with its layer stacks re-laid out as `target` (flattened
    params or shapes) has them: a scanned stack (`blocks` / `layers` / `heads`, leading layer
    axis) where `target` is unrolled (`blocks_{i}` / `layer_{i}` / `heads_{i}`) is sliced, and
    unrolled layers where `target` is scanned are stacked (only when every layer of the stack
    is there). Paths that already agree are untouched: weights of either layout load into a
    model of either. Where each path comes from: `stack_layout_sources` (`sources`, where the
    caller has it already)."""
    out = dict(flat)
    if sources is None:
        sources = stack_layout_sources(flat, target)
    for path, source in sources.items():
        if source[0] == "layer":
            out[path] = np.asarray(flat[source[1]])[source[2]]
        elif source[0] == "stack":
            out[path] = np.stack([np.asarray(flat[p]) for p in source[1]])
    return out


def stack_layout_sources(flat: dict[tuple, Any], target: dict[tuple, Any]) -> dict[tuple, tuple]:
    """Where each path of `target` comes from in `flat` (see `match_stack_layout`):
    ("same", path); ("layer", stacked path, i): layer i of a scanned stack of `flat`; or
    ("stack", (layer paths, ...)): unrolled layers of `flat`, stacked. Paths of `target`
    found in neither layout are left out."""
    sources = {}
    for path, want in target.items():
        if path in flat:
            sources[path] = ("same", path)
        else:
            source = _other_layout_source(flat, path, getattr(want, "shape", ()))
            if source is not None:
                sources[path] = source
    return sources


def unused_by_layout(flat: dict[tuple, Any], sources: dict[tuple, tuple]) -> list[str]:
    """The arrays of `flat` that `sources` (`stack_layout_sources(flat, target)`) leave unused:
    "a/b" for a whole array, "a/blocks/w[i]" for a layer of a scanned stack that no target
    path takes (a deeper model's stack sliced for a shallower one)."""
    whole, layers = set(), {}
    for source in sources.values():
        if source[0] == "layer":
            layers.setdefault(source[1], set()).add(source[2])
        else:
            whole.update(source_paths(source))
    unused = []
    for path, value in flat.items():
        if path in layers:
            unused += [f"{'/'.join(path)}[{i}]" for i in range(np.shape(value)[0])
                       if i not in layers[path]]
        elif path not in whole:
            unused.append("/".join(path))
    return unused


def extra_layers(flat: dict[tuple, Any], sources: dict[tuple, tuple]) -> list[str]:
    """The layers of `flat`'s stacks beyond a shallower target's depth: layers of a scanned
    stack that `sources` slice but leave out ("a/blocks/w[3]"), and unrolled layers of a stack
    whose other layers `sources` take ("a/blocks_3/w"). Groups that `sources` take nothing
    from are not counted (an init may load part of a model)."""
    def stem(path):  # blocks_3 -> blocks_#: the layers of one unrolled stack share a stem
        layers = [_unrolled_layer(part) for part in path]
        return tuple(STACK_NAMES[layer[0]].format("#") if layer else part
                     for part, layer in zip(path, layers))

    taken = {stem(p) for source in sources.values() for p in source_paths(source)}
    extra = []
    for item in unused_by_layout(flat, sources):
        path = tuple(item.split("/"))
        if item.endswith("]") or (stem(path) != path and stem(path) in taken):
            extra.append(item)
    return extra


def source_paths(source: tuple) -> tuple:
    """The paths of `flat` that a `stack_layout_sources` entry reads."""
    return source[1] if source[0] == "stack" else (source[1],)


def _other_layout_source(flat: dict[tuple, Any], path: tuple, shape: tuple) -> Optional[tuple]:
    for j, part in enumerate(path):
        head, tail = path[:j], path[j + 1:]
        if part in STACK_NAMES and shape:  # scanned in the target: stack the unrolled layers
            names = tuple(head + (STACK_NAMES[part].format(i),) + tail for i in range(shape[0]))
            if all(n in flat for n in names):
                return ("stack", names)
        layer = _unrolled_layer(part)  # unrolled in the target: slice the stack
        if layer is not None:
            layers = head + (layer[0],) + tail
            if layers in flat and layer[1] < np.shape(flat[layers])[0]:
                return ("layer", layers, layer[1])
    return None


def _unrolled_layer(part: str) -> Optional[tuple[str, int]]:
    """(stack name, layer index) of an unrolled layer's name (`blocks_3` -> ("blocks", 3));
    None for any other name."""
    for stacked, pattern in STACK_NAMES.items():
        prefix = pattern.format("")
        if part.startswith(prefix) and part[len(prefix):].isdigit():
            return stacked, int(part[len(prefix):])
    return None


def unrolled(model: nn.Module, params: Any) -> tuple[nn.Module, Any]:
    """The same model with its layer stack unrolled (`scan=False`) and its params re-laid out
    (`transformer/blocks` with a leading layer axis -> `blocks_0` .. `blocks_{depth-1}`);
    identity for an unrolled model. Cached decoding uses it: with the scanned stack, the layer
    scan slices and re-stacks the whole KV cache at every token (a full copy of it per token in
    XLA's program); unrolled, each layer's cache is updated in place. Works under jit (the
    slices are free)."""
    if not model.scan:
        return model, params
    stack = dict(params["transformer"])
    blocks = stack.pop("blocks")
    for i in range(model.depth):
        stack[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    return model.clone(scan=False), {**params, "transformer": stack}


def cast_params(params: Any, dtype: Dtype, names: tuple[str, ...]) -> Any:
    """`params` with the floating leaves named one of `names` (e.g. "kernel", "embedding" and
    the model's tables) cast to `dtype`. A model that casts each of those leaves to its compute
    dtype where it is used (a kernel before its matmul, a table row after its lookup, which
    commute) computes bitwise the same outputs from the cast params; cached decoding casts once
    before its token loop instead of at every decoded token."""
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name in names and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, params)
