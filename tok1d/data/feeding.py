"""Host -> device feeding: host-local numpy batches become global arrays on the mesh."""

from __future__ import annotations

from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from tok1d import parallel


@jax.jit
def unit_float(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1], on the device (sharding kept); within one ulp of
    `np.float32(x) / 255` on the host (XLA multiplies by the reciprocal)."""
    return images.astype(jnp.float32) / 255.0


class Feeder:
    """Turns the host-local numpy batches of a grain iterator into global arrays sharded
    along the batch axis with `sharding` (see `tok1d.parallel.batch_sharding`). uint8
    "image" batches (what `tok1d.data.pipeline` yields) cross to the device as uint8 and are
    scaled to float32 [0, 1] there (`unit_float`), so consumers always see [0, 1] floats."""

    def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]], sharding: NamedSharding,
                 global_batch: int):
        self.iterator = iterator
        self.sharding = sharding
        self.global_batch = global_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = parallel.global_batch(next(self.iterator), self.sharding, self.global_batch)
        if "image" in batch and batch["image"].dtype == jnp.uint8:
            batch["image"] = unit_float(batch["image"])
        return batch
