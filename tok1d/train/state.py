"""The train state every trainer uses, and its sharded creation and restore.

`TrainState` is generic: (step, params, opt_state, ema_params, extras). `extras` maps a name to
the sub-state an objective owns (the GAN's discriminator params, optimizer state, LeCam EMAs
and other collections live in `extras["gan"]`, see `tok1d.objectives.adversarial`). An
objective with a sub-state offers a `SubStateSpec`: its abstract value and shardings, and an
init from an rng.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tok1d import parallel
from tok1d.train import checkpoint as ckpt_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None  # None when the EMA is disabled
    extras: Any = None      # {name: an objective's sub-state} (e.g. "gan"), or None


class SubStateSpec(Protocol):
    """What an objective with its own state offers the train state (`TrainState.extras`)."""

    def abstract_and_shardings(self, mesh, rules) -> tuple[Any, Any]:
        """(abstract sub-state, its shardings); called under the mesh and the logical rules."""

    def init(self, rng: jax.Array) -> Any:
        """The initial sub-state (traced inside the jitted state init)."""


def state_shardings_and_init(init_params: Callable[[jax.Array], Any],
                             tx: optax.GradientTransformation, mesh, rules, use_ema: bool,
                             extras: Optional[Mapping[str, SubStateSpec]] = None
                             ) -> tuple[TrainState, TrainState, Callable[[jax.Array], TrainState]]:
    """Abstract state, its shardings and a jitted init that creates it already sharded.

    `init_params(rng)` returns (boxed) params; `extras` the specs of the objectives' sub-states.
    The init splits its rng into one key for the params and one per sub-state, in order."""
    extras = dict(extras or {})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, param_sh, opt_state, opt_sh = parallel.params_and_optimizer(init_params, tx.init,
                                                                            mesh, rules)
        sub = {name: spec.abstract_and_shardings(mesh, rules) for name, spec in extras.items()}
    replicated = NamedSharding(mesh, P())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_state, ema_params=params if use_ema else None,
                          extras={k: v[0] for k, v in sub.items()} or None)
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                           ema_params=param_sh if use_ema else None,
                           extras={k: v[1] for k, v in sub.items()} or None)

    def init(rng):
        rngs = jax.random.split(rng, 1 + len(extras)) if extras else [rng]
        p = nn.unbox(init_params(rngs[0]))
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          ema_params=p if use_ema else None,
                          extras={name: spec.init(r) for (name, spec), r
                                  in zip(extras.items(), rngs[1:])} or None)

    def jitted_init(rng):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jax.jit(init, out_shardings=shardings)(rng)

    return abstract, shardings, jitted_init


def init_or_restore(checkpointer: ckpt_lib.Checkpointer, abstract: TrainState,
                    shardings: TrainState, init: Callable[[jax.Array], TrainState],
                    rng: jax.Array, data_iter: Any) -> tuple[TrainState, int]:
    """Resumes from the latest checkpoint in the workdir, else initialises from scratch."""
    latest = checkpointer.latest_step()
    if latest is None:
        return init(rng), 0
    logging.info("Resuming from %s/%d.", checkpointer.directory, latest)
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    state = checkpointer.restore(latest, target, data_iter)
    return state, int(latest)
