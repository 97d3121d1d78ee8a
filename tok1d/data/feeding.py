"""Host -> device feeding: the host-local NumPy batches of a grain iterator become global arrays
sharded along the batch axis (every trainer, the evaluation and the reference statistics feed
through `Feeder`)."""

from __future__ import annotations

from typing import Iterator, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from tok1d import parallel


class Feeder:
    """Turns the host-local numpy batches of a grain iterator into global arrays sharded
    along the batch axis with `sharding` (see `tok1d.parallel.batch_sharding`)."""

    def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]], sharding: NamedSharding,
                 global_batch: int):
        self.iterator = iterator
        self.sharding = sharding
        self.global_batch = global_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return parallel.global_batch(next(self.iterator), self.sharding, self.global_batch)
