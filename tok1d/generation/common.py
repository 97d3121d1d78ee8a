"""Pieces shared by the MaskGIT and the autoregressive generators."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


# How a training function takes a random draw: `draw(name, fn)` returns the replayed value of
# the draw called `name` if there is one, else `fn()` (a fresh jax.random draw). The names are
# the official code's draws (listed in each function's docstring); see `fresh`.
Draw = Callable[[str, Callable[[], jax.Array]], jax.Array]


def fresh(name: str, draw: Callable[[], jax.Array]) -> jax.Array:
    """The default `Draw`: always draws (`name` is ignored). The trainers pass
    `functools.partial(tok1d.train.common.injected, batch)` instead, so a batch can carry
    the official draws under their names."""
    del name
    return draw()


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


def cyclic_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Class labels 0, 1, ..., num_classes - 1, 0, 1, ... for `num_images` samples (50000
    images = 50 per ImageNet class, as the ADM / LlamaGen evaluations)."""
    return (np.arange(num_images) % num_classes).astype(np.int32)


def make_sampler(model, **kwargs):
    """The jitted `fn(params, labels, rng) -> codes (B, N)` for `model`: MaskGIT's iterative
    decoding for a model with a `mask_id`, else autoregressive decoding with a KV cache.
    `kwargs` are the sampler's options (config.sampling); unknown ones fail."""
    if hasattr(model, "mask_id"):
        from tok1d.generation import maskgit
        return maskgit.make_sampler(model, **kwargs)
    from tok1d.generation import autoregressive
    return autoregressive.make_sampler(model, **kwargs)
