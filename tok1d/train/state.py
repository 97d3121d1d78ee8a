"""The train state every trainer uses, and its sharded creation and restore.

`TrainState` is generic: (step, params, opt_state, ema_params, extras). `extras` maps a name to
the sub-state an objective owns (the GAN's discriminator params, optimizer state, LeCam EMAs
and other collections live in `extras["gan"]`, see `tok1d.objectives.adversarial`). An
objective with a sub-state offers a `SubStateSpec`: its abstract value and shardings, and an
init from an rng.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tok1d import parallel
from tok1d.train import checkpoint as ckpt_lib
from tok1d.train import programs


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
                             extras: Optional[Mapping[str, SubStateSpec]] = None,
                             boxed_params: Any = None
                             ) -> tuple[TrainState, TrainState, Callable[[jax.Array], TrainState]]:
    """Abstract state, its shardings and a jitted init that creates it already sharded.

    `init_params(rng)` returns (boxed) params; `boxed_params`, their abstract value where the
    caller has traced the init already (a full-size model's init takes a second or two to
    trace); `extras` the specs of the objectives' sub-states. The init splits its rng into one
    key for the params and one per sub-state, in order."""
    extras = dict(extras or {})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, param_sh, opt_state, opt_sh = parallel.params_and_optimizer(
            init_params, tx.init, mesh, rules, boxed=boxed_params)
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


@dataclasses.dataclass(frozen=True)
class StartTimes:
    """What a (re)start paid before its first step, in seconds: the train step's compile
    (`compile_s`, of which `lower_s` tracing and lowering, the rest XLA's compile or its load
    from the persistent compilation cache) and, beside it, creating the state (`state_s`):
    restored from a checkpoint when `resumed`, else initialised."""
    compile_s: float
    lower_s: float
    state_s: float
    resumed: bool


@dataclasses.dataclass
class Start:
    """Where a run starts: its state and first step (0 for a fresh run), its batches (the
    feeder with the first batch put back in front) and what the start took (`times`)."""
    state: TrainState
    step: int
    batches: Iterator[Any]
    times: StartTimes


def start_or_resume(checkpointer: ckpt_lib.Checkpointer, abstract: TrainState,
                    shardings: TrainState, init: Callable[[jax.Array], TrainState],
                    rng: jax.Array, batches_from: Callable[[int], Iterator[Any]],
                    steps: programs.PhasedStep, mesh, rules, step_args: tuple = ()) -> Start:
    """Resumes from the latest checkpoint in the workdir, else initialises from scratch, while
    the jitted train step of the first step's phase, `steps.at(step)(state, batch,
    *step_args)`, compiles beside it: a (re)start pays the longer of the two, not their sum.

    The batches start at the resumed step (`batches_from(step)`: each global batch depends only
    on its index, so a run resumes exactly on any number of hosts and data workers), the
    first batch is drawn, and the step lowered and compiled for (the abstract state with its
    shardings, that batch) in a background thread, under `mesh` and the logical axis `rules`,
    while the state is restored or initialised; the step's first call with the state, under
    the same mesh and rules, then reuses that executable.
    An error of the compilation is raised here."""
    latest = checkpointer.latest_step()
    partial = checkpointer.partial_saves()
    if partial and jax.process_index() == 0:
        logging.warning("%s holds a checkpoint whose save was cut short (the run was killed): "
                        "%s, not used (it can be deleted).", checkpointer.directory,
                        ", ".join(partial))
    if latest is not None:
        logging.info("Resuming from %s/%d.", checkpointer.directory, latest)
    feeder = batches_from(latest or 0)
    first = next(feeder)
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    compiling = programs.BackgroundCompile(
        steps.at(latest or 0), (target, first, *step_args), mesh, rules)
    t0 = time.perf_counter()
    state = jax.block_until_ready(
        init(rng) if latest is None else checkpointer.restore(latest, target))
    state_s = time.perf_counter() - t0
    compiling.wait()
    return Start(state, latest or 0, itertools.chain([first], feeder), StartTimes(
        compiling.seconds, compiling.lower_seconds, state_s, latest is not None))
