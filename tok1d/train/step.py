"""The train-step core shared by every trainer: gradient accumulation, the optimizer update
(clipping lives in the optax chain, see `tok1d.train.optim`), the EMA, and the non-finite
guard.

A trainer's step reads as: `accumulate` its objective's gradients over microbatches ->
`apply_gradients` (global norm, optimizer, EMA: one place) -> whatever its objectives update
themselves (e.g. the GAN's discriminator) -> `keep_if_finite`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from tok1d.train import optim
from tok1d.train.state import TrainState


def accumulate(micro_fn: Callable[[Any, Any, jax.Array], tuple[Any, Any]], carry: Any,
               batch: Any, rng: jax.Array, steps: int) -> tuple[Any, Any]:
    """The mean over `steps` microbatches of `micro_fn(carry, microbatch, rng) -> (outputs,
    carry)` (outputs: a tree of arrays to average, e.g. loss, scalars and grads; `carry`:
    state threaded through the microbatches, e.g. BatchNorm running stats). Microbatch m takes
    rows m, m + steps, ... of every array of `batch`, so every device contributes to each one;
    microbatch m uses `jax.random.split(rng, steps)[m]`. With steps == 1 it is one call on
    the whole batch with `rng`."""
    if steps == 1:
        return micro_fn(carry, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape((-1, steps) + x.shape[1:]).swapaxes(0, 1), batch)
    rngs = jax.random.split(rng, steps)

    def body(c, xs):
        sums, inner = c
        out, inner = micro_fn(inner, xs[0], xs[1])
        return (jax.tree.map(jnp.add, sums, out), inner), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(micro_fn, carry, first, rngs[0])[0])
    (total, carry), _ = jax.lax.scan(body, (zeros, carry), (micro, rngs))
    return jax.tree.map(lambda x: x / steps, total), carry


def ema_update(ema: Any, params: Any, decay: Any) -> Any:
    """ema <- ema - (1 - decay) * (ema - params) (`decay` may be a traced scalar, e.g.
    `optim.ema_decay_at`)."""
    return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation, *,
                    ema_decay: float, ema_warmup: str) -> tuple[TrainState, jax.Array, jax.Array]:
    """One optimizer update, the official loops' order: the gradients' global norm (before
    clipping) -> the optimizer (clipping, AdamW at the schedule's LR) -> the EMA with
    `optim.ema_decay_at(step + 1, ema_decay, ema_warmup)` -> step + 1.

    Returns (new state, grad_norm, finite): `finite` says the gradients and the update are
    finite (the update's float32 squared norm also overflows for absurd finite updates, so a
    step that would wreck the params is caught). The caller adds its loss to `finite` and
    ends with `keep_if_finite`."""
    grad_norm = optim.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = (ema_update(state.ema_params, params,
                      optim.ema_decay_at(state.step + 1, ema_decay, ema_warmup))
           if state.ema_params is not None else None)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(optim.global_norm(updates))
    return new, grad_norm, finite


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """The new state when `finite`, else the old one (a bad step never reaches a checkpoint).

    One conditional, not a `where` per leaf: per-leaf selects are three kernels per parameter
    (params and both AdamW moments) that XLA cannot fuse into the update, because `finite`
    needs every leaf's update first; the conditional passes `new` through and only its
    never-taken branch copies `old`. Same buffers and peak memory; a GigaTok B-L step compiles
    ~750 fewer kernels (`benchmarks/RESULTS.md`)."""
    return jax.lax.cond(finite, lambda: new, lambda: old)
