"""MaskGIT generators of TiTok (bytedance/1d-tokenizer `modeling/maskgit.py`).

Both predict, for every one of the N image-token positions, logits over the K tokenizer codes
from a sequence [class token, N tokens] in which some tokens are the [MASK] id. Token ids (the
official embedding-table layout, so released weights load unchanged):

    0 .. K-1          tokenizer codes
    K                 [MASK]                                  (`mask_id`)
    K+1 .. K+C        class c is id K+1+c                     (C = num_classes)
    K+1+C             the "null" class (unconditional / CFG)  (label `null_label` = C)

so the class token of label l (0 <= l <= C) is simply K+1+l and the vocabulary has K+C+2 rows.

`MaskGITBert` (official `ImageBert`, the L-32 / B-64 generators): a Hugging Face `BertModel`
without pooler. Official key -> tok1d parameter:

    model.embeddings.word_embeddings        word_embeddings        (vocab, embed)
    model.embeddings.position_embeddings    position_embeddings    (N+1, embed)
    model.embeddings.token_type_embeddings  token_type_embeddings  (2, embed); row 0 is added
    model.embeddings.LayerNorm              embed_ln
    model.encoder.layer.i.attention.self.{query,key,value}   transformer/blocks/attn/{query,key,value}
    model.encoder.layer.i.attention.output.dense             transformer/blocks/attn/out
    model.encoder.layer.i.attention.output.LayerNorm         transformer/blocks/ln_1
    model.encoder.layer.i.{intermediate,output}.dense        transformer/blocks/mlp/{fc1,fc2}
    model.encoder.layer.i.output.LayerNorm                   transformer/blocks/ln_2
    model.lm_head                           lm_head                (embed, vocab=K)

(`blocks` carries a leading layers axis when `scan=True`, else `blocks_{i}`.)

`MaskGITUViT` (official `UViTBert`, the S-128 generator): `embeddings` -> `embeddings`,
`pos_embed (1, N+1, W)` -> `pos_embed (N+1, W)`, `in_blocks.i` -> `in_blocks_{i}`, `mid_block` ->
`mid_block`, `out_blocks.i` -> `out_blocks_{i}` (its `skip_linear` -> `skip_linear_{i}`), block
`norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2` -> `ln_1/attn.{query,key,value}/attn.out/ln_2/
mlp.fc1/mlp.fc2`, `norm` -> `norm`, `lm_head` -> `lm_head`. See `tok1d.weights.convert.maskgit`.

Generator interface (`tok1d.models.interfaces.Generator`, objective "masked"): `model(tokens
(B, N) int32 in [0, K], labels (B,) int32 in [0, C], train=False) -> logits (B, N, K) float32`,
`vocab_size` (= K = `codebook_size`), `mask_id`, `null_label`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d.layers import transformer
from tok1d.layers.transformer import logical
from tok1d.models.presets import check_kwargs

Dtype = Any

# Released generators (configs/infer/TiTok/*.yaml, `model.generator`); K = 4096 codes, 1000
# classes. `depth` is the official `num_hidden_layers` (for the U-ViT: depth // 2 in-blocks, a
# mid block and depth // 2 out-blocks).
GENERATOR_SIZES: dict[str, dict[str, Any]] = {
    "l32": dict(arch="vit", width=768, depth=24, num_heads=16, mlp_dim=3072, num_tokens=32,
                codebook_size=4096),
    "b64": dict(arch="vit", width=768, depth=24, num_heads=16, mlp_dim=3072, num_tokens=64,
                codebook_size=4096),
    "s128": dict(arch="uvit", width=1024, depth=20, num_heads=16, mlp_dim=4096, num_tokens=128,
                 codebook_size=4096),
    # The two released architectures without token count / codebook (give those explicitly).
    "vit": dict(arch="vit", width=768, depth=24, num_heads=16, mlp_dim=3072),
    "uvit": dict(arch="uvit", width=1024, depth=20, num_heads=16, mlp_dim=4096),
    # Tiny sizes for tests and the CPU demo (not released models).
    "tiny": dict(width=32, depth=2, num_heads=2, mlp_dim=128),
    "small": dict(width=128, depth=4, num_heads=4, mlp_dim=512),
}


class _GeneratorBase(nn.Module):
    """Fields and token-id helpers shared by both generators (the generator interface of
    `tok1d.models.interfaces`, objective "masked")."""

    objective: ClassVar[str] = "masked"
    codebook_size: int
    num_tokens: int
    num_classes: int = 1000
    width: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def vocab_size(self) -> int:
        """Tokenizer codes predicted (K)."""
        return self.codebook_size

    @property
    def num_embeddings(self) -> int:
        """Rows of the input-id table: K codes, [MASK], C classes and the null class."""
        return self.codebook_size + self.num_classes + 2

    def _input_ids(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """[K+1+label, tokens...] (B, N+1): the official prepended class token."""
        if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"tokens must be (B, {self.num_tokens}), got {tokens.shape}")
        cls = labels.astype(jnp.int32) + (self.codebook_size + 1)
        return jnp.concatenate([cls[:, None], tokens.astype(jnp.int32)], axis=1)

    def _table(self, name: str, rows: int) -> jax.Array:
        return self.param(name, logical(transformer.default_kernel_init, ("vocab", "embed")),
                          (rows, self.width), self.param_dtype)

    def _lm_head(self, x: jax.Array) -> jax.Array:
        """Linear W -> K on positions 1..N (the class position is dropped), float32 logits."""
        x = nn.Dense(self.codebook_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=logical(transformer.default_kernel_init, ("embed", "vocab")),
                     bias_init=logical(nn.initializers.zeros, ("vocab",)),
                     name="lm_head")(x[:, 1:])
        return x.astype(jnp.float32)


class MaskGITBert(_GeneratorBase):
    """Official `ImageBert`: HF BERT (post-LN, LayerNorm eps 1e-12, exact GELU) over
    [class token, N tokens]; embeddings = word + learned absolute position (N+1 rows) + token-type
    row 0, then LayerNorm and dropout; `lm_head` (with bias, not tied) on positions 1..N.

    Dropout (`dropout_rate`, the official `dropout` 0.1) acts after the embedding LayerNorm and on
    both residual branches, `attention_dropout` (the official `attn_drop` 0.1, BERT's
    `attention_probs_dropout_prob`) on the attention probabilities; both only with `train=True`
    (rng "dropout"). Inference is unaffected.
    """

    attention_dropout: float = 0.1
    scan: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, tokens: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        ids = self._input_ids(tokens, labels)
        word = self._table("word_embeddings", self.num_embeddings)
        pos = self.param("position_embeddings",
                         logical(transformer.default_kernel_init, ("length", "embed")),
                         (self.num_tokens + 1, self.width), self.param_dtype)
        token_type = self.param("token_type_embeddings",
                                logical(transformer.default_kernel_init, (None, "embed")),
                                (2, self.width), self.param_dtype)
        x = jnp.take(word, ids, axis=0) + token_type[0] + pos[: ids.shape[1]]
        x = transformer.LayerNorm(epsilon=1e-12, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="embed_ln")(x.astype(self.dtype))
        x = nn.Dropout(self.dropout_rate, deterministic=not train or not self.dropout_rate)(x)
        x = transformer.Transformer(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=False,
            norm_eps=1e-12, activation="gelu", dropout_rate=self.dropout_rate,
            attention_dropout=self.attention_dropout, scan=self.scan,
            qkv_init=transformer.default_kernel_init,  # HF BERT: every Linear starts N(0, 0.02)
            remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype, name="transformer")(x, None, not train)
        return self._lm_head(x)


class MaskGITUViT(_GeneratorBase):
    """Official `UViTBert`: token embedding + learned `pos_embed` (N+1 rows), pre-LN U-ViT blocks
    (LayerNorm eps 1e-5, qkv without bias, exact GELU): depth // 2 in-blocks whose outputs are
    kept as skips, a mid block, depth // 2 out-blocks that first apply `skip_linear` to
    concat([x, skip]) (x first; skips consumed last-in first-out), a final LayerNorm and
    `lm_head` on positions 1..N.

    The official U-ViT blocks use no dropout (their `drop`/`attn_drop` stay 0 although the config
    has `dropout`), hence `dropout_rate` defaults to 0 here; a non-zero value drops the residual
    branches when `train=True`. `remat` rematerialises each block ("none" / "full" / "dots" / a
    `jax.checkpoint_policies` name).
    """

    dropout_rate: float = 0.0
    remat: str = "none"

    def _block(self, name: str) -> nn.Module:
        cls = transformer.maybe_remat(transformer.Block, self.remat, static_argnums=(3,))
        return cls(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=True, norm_eps=1e-5,
                   activation="gelu", qkv_bias=False, attention_impl=self.attention_impl,
                   dropout_rate=self.dropout_rate, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, tokens: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        ids = self._input_ids(tokens, labels)
        table = self._table("embeddings", self.num_embeddings)
        pos = self.param("pos_embed", logical(transformer.default_kernel_init, ("length", "embed")),
                         (self.num_tokens + 1, self.width), self.param_dtype)
        x = (jnp.take(table, ids, axis=0) + pos[: ids.shape[1]]).astype(self.dtype)
        det = not train
        skips = []
        for i in range(self.depth // 2):
            x = self._block(f"in_blocks_{i}")(x, None, det)
            skips.append(x)
        x = self._block("mid_block")(x, None, det)
        for i in range(self.depth // 2):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                         kernel_init=logical(transformer.default_kernel_init, (None, "embed")),
                         bias_init=logical(nn.initializers.zeros, ("embed",)),
                         name=f"skip_linear_{i}")(x)
            x = self._block(f"out_blocks_{i}")(x, None, det)
        x = transformer.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="norm")(x)
        return self._lm_head(x)


ARCHS = {"vit": MaskGITBert, "uvit": MaskGITUViT}


def build(arch: Optional[str] = None, size: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """MaskGIT generator from an architecture ("vit" = `MaskGITBert`, "uvit" = `MaskGITUViT`;
    default "vit") and/or a size name of `GENERATOR_SIZES` (released generators "l32", "b64",
    "s128"; architectures "vit", "uvit"; explicit keyword arguments win over the size's
    values)."""
    if size is not None:
        if size not in GENERATOR_SIZES:
            raise ValueError(f"Unknown MaskGIT generator size {size!r}; known: "
                             f"{sorted(GENERATOR_SIZES)}.")
        preset = dict(GENERATOR_SIZES[size])
        size_arch = preset.pop("arch", None)
        if arch is not None and size_arch is not None and arch != size_arch:
            raise ValueError(f"Generator size {size!r} is a {size_arch!r} model, not {arch!r}.")
        arch = arch or size_arch
        for key, value in preset.items():
            kwargs.setdefault(key, value)
    arch = arch or "vit"
    if arch not in ARCHS:
        raise ValueError(f"Unknown MaskGIT architecture {arch!r}; expected one of {sorted(ARCHS)}.")
    cls = ARCHS[arch]
    check_kwargs(cls, kwargs, f"model 'maskgit' (arch {arch!r}, plus arch/size)")
    return cls(**kwargs)
