"""Ordered variable-length 1D tokens: nested (tail) token dropout for TiTok and GigaTok 1D.

Training with `nested_dropout` != "none" keeps, per example, a random prefix of k of the N
latent tokens (k from `sample_prefix_lengths`); the decoder sees the other N - k replaced by one
learned mask vector (`TailMask`, in the latent / code space, before the decoder's input
embedding). Only the first k tokens then reach the decoder, so the encoder learns to put the
coarse content first and the first k tokens of any image decode for any k in 1..N.

Why a mask vector and not dropping the tail from attention: this is FlexTok's choice (nested
dropout replaces the dropped registers by a learned mask token; One-D-Piece's tail token drop
is the same idea on TiTok). It keeps every shape static (one compiled step for all k, a
per-example k without attention masks), leaves the transformer stacks untouched, and makes
decoding a prefix exact: `decode_codes` of (B, k) codes pads them to N with the mask vector,
which is what training showed the decoder. A model trained without the option has no mask
vector; its decoder then reads the k tokens alone (both decoders accept fewer latent tokens,
attending to what is there), which is defined but was never trained.

Units: the model's `prefix_lengths` count latent tokens; a prefix of codes (`decode_codes`,
`prefix_tokens`, the command-line options) counts codes like `num_tokens` (residual VQ: depth
codes per latent token, so only whole tokens).

Schedules of k (`SCHEDULES`):
    none     no dropout (the default; the model has no mask vector)
    uniform  k uniform over 1..N (One-D-Piece)
    pow2     k uniform over {1, 2, 4, ..., N} (N added when not a power of two): FlexTok's
             exponentially spaced set, favouring short prefixes in the number of draws per
             token while still training the full sequence often
"""

from __future__ import annotations

from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tok1d import errors
from tok1d.layers import transformer
from tok1d.models import quantizers

Dtype = Any
SCHEDULES = ("none", "uniform", "pow2")
PrefixLengths = Union[int, jax.Array, None]


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown nested_dropout schedule {schedule!r}; expected one of "
                         f"{SCHEDULES}.")


def prefix_choices(num_tokens: int, schedule: str) -> np.ndarray:
    """The prefix lengths a schedule draws from (uniformly)."""
    check_schedule(schedule)
    if schedule == "uniform":
        return np.arange(1, num_tokens + 1)
    if schedule == "pow2":
        pows = [2 ** i for i in range(num_tokens.bit_length()) if 2 ** i <= num_tokens]
        return np.array(sorted(set(pows) | {num_tokens}))
    return np.array([num_tokens])


def sample_prefix_lengths(rng: jax.Array, batch: int, num_tokens: int, schedule: str
                          ) -> jax.Array:
    """(batch,) int32 prefix lengths in 1..num_tokens drawn by `schedule`."""
    choices = jnp.asarray(prefix_choices(num_tokens, schedule), jnp.int32)
    return jax.random.choice(rng, choices, (batch,))


class TailMask(nn.Module):
    """Latents (B, n, D), n <= num_tokens -> (B, num_tokens, D): positions at or beyond the
    prefix length (per example, default n) hold the learned `mask_token`."""

    num_tokens: int
    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, lengths: Optional[jax.Array] = None) -> jax.Array:
        b, n, d = z.shape
        mask = transformer.embedding_param(self, "mask_token", (self.dim,), ("code_dim",),
                                           self.dim ** -0.5, self.param_dtype)
        z = jnp.concatenate([z, jnp.zeros((b, self.num_tokens - n, d), z.dtype)], axis=1)
        lengths = jnp.full((b,), n, jnp.int32) if lengths is None else lengths
        keep = jnp.arange(self.num_tokens)[None, :] < jnp.asarray(lengths)[:, None]
        return jnp.where(keep[..., None], z, mask.astype(z.dtype))


def apply_prefix(z: jax.Array, lengths: PrefixLengths, num_tokens: int,
                 tail_mask: Optional[TailMask]) -> jax.Array:
    """The decoder input of latents `z` (B, n, D) (n <= num_tokens: a prefix) under `lengths`:
    None (all n), a Python int k (the first k; static) or a (B,) array (per example, needs the
    mask vector). With `tail_mask` the result has num_tokens tokens, without it the prefix
    alone."""
    n = z.shape[1]
    if n > num_tokens:
        raise ValueError(f"got {n} latent tokens; this tokenizer has {num_tokens}.")
    if isinstance(lengths, (int, np.integer)):
        if not 1 <= lengths <= num_tokens:
            raise ValueError(f"prefix length {lengths} is not in 1..{num_tokens}.")
        z, lengths = z[:, :lengths], None
    if tail_mask is None:
        if lengths is not None:
            raise ValueError("per-example prefix lengths need a model trained with "
                             "nested_dropout (it has the mask vector).")
        return z
    return tail_mask(z, lengths)


def prefix_tokens(model: nn.Module, k: int) -> int:
    """The latent tokens of a prefix of `k` codes of a 1D tokenizer: prefixes count codes, the
    unit of `num_tokens`, `encode` and token datasets (residual VQ: tokens x depth); a
    ValueError unless 1 <= k <= num_tokens and k is a whole number of tokens."""
    if not 1 <= k <= model.num_tokens:
        raise ValueError(f"a prefix of {k} tokens: expected 1..{model.num_tokens} (the "
                         "tokenizer's tokens).")
    return quantizers.whole_tokens(k, model.codes_per_token)


def forward_lengths(module: nn.Module, lengths: PrefixLengths, train: bool, batch: int
                    ) -> PrefixLengths:
    """A 1D tokenizer's forward: the given `lengths`, else with `train` and a schedule one
    draw per example (`sample_prefix_lengths`, rng "sample"), else None (all tokens)."""
    if lengths is None and train and module.nested_dropout != "none":
        return sample_prefix_lengths(module.make_rng("sample"), batch, module.num_latent_tokens,
                                     module.nested_dropout)
    return lengths


def supports_prefix(model: nn.Module) -> bool:
    """Whether `model` is a 1D tokenizer that decodes a prefix of its tokens (TiTok, GigaTok
    1D): the interface's `decodes_prefixes`."""
    return model.decodes_prefixes


def require_prefix_support(model: nn.Module, flag: str) -> None:
    """A `tok1d.errors.UserError` naming `flag` unless `model` decodes prefixes."""
    if not supports_prefix(model):
        raise errors.UserError(f"{flag} needs a 1D tokenizer (TiTok, GigaTok 1D); "
                               f"{type(model).__name__} decodes all its tokens.")


def unordered_warning(model: nn.Module, what: str) -> Optional[str]:
    """The warning for `what` (a use of prefixes of `model`'s tokens) where `model` was not
    trained with nested dropout (its tokens are not ordered); None where it was."""
    if getattr(model, "nested_dropout", "none") != "none":
        return None
    return (f"{what}, and the tokenizer was not trained with nested dropout: its decoded "
            "prefixes may be poor images.")


def check_code_prefix(model: nn.Module, k: int, flag: str) -> None:
    """Checks that the first `k` codes of `model`'s sequences (0: all of them) can stand for
    its tokens, e.g. as a generator's training sequences (`flag` names the option): a UserError
    unless `model` decodes prefixes (k > 0), a ValueError unless 0 <= k <= num_tokens and k is
    a whole number of tokens."""
    if not k:
        return
    require_prefix_support(model, flag)
    if not 0 <= k <= model.num_tokens:
        raise ValueError(f"{flag}={k}: expected 0 (all) to {model.num_tokens} (the "
                         "tokenizer's tokens).")
    if k % model.codes_per_token:
        raise ValueError(f"{flag}={k}: not a whole number of tokens, expected a multiple of "
                         f"{model.codes_per_token} (the quantizer's codes per token).")
