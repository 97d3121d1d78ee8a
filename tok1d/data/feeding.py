"""Host -> device feeding: host-local numpy batches become global arrays on the mesh."""

from __future__ import annotations

import functools
import re
import signal
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from tok1d import errors, parallel
from tok1d.data import pipeline


# np.float32(x) / 255 for every uint8 x, as the host (and torchvision's ToTensor) computes it.
_UNIT_FLOATS = np.arange(256, dtype=np.float32) / np.float32(255.0)


@functools.partial(jax.jit, static_argnames="exact")
def unit_float(images: jax.Array, exact: bool = False) -> jax.Array:
    """uint8 pixels -> float32 in [0, 1], on the device (sharding kept); within one ulp of
    `np.float32(x) / 255` on the host (XLA multiplies by the reciprocal: 126 of the 256
    values differ), or equal to it with `exact` (a lookup of the 256 host values)."""
    if exact:
        return jnp.asarray(_UNIT_FLOATS)[images.astype(jnp.int32)]
    return images.astype(jnp.float32) / 255.0


def bicubic(x: jax.Array) -> jax.Array:
    """PIL's bicubic kernel (Keys, a = -0.5; support 2)."""
    a = -0.5
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_weights(start: jax.Array, stop: jax.Array, valid: jax.Array, out_size: int,
                   in_size: int) -> jax.Array:
    """(out_size, in_size) weights of PIL's bicubic resize (`Image.resize(..., BICUBIC,
    box=...)`) along one axis: the box [start, stop) of a line whose first `valid` of
    `in_size` pixels are data goes to `out_size` pixels. As PIL: each output pixel's center
    maps to start + (i + 0.5) * scale, the kernel widens by the scale when shrinking, its taps
    stop at the data's ends and are renormalised to sum to one."""
    scale = (stop - start) / out_size
    widen = jnp.maximum(scale, 1.0)
    support = 2.0 * widen
    center = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    first = jnp.maximum(jnp.floor(center - support + 0.5), 0.0)
    last = jnp.minimum(jnp.floor(center + support + 0.5), valid.astype(jnp.float32))
    j = jnp.arange(in_size, dtype=jnp.float32)[None, :]
    w = bicubic((j - center[:, None] + 0.5) / widen)
    w = jnp.where((j >= first[:, None]) & (j < last[:, None]), w, 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    return w / jnp.where(total == 0.0, 1.0, total)


def _resize_window(canvas, box, size, flip, out_size: int):
    side = canvas.shape[0]
    wy = resize_weights(box[1], box[3], size[0], out_size, side)
    wx = resize_weights(box[0], box[2], size[1], out_size, side)
    wx = jnp.where(flip, wx[::-1], wx)  # output column p from the mirrored column's weights
    # As PIL: the horizontal pass first, rounded (half up) and clipped to whole levels, then
    # the vertical one; the bicubic overshoot clipped between the passes matters at edges.
    hp = jax.lax.Precision.HIGHEST
    rows = _levels(jnp.einsum("hwc,pw->hpc", canvas.astype(jnp.float32), wx, precision=hp))
    return _levels(jnp.einsum("oh,hpc->opc", wy, rows, precision=hp))


def _levels(x: jax.Array) -> jax.Array:
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


@functools.partial(jax.jit, static_argnames="out_size")
def resize_windows(canvas: jax.Array, box: jax.Array, size: jax.Array, flip: jax.Array, *,
                   out_size: int) -> jax.Array:
    """`pipeline.window` batches -> float32 (B, out_size, out_size, 3) in [0, 1], on the device
    (sharding kept): each canvas's box resized with PIL's bicubic weights and PIL's two
    passes, each rounded and clipped to whole levels (PIL's weights are fixed point: within a
    level or two of `pipeline.crop`), mirrored where `flip`."""
    out = jax.vmap(functools.partial(_resize_window, out_size=out_size))(canvas, box, size, flip)
    return out / 255.0


# What grain raises when one of its worker processes ended without a result (`mp_prefetch`).
_WORKER_DIED = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")


def worker_died(error: BaseException) -> errors.InputWorkerDied | None:
    """The one-line error for grain's "worker process was terminated" `error`, or None for
    any other error (a failure inside a worker re-raises as itself: a bug or bad data)."""
    found = _WORKER_DIED.search(str(error)) if isinstance(error, RuntimeError) else None
    if found is None:
        return None
    code = int(found.group(1))
    try:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    except ValueError:
        how = f"exit code {code}"
    if code == -signal.SIGKILL:
        how += ", which the kernel's out-of-memory killer sends: see `dmesg`"
    return errors.InputWorkerDied(
        f"an input worker process died ({how}). Fewer --config.data.num_workers use less "
        "host memory.")


class Feeder:
    """Turns the host-local numpy batches of a grain iterator into global arrays sharded
    along the batch axis with `sharding` (see `tok1d.parallel.batch_sharding`). uint8
    "image" batches (what `tok1d.data.pipeline` yields) cross to the device as uint8 and are
    scaled to float32 [0, 1] there (`unit_float`), and window canvases (`data.resize_on=
    "device"`) are resized there (`resize_windows`), so consumers always see the recipe's
    [0, 1] float crops. A grain worker process that died is `errors.InputWorkerDied`."""

    def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]], sharding: NamedSharding,
                 global_batch: int):
        self.iterator = iterator
        self.sharding = sharding
        self.global_batch = global_batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        try:
            host = next(self.iterator)
        except RuntimeError as e:
            died = worker_died(e)
            if died is None:
                raise
            raise died from e
        batch = parallel.global_batch(host, self.sharding, self.global_batch)
        if "window_box" in batch:
            canvas = batch.pop("image")
            batch["image"] = resize_windows(
                canvas, batch.pop("window_box"), batch.pop("window_size"),
                batch.pop("window_flip"),
                out_size=pipeline.image_size_of_canvas(canvas.shape[1]))
        elif "image" in batch and batch["image"].dtype == jnp.uint8:
            batch["image"] = unit_float(batch["image"])
        return batch
