"""Replayable random draws of a train step.

Every random quantity that the official training code draws with its own RNG (MaskGIT's
masking draws, dropped class labels, LPIPS dropout masks, DiffAugment's uniforms, TiTok stage
1's proxy codes, ...) is taken through a `Draw`, by a documented name, so a batch can carry the
official draws as `batch["draws"]` (the train-step parity tests replay the draws stored in the
`train_*.npz` fixtures through the real jitted step). Which names a step reads is listed in its
docstring. Presence is static under `jax.jit`: a batch with draws compiles its own program.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax

# `draw(name, fn)`: the replayed value of the draw called `name` if there is one, else `fn()`
# (a fresh jax.random draw).
Draw = Callable[[str, Callable[[], jax.Array]], jax.Array]


def fresh(name: str, draw: Callable[[], jax.Array]) -> jax.Array:
    """The default `Draw`: always draws (`name` is ignored)."""
    del name
    return draw()


def replay(draws: Optional[Mapping[str, Any]], name: str, draw: Callable[[], Any]) -> Any:
    """`draws[name]` when given, else `draw()`."""
    if draws is not None and name in draws:
        return draws[name]
    return draw()


def of_batch(batch: Any) -> Optional[Mapping[str, Any]]:
    """The recorded draws a batch carries (`batch["draws"]`), or None."""
    return batch.get("draws") if isinstance(batch, Mapping) else None


def drawer(draws: Optional[Mapping[str, Any]]) -> Draw:
    """The `Draw` that replays `draws` (fresh draws where a name is absent)."""
    return lambda name, draw: replay(draws, name, draw)
