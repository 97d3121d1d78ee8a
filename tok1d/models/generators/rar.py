"""RAR, the randomized autoregressive generator of bytedance/1d-tokenizer (`modeling/rar.py`):
a causal transformer over tokenizer codes, trained on randomly permuted token orders and
sampled in raster order.

Sequence positions p = 0 .. N: [cls token, class token, x_0 .. x_{N-2}] where x_i is the i-th
code of the (permuted) order `orders` (B, N) (raster: orders[b] = 0..N-1); position p >= 1
predicts x_{p-1}, i.e. code orders[p-1] of the image. Added to position p:

* the code / class embedding (`embeddings`, one table in the official id layout: codes 0..K-1,
  the unused [MASK] K, class c at K+1+c, the null class K+1+C; label `null_label` = C);
  the cls token is the learned `cls_token` (1, W);
* `pos_embed`: row p for the cls and class tokens, row 2 + orders[i] for x_i (the position of
  the code in the image);
* the target-aware `target_aware_pos_embed`: row orders[p-1] at p >= 1 (the image position of
  the code position p predicts; nothing at p = 0);
* the adaLN condition of every block and of the head is per position: the class token's
  embedding + `timesteps_embeddings` row p.

Blocks (`transformer.Block` with `adaln` and `qk_norm`): LayerNorm eps 1e-6, DiT's adaLN-Zero
(shift, scale, gate per branch from silu(condition)), qkv and proj with biases, per-head
LayerNorm on q and k, exact-GELU MLP; dropout `dropout_rate` on both branch outputs and the
MLP's hidden activations, `attention_dropout` on the attention probabilities (the official
`dropout` / `attn_drop`, 0.1 in the released recipe). Head (`adaln_before_head`): LayerNorm
without affine modulated by (scale, shift) of the condition, then `lm_head` (with bias) to the
K codes; logits in float32. Linear / embedding weights start from N(0, 0.02), the adaLN
modulations from zero, `cls_token` from zero, like upstream.

Tables: upstream allocates `pos_embed` and `target_aware_pos_embed` with N + 1024 rows and
`timesteps_embeddings` with N + 100 rows and reads rows 0..N+1, 2..N+1 and 0..N+1 of them; the
last position's output (and so timestep row N+1) is never used. tok1d keeps the rows that are
read: N + 2, N and N + 1 (`tok1d.weights.convert.rar` cuts the released tables).

Teacher forcing (`__call__(codes, labels, train, orders)`) feeds x_0 .. x_{N-2} and returns the
logits of x_0 .. x_{N-1} (upstream feeds all N codes and drops the last output: the same
numbers). Label dropout and the permutation are drawn by the training loss
(`tok1d.objectives.tokens`, objective "permuted_next_token").

Cached decoding in raster order (as upstream `generate` with `kv_cache=True`; "cache"
collection, apply with `mutable=["cache"]`):

    cache = transformer.init_cache(model, params, batch_size)   # N + 1 positions
    logits, v = model.apply({"params": params, "cache": cache}, labels,
                            method=RAR.prefill, mutable=["cache"])   # cls + class: code 0
    logits, v = model.apply({"params": params, **v}, code, method=RAR.decode,
                            mutable=["cache"])              # feed code t, get code t + 1

The cache keeps the position and the class embedding, so `decode` takes the code only.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers import transformer
from tok1d.layers.transformer import Dtype, logical
from tok1d.models.presets import build_generator

# The released sizes (README_RAR.md: 16 heads each; intermediate_size as `mlp_dim`).
RAR_SIZES: dict[str, dict[str, int]] = {
    "B": dict(width=768, depth=24, num_heads=16, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "XL": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
    "XXL": dict(width=1408, depth=40, num_heads=16, mlp_dim=6144),
}

# The leaves the sampler casts to the compute dtype once (`transformer.cast_params`): matmul
# kernels and the tables (every one is cast where it is used, so the outputs are unchanged).
COMPUTE_LEAVES = ("kernel", "embedding", "cls_token", "pos_embed", "target_aware_pos_embed",
                  "timesteps_embeddings")


def size_kwargs(size: str) -> dict[str, int]:
    """RAR_SIZES entry for "B", "L", "XL", "XXL" (also "rar_b", "RAR-L", ...)."""
    key = size.upper().removeprefix("RAR").lstrip("-_")
    if key not in RAR_SIZES:
        raise ValueError(f"Unknown RAR size {size!r}; known: {sorted(RAR_SIZES)}.")
    return dict(RAR_SIZES[key])


class FinalLayer(nn.Module):
    """Upstream `FinalLayer`: LayerNorm without affine, modulated by (scale, shift) =
    `adaLN_modulation`(silu(condition)) (zero-initialised)."""

    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        mod = nn.Dense(2 * x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=logical(nn.initializers.zeros, ("embed", "mlp")),
                       bias_init=logical(nn.initializers.zeros, ("mlp",)),
                       name="adaLN_modulation")(nn.silu(cond))
        scale, shift = jnp.split(mod, 2, axis=-1)
        x = transformer.LayerNorm(self.norm_eps, use_bias=False, use_scale=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  name="norm_final")(x)
        return transformer.modulate(x, shift, scale)


class RAR(nn.Module):
    """Class-conditional RAR over `num_tokens` codes of a `vocab_size` codebook (the generator
    interface of `tok1d.models.interfaces`, objective "permuted_next_token")."""

    objective: ClassVar[str] = "permuted_next_token"
    compute_leaves: ClassVar[tuple[str, ...]] = COMPUTE_LEAVES
    vocab_size: int
    num_tokens: int
    num_classes: int = 1000
    width: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_dropout: float = 0.1
    norm_eps: float = 1e-6
    scan: bool = True
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def null_label(self) -> int:
        """The class id of the unconditional (null) condition."""
        return self.num_classes

    @property
    def num_embeddings(self) -> int:
        """Rows of the `embeddings` table: K codes, [MASK], C classes, the null class."""
        return self.vocab_size + 1 + self.num_classes + 1

    def raster_orders(self, batch_size: int) -> jax.Array:
        return jnp.broadcast_to(jnp.arange(self.num_tokens, dtype=jnp.int32),
                                (batch_size, self.num_tokens))

    def __call__(self, codes: jax.Array, labels: jax.Array, train: bool = False,
                 orders: Optional[jax.Array] = None) -> jax.Array:
        """Teacher forcing: codes (B, N) int in image order, labels (B,) in [0, num_classes],
        `orders` (B, N) a permutation per sequence (None: raster) -> logits (B, N, vocab)
        float32, position i predicting code orders[:, i] (upstream `forward_fn(input_ids,
        condition, orders=orders)` without its last output)."""
        if orders is None:
            orders = self.raster_orders(codes.shape[0])
        orders = orders.astype(jnp.int32)
        permuted = jnp.take_along_axis(codes.astype(jnp.int32), orders, axis=1)
        return self._forward(labels, permuted[:, :-1], orders, train=train, decode=False)

    def prefill(self, labels: jax.Array) -> jax.Array:
        """Cached decoding, first call: the cls and class tokens (positions 0, 1) into an
        initialised cache; returns the logits (B, vocab) of code 0."""
        return self._forward(labels, None, None, train=False, decode=True)[:, -1]

    def decode(self, codes: jax.Array) -> jax.Array:
        """Cached decoding, one step: codes (B,) is the code at the cache's current position
        (raster order); returns the logits (B, vocab) of the following code."""
        return self._forward(None, codes[:, None], None, train=False, decode=True)[:, -1]

    def init_cache(self, batch_size: int) -> None:
        """Creates the empty cache for `batch_size` sequences of num_tokens + 1 positions (apply
        with `mutable=["cache"]`; the computation on the dummy input is dead code under jit)."""
        labels = jnp.zeros((batch_size,), jnp.int32)
        codes = jnp.zeros((batch_size, self.num_tokens - 1), jnp.int32)
        self._forward(labels, codes, None, train=False, decode=True)

    def _table(self, name: str, rows: int) -> jax.Array:
        return self.param(name, logical(transformer.default_kernel_init, (None, "embed")),
                          (rows, self.width), self.param_dtype)

    @nn.compact
    def _forward(self, labels: Optional[jax.Array], codes: Optional[jax.Array],
                 orders: Optional[jax.Array], train: bool, decode: bool) -> jax.Array:
        n, width = self.num_tokens, self.width
        embed = nn.Embed(self.num_embeddings, width,
                         embedding_init=logical(transformer.default_kernel_init,
                                                (None, "embed")),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="embeddings")
        cls_token = self.param("cls_token", logical(nn.initializers.zeros, (None, "embed")),
                               (1, width), self.param_dtype)
        pos_embed = self._table("pos_embed", n + 2)
        target_embed = self._table("target_aware_pos_embed", n)
        time_embed = self._table("timesteps_embeddings", n + 1)

        parts = []
        if labels is not None:  # the sequence starts here: cls token, class token
            condition = embed(labels.astype(jnp.int32) + self.vocab_size + 1)
            batch = labels.shape[0]
            parts += [jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, width)),
                      condition[:, None]]
        if codes is not None:
            parts.append(embed(codes.astype(jnp.int32)))
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        batch, length = x.shape[:2]

        start = jnp.zeros((), jnp.int32)
        if decode:
            created = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            kept = self.variable("cache", "condition", jnp.zeros, (batch, width), self.dtype)
            start = position.value
            if labels is not None:
                kept.value = condition
            condition = kept.value
            if created:
                position.value = start + length
        if orders is None:
            orders = self.raster_orders(batch)
        positions = start + jnp.arange(length, dtype=jnp.int32)

        # Image position of the code at each sequence position (cls, class: their own rows),
        # and of the code each position predicts (none for the cls token).
        source = jnp.concatenate([jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (batch, 2)),
                                  orders + 2], axis=1)
        rows = jnp.take(source, positions, axis=1)
        target = jnp.take(orders, jnp.maximum(positions - 1, 0), axis=1)
        target_add = jnp.where((positions >= 1)[None, :, None],
                               jnp.take(target_embed, target, axis=0), 0.0)
        x = (x + jnp.take(pos_embed, rows, axis=0).astype(self.dtype)
             + target_add.astype(self.dtype))
        cond = condition[:, None] + jnp.take(time_embed, positions, axis=0)[None].astype(
            self.dtype)
        x, cond = transformer.constrain(x), transformer.constrain(cond)

        mask = None if decode else jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
        x = transformer.Transformer(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=True, norm="layernorm",
            norm_eps=self.norm_eps, activation="gelu", qkv_bias=True, use_bias=True,
            qk_norm=True, adaln=True, attention_impl=self.attention_impl,
            dropout_rate=self.dropout_rate, attention_dropout=self.attention_dropout,
            mlp_dropout=self.dropout_rate, qkv_init=transformer.default_kernel_init,
            depth=self.depth, scan=self.scan, remat=self.remat, dtype=self.dtype,
            param_dtype=self.param_dtype, name="transformer")(x, mask, not train, decode, None,
                                                              cond)
        if labels is not None:  # drop the cls token's output
            x, cond = x[:, 1:], cond[:, 1:]
        x = FinalLayer(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="adaln_before_head")(x, cond)
        logits = nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=logical(transformer.default_kernel_init,
                                              ("embed", "vocab")),
                          bias_init=logical(nn.initializers.zeros, ("vocab",)),
                          name="lm_head")(x)
        return logits.astype(jnp.float32)


def build(size: Optional[str] = None, **kwargs: Any) -> RAR:
    """RAR from a size name (RAR_SIZES: "B", "L", "XL", "XXL") and/or explicit `RAR` arguments
    (which win); `vocab_size` and `num_tokens` are required."""
    return build_generator(RAR, "rar", size_kwargs, size, kwargs)
