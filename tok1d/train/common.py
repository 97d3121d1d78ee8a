"""Train-loop pieces shared by every trainer: state, sharded creation/restore, metric
collections, non-finite detection (data feeding: `tok1d.data.feeding`)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics
from jax.sharding import NamedSharding, PartitionSpec as P

from tok1d.train import checkpoint as ckpt_lib
from tok1d import parallel
from tok1d.objectives import gan


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None   # None when the EMA is disabled
    disc_params: Any = None  # discriminator, its optimizer and LeCam EMAs (GAN runs only)
    disc_opt_state: Any = None
    lecam: Any = None
    disc_state: Any = None   # the discriminator's other variable collections (e.g. spectral)


def state_shardings_and_init(init_params: Callable[[jax.Array], Any],
                             tx: optax.GradientTransformation, mesh, rules, use_ema: bool,
                             init_disc: Optional[Callable[[jax.Array], Any]] = None,
                             disc_tx: Optional[optax.GradientTransformation] = None
                             ) -> tuple[TrainState, TrainState, Callable[[jax.Array], TrainState]]:
    """Abstract state, its shardings and a jitted init that creates it already sharded.

    `init_params(rng)` returns (boxed) params; `init_disc(rng)` a discriminator's variables
    {"params": ..., other collections} (then `disc_tx` is its optimizer; the other collections,
    e.g. spectral-norm vectors, become `disc_state`, replicated). Optimizer moments get the
    same sharding as their parameters (FSDP shards them too); scalars are replicated.
    """
    replicated = NamedSharding(mesh, P())

    def disc_parts(rng):
        variables = dict(init_disc(rng))
        return variables.pop("params"), (variables or None)

    def abstract_of(init_fn, opt):
        boxed = jax.eval_shape(init_fn, jax.random.key(0))
        sh = parallel.logical_shardings(boxed, mesh, rules)
        params = parallel.unbox_abstract(boxed)
        opt_state = jax.eval_shape(opt.init, params)
        return params, sh, opt_state, opt_state_shardings(opt_state, params, sh, replicated)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, param_sh, opt_state, opt_sh = abstract_of(init_params, tx)
        disc = (abstract_of(lambda r: disc_parts(r)[0], disc_tx) if init_disc is not None
                else (None,) * 4)
        disc_state = (nn.unbox(jax.eval_shape(lambda r: disc_parts(r)[1], jax.random.key(0)))
                      if init_disc is not None else None)
    lecam = gan.lecam_init() if init_disc is not None else None
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_state, ema_params=params if use_ema else None,
                          disc_params=disc[0], disc_opt_state=disc[2],
                          lecam=jax.eval_shape(lambda: lecam) if lecam else None,
                          disc_state=disc_state)
    shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                           ema_params=param_sh if use_ema else None, disc_params=disc[1],
                           disc_opt_state=disc[3],
                           lecam=jax.tree.map(lambda _: replicated, lecam) if lecam else None,
                           disc_state=jax.tree.map(lambda _: replicated, disc_state))

    def init(rng):
        if init_disc is not None:
            rng, disc_rng = jax.random.split(rng)
        p = nn.unbox(init_params(rng))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                           ema_params=p if use_ema else None)
        if init_disc is not None:
            d, d_state = nn.unbox(disc_parts(disc_rng))
            state = state.replace(disc_params=d, disc_opt_state=disc_tx.init(d),
                                  lecam=gan.lecam_init(), disc_state=d_state)
        return state

    def jitted_init(rng):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jax.jit(init, out_shardings=shardings)(rng)

    return abstract, shardings, jitted_init


def opt_state_shardings(opt_state: Any, params: Any, param_sh: Any,
                        default: NamedSharding) -> Any:
    """Each optimizer-state leaf gets the sharding of the parameter it tracks (the param whose
    path is the longest suffix of the leaf's dict-key path, with the same shape); counters and
    other scalars get `default`. Works through masked / multi-transform states."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(param_sh)):
        by_path[tuple(k.key for k in path)] = (tuple(leaf.shape), sh)

    def pick(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


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


def ema_update(ema: Any, params: Any, decay: Any) -> Any:
    """ema <- ema - (1 - decay) * (ema - params) (`decay` may be a traced scalar, e.g.
    `optim.ema_decay_at`)."""
    return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)


def injected(batch: Any, name: str, draw: Callable[[], Any]) -> Any:
    """A random draw of the train step, replayable: `batch["draws"][name]` when the batch
    carries it, else `draw()`.

    Every random quantity that the official training code draws with its own RNG (MaskGIT's
    masking draws, dropped class labels, LPIPS dropout masks, ...) is taken through this, by a
    documented name, so a batch can carry the official draws (the train-step parity tests
    replay the draws stored in the `train_*.npz` fixtures through the real jitted step). Which
    names a step reads is listed in its docstring. Presence is static under `jax.jit`: a batch
    with draws compiles its own program."""
    draws = batch.get("draws") if isinstance(batch, Mapping) else None
    if draws is not None and name in draws:
        return draws[name]
    return draw()


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """The new state when `finite`, else the old one (a bad step never reaches a checkpoint)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def average_collection(names) -> type[clu_metrics.Collection]:
    """A clu metrics Collection averaging each named scalar over the steps it is merged over."""
    return clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in names})


class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(step: int, finite: Any, last_saved: Optional[int]) -> None:
    if not bool(jax.device_get(finite)):
        raise NonFiniteLossError(
            f"Loss or gradient norm became NaN/Inf at step {step}; the run stopped there. "
            + (f"The last good checkpoint (step {last_saved}) is intact."
               if last_saved is not None else "No checkpoint had been written yet."))


def write_json(path: str, data: Mapping[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# The training loop shared by every trainer.
# -----------------------------------------------------------------------------


def log_fn() -> Callable[[str], None]:
    """print (flushed) on the chief process, nothing elsewhere."""
    if jax.process_index() == 0:
        return lambda msg: print(msg, flush=True)
    return lambda msg: None


def train_loop(config, workdir: str, state: TrainState, first_step: int,
               train_step: Callable[[TrainState, Any], tuple[TrainState, Any, Any]],
               feeder: Iterator[Any], train_iter: Any, checkpointer: ckpt_lib.Checkpointer,
               writer, run_eval: Callable[[TrainState, int], Mapping[str, Any]]
               ) -> dict[str, Any]:
    """Steps until `config.total_steps`: averaged train scalars and progress (steps/s, img/s,
    ETA) every `log_every_steps`, `run_eval(state, step)` every `eval_every_steps` and at the
    end, checkpoints (with the data iterator) every `checkpoint.every_steps`, at the end and on
    a preemption signal. A non-finite step stops the run before it can be saved.

    `train_step(state, batch) -> (state, scalars, finite)`; `run_eval` returns the metrics it
    wrote. Returns {"step": ..., **final eval metrics} (also written to metrics.json)."""
    from tok1d import summary  # Local import: summary pulls in the event-file writer.
    total = config.total_steps
    preempt = ckpt_lib.PreemptionFlag()
    log = log_fn()
    progress = summary.ProgressReporter(total, batch_size=config.batch_size,
                                        every_steps=config.log_every_steps, first_step=first_step,
                                        print_fn=log)
    metric_cls, acc = None, None
    last_saved = first_step if first_step else None
    pending = None  # (step, finite flag) of the previous step, checked one step late
    step = first_step

    def evaluate(step_):
        with progress.timed_pause():
            metrics = run_eval(state, step_)
        log(f"eval @ step {step_}: " + ", ".join(
            f"{k} {summary.format_number(v)}" for k, v in metrics.items()
            if isinstance(v, (int, float))))
        return metrics

    try:
        while step < total:
            batch = next(feeder)
            state, scalars, finite = train_step(state, batch)
            step += 1
            if pending is not None:
                check_finite(*pending, last_saved)
            pending = (step, finite)
            if metric_cls is None:
                metric_cls = average_collection(sorted(scalars))
            update = metric_cls.single_from_model_output(**scalars)
            acc = update if acc is None else acc.merge(update)

            if step % config.log_every_steps == 0 or step == total:
                check_finite(*pending, last_saved)
                values = {k: float(v) for k, v in acc.compute().items()}
                acc = None
                rates = progress.update(step, values)
                if rates:
                    values.update({f"perf/{k}": v for k, v in rates.items()})
                writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})

            if step % config.eval_every_steps == 0 and step != total:
                evaluate(step)

            stop = (checkpointer.reached_preemption(step) if jax.process_count() > 1
                    else preempt.is_set())
            if stop or step % config.checkpoint.every_steps == 0 or step == total:
                check_finite(*pending, last_saved)
                with progress.timed_pause():
                    if checkpointer.save(step, state, train_iter, force=True):
                        last_saved = step
            if stop:
                checkpointer.wait()
                log(f"Stopped by a preemption signal at step {step}; checkpoint saved. "
                    "Run the same command again to resume.")
                return {"step": step, "preempted": True}
        if first_step >= total:
            log(f"Nothing to do: the checkpoint is already at step {first_step} >= "
                f"total_steps {total}.")
        final = dict(step=step, **evaluate(step))
        write_json(os.path.join(workdir, "metrics.json"), final)
        return final
    finally:
        preempt.restore()
        checkpointer.close()
        writer.flush()
