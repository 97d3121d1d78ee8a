"""LlamaGen-style class-conditional GPT over tokenizer codes (GigaTok's AR generator).

Reproduces `autoregressive/models/gpt_1d.py` `Transformer` of SilentView/GigaTok in `c2i` mode
(the generator GigaTok trains and samples with):

* input sequence [class token, codes[:-1]]: the class embedding (table of num_classes + 1 rows,
  the last row is the null class of classifier-free guidance), then the code embeddings;
  learned absolute positions (num_tokens + 1 rows, init N(0, 1)·width^-0.5) added to all;
  token dropout (0.1) on the sum;
* pre-norm blocks x + Attn(RMSNorm(x)), h + SwiGLU(RMSNorm(h)), RMSNorm eps 1e-5 in float32,
  bias-free attention (the official fused `wqkv` is split into query/key/value), causal, no
  attention dropout; SwiGLU w2(silu(w1 x) * w3 x) with LlamaGen's hidden width
  round_up(int(2 * 4 * width / 3), 256); residual dropout (0.1) on both branch outputs;
* final RMSNorm and a bias-free `output` head (zero-initialised), logits in float32;
  position t predicts code t.

Linear / embedding weights start from N(0, 0.02) like upstream. Label dropout for CFG
(upstream: inside `LabelEmbedder` when training) is the trainer's job here
(`tok1d.objectives.tokens.drop_labels` with `null_label`).

`rope=True` switches to LlamaGen's `autoregressive/models/gpt.py` variant (`--gpt-2d`): no
learned positions, 2D rotary embedding on q and k (half of each head's pairs rotate with the
grid row, half with the column, base `rope_base`; num_tokens must be a square) and the class
position's table is all zeros, i.e. the class token's q and k are zeroed, as upstream. (The 1D
RoPE option of `gpt_1d.py` is not reproduced: it calls `precompute_freqs_cis` with
cls_token_num in the `base` slot, so base 1 and 120 zero rows; it is off in every release.)

`hidden_states` is the teacher-forced residual stream (eval mode unless `train`) before the
final RMSNorm (upstream `forward(..., ret_inner_feat_layer=...)`), for GigaTok's linear probe
(`tok1d.evaluation.linear_probe`, which cuts the stack to its first n blocks).

Cached decoding ("cache" collection, see `transformer.Attention`; apply with `mutable=["cache"]`):

    cache = transformer.init_cache(model, params, batch_size)   # zeros, index 0
    logits, v = model.apply({"params": params, "cache": cache}, labels,
                            method=GPT.prefill, mutable=["cache"])   # code 0 logits (B, V)
    logits, v = model.apply({"params": params, **v}, code, method=GPT.decode,
                            mutable=["cache"])              # feed code t, get code t+1 logits

The current position is kept in the cache (`cache["position"]`), so `decode` takes no
position argument.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d.layers import transformer
from tok1d.layers.transformer import Dtype, logical
from tok1d.models.presets import build_generator

# LlamaGen's class-conditional sizes (gpt_1d.py GPT_models; parameter counts for vocab 16384
# and 256 tokens in the comments, see tests/test_gpt_sampling.py).
GPT_SIZES: dict[str, dict[str, int]] = {
    "B": dict(width=768, depth=12, num_heads=12),       # 111.1M
    "L": dict(width=1024, depth=24, num_heads=16),      # 343.2M
    "XL": dict(width=1280, depth=36, num_heads=20),     # 775.0M
    "XXL": dict(width=1536, depth=48, num_heads=24),    # 1411.4M
    "XXXL": dict(width=2560, depth=48, num_heads=40),   # 3893.7M
}


# The leaves the sampler casts to the compute dtype once (`compute_params`): matmul kernels and
# embedding tables (the RMSNorm scales, used in float32, stay as they are).
COMPUTE_LEAVES = ("kernel", "embedding", "positional_embedding")


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (LlamaGen's `find_multiple`)."""
    return n if n % k == 0 else n + k - n % k


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU hidden width: round_up(int(2 * 4 * width / 3), multiple_of)."""
    return find_multiple(int(2 * (4 * width) / 3), multiple_of)


def size_kwargs(size: str) -> dict[str, int]:
    """GPT_SIZES entry for "B", "L", ... (also accepts LlamaGen's "GPT-B" spelling)."""
    key = size.upper().removeprefix("GPT-")
    if key not in GPT_SIZES:
        raise ValueError(f"Unknown GPT size {size!r}; known: {sorted(GPT_SIZES)}.")
    return dict(GPT_SIZES[key])


def rope_2d_tables(positions: jax.Array, num_tokens: int, head_dim: int,
                   base: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """LlamaGen's `precompute_freqs_cis_2d` rows for `positions` (0 = class token -> zeros;
    p >= 1 -> grid cell p - 1, row-major): cos, sin of shape (L, head_dim // 2)."""
    grid = int(round(num_tokens ** 0.5))
    if grid * grid != num_tokens:
        raise ValueError(f"2D RoPE needs a square number of tokens, got {num_tokens}.")
    half = head_dim // 2
    freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float32) / half))
    freqs = jnp.asarray(freqs, jnp.float32)
    cell = jnp.maximum(positions - 1, 0)
    rows, cols = (cell // grid).astype(jnp.float32), (cell % grid).astype(jnp.float32)
    angles = jnp.concatenate([rows[:, None] * freqs, cols[:, None] * freqs], axis=-1)
    is_class = (positions == 0)[:, None]
    cos = jnp.where(is_class, 0.0, jnp.cos(angles))
    sin = jnp.where(is_class, 0.0, jnp.sin(angles))
    return cos, sin


class GPT(nn.Module):
    """Class-conditional LlamaGen GPT over `num_tokens` codes of a `vocab_size` codebook (the
    generator interface of `tok1d.models.interfaces`, objective "next_token")."""

    objective: ClassVar[str] = "next_token"
    compute_leaves: ClassVar[tuple[str, ...]] = COMPUTE_LEAVES
    vocab_size: int
    num_tokens: int
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: Optional[int] = None  # None: swiglu_hidden(width)
    token_dropout: float = 0.1
    dropout_rate: float = 0.1
    rope: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    scan: bool = True
    remat: str = "none"
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def null_label(self) -> int:
        """The class id of the unconditional (null) embedding."""
        return self.num_classes

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else swiglu_hidden(self.width)

    def __call__(self, codes: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        """Teacher forcing: codes (B, N) int, labels (B,) in [0, num_classes] -> logits
        (B, N, vocab) float32, position t predicting code t (upstream
        `forward(idx=codes[:, :-1], cond_idx=labels)`)."""
        return self._forward(labels, codes[:, :-1], train=train, decode=False)

    def hidden_states(self, codes: jax.Array, labels: jax.Array, train: bool = False
                      ) -> jax.Array:
        """Teacher forcing without the head (`train`: with dropout, as upstream's
        train-mode features; default eval mode): codes (B, N), labels (B,) -> the
        residual stream after the last of the `depth` blocks, before the final RMSNorm,
        (B, N, width) float32, position 0 being the class token (upstream `forward` with
        `ret_inner_feat_layer=depth`). For the state after the first n blocks, apply this to
        `model.clone(depth=n)` with the first n layers' parameters
        (`tok1d.evaluation.linear_probe.truncate`)."""
        return self._forward(labels, codes[:, :-1], train=train, decode=False, hidden=True)

    def prefill(self, labels: jax.Array, codes: Optional[jax.Array] = None) -> jax.Array:
        """Cached decoding, first call: feeds the class token (and optionally a prefix of codes
        (B, P)) from position 0 into an initialised cache; returns the logits (B, vocab) of the
        next code."""
        return self._forward(labels, codes, train=False, decode=True)[:, -1]

    def decode(self, codes: jax.Array) -> jax.Array:
        """Cached decoding, one step: codes (B,) is the code at the cache's current position
        (>= 1); returns the logits (B, vocab) of the following code."""
        return self._forward(None, codes[:, None], train=False, decode=True)[:, -1]

    def init_cache(self, batch_size: int) -> None:
        """Creates the empty cache for `batch_size` sequences of num_tokens positions (apply
        with `mutable=["cache"]`; the computation on the dummy input is dead code under jit)."""
        labels = jnp.zeros((batch_size,), jnp.int32)
        codes = jnp.zeros((batch_size, self.num_tokens - 1), jnp.int32)
        self._forward(labels, codes, train=False, decode=True)

    @nn.compact
    def _forward(self, labels: Optional[jax.Array], codes: Optional[jax.Array], train: bool,
                 decode: bool, hidden: bool = False) -> jax.Array:
        width = self.width
        embed_init = nn.initializers.normal(stddev=0.02)
        parts = []
        if labels is not None:
            cls_table = nn.Embed(self.num_classes + 1, width,
                                 embedding_init=logical(embed_init, (None, "embed")),
                                 dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="cls_embedding")
            parts.append(cls_table(labels.astype(jnp.int32))[:, None])
        tok_table = nn.Embed(self.vocab_size, width,
                             embedding_init=logical(embed_init, ("vocab", "embed")),
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             name="tok_embeddings")
        if codes is not None:
            parts.append(tok_table(codes.astype(jnp.int32)))
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        length = x.shape[1]

        start = jnp.zeros((), jnp.int32)
        if decode:
            created = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            start = position.value
            if created:
                position.value = start + length
        positions = start + jnp.arange(length, dtype=jnp.int32)

        rope = None
        if self.rope:
            rope = rope_2d_tables(positions, self.num_tokens, width // self.num_heads,
                                  self.rope_base)
        else:
            table = transformer.embedding_param(self, "positional_embedding",
                                           (self.num_tokens + 1, width), (None, "embed"),
                                           width ** -0.5, self.param_dtype)
            x = x + jnp.take(table, positions, axis=0).astype(x.dtype)
        x = nn.Dropout(self.token_dropout, deterministic=not train or not self.token_dropout)(x)
        x = transformer.constrain(x)

        mask = None if decode else jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
        x = transformer.Transformer(
            num_heads=self.num_heads, mlp_dim=self.hidden_dim, pre_norm=True, norm="rmsnorm",
            norm_eps=self.norm_eps, activation="swiglu", qkv_bias=False, use_bias=False,
            attention_impl=self.attention_impl, dropout_rate=self.dropout_rate,
            qkv_init=transformer.default_kernel_init, depth=self.depth, scan=self.scan,
            remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
            name="transformer")(x, mask, not train, decode, rope)
        if hidden:  # `hidden_states`: the stack's output, before the final norm and head.
            return x.astype(jnp.float32)
        x = transformer.RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="norm")(x)
        logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          kernel_init=logical(nn.initializers.zeros, ("embed", "vocab")),
                          name="output")(x)
        return logits.astype(jnp.float32)


def compute_params(model: GPT, params: Any) -> Any:
    """`params` with the matmul kernels and embedding tables cast to the compute dtype
    `model.dtype` (`transformer.cast_params`): the logits are bitwise unchanged."""
    return transformer.cast_params(params, model.dtype, model.compute_leaves)


def build(size: Optional[str] = None, **kwargs: Any) -> GPT:
    """GPT from a size name (GPT_SIZES: "B", "L", "XL", "XXL", "XXXL") and/or explicit
    `GPT` arguments (which win); `vocab_size` and `num_tokens` are required."""
    return build_generator(GPT, "gpt", size_kwargs, size, kwargs)
