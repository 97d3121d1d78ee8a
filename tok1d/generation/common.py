"""Pieces shared by the MaskGIT and the autoregressive generators."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tok1d.objectives.draws import Draw, fresh


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float, null_label: int,
                draw: Draw = fresh) -> jax.Array:
    """Replaces each label by `null_label` with probability `prob` (classifier-free guidance
    training: the same network learns the conditional and the unconditional model).

    As upstream (TiTok's `ImageBert.forward`, LlamaGen's `LabelEmbedder.token_drop`), label b
    is dropped iff u_b < prob for a float32 uniform u_b. Random draws, by name (see `Draw`):
      "drop_labels"  (B,) bool / 0-1 ints: which labels are dropped (the outcome itself; when
                     given it is used even with prob 0, like upstream's `force_drop_ids`)
      "drop_rand_u"  (B,) float32 uniform in [0, 1): the u_b (read when "drop_labels" is not)
    """
    def from_uniform() -> jax.Array:
        if prob <= 0.0:
            return jnp.zeros(labels.shape, bool)
        u = draw("drop_rand_u", lambda: jax.random.uniform(rng, labels.shape, jnp.float32))
        return u < prob

    drop = draw("drop_labels", from_uniform).astype(bool)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def make_sampler(model, **kwargs):
    """The jitted `fn(params, labels, rng) -> codes (B, N)` for `model`: MaskGIT's iterative
    decoding for a model with a `mask_id`, else autoregressive decoding with a KV cache.
    `kwargs` are the sampler's options (config.sampling); unknown ones fail."""
    if hasattr(model, "mask_id"):
        from tok1d.generation import maskgit
        return maskgit.make_sampler(model, **kwargs)
    from tok1d.generation import autoregressive
    return autoregressive.make_sampler(model, **kwargs)
