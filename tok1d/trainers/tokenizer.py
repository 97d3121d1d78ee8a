"""Tokenizer trainer (single-stage: reconstruction + quantizer losses).

`train_and_evaluate(config, workdir)` is importable (tests, Colab); `python -m tok1d.main`
calls it when `config.trainer == "tokenizer"`. Sections: setup, data, model and optimizer,
state (sharded init or resume), steps, evaluation, loop.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tok1d import checkpoint as ckpt_lib
from tok1d import config_lib, images, losses, models, optim, parallel, summary
from tok1d.data import pipeline, sources
from tok1d.evaluation import codebook as codebook_lib
from tok1d.evaluation.image_metrics import psnr
from tok1d.trainers import common


def build_model(config) -> nn.Module:
    return models.create(config.model.name, **config_lib.model_kwargs(config))


def make_train_step(model: nn.Module, tx, schedule, config):
    """The jitted-to-be update: forward, losses, grads (optionally accumulated), AdamW, EMA."""
    weights = {k: float(v) for k, v in config.losses.items()}
    accum = config.optim.grad_accum_steps
    ema_decay = config.ema_decay
    codebook_size = getattr(model, "codebook_size", None)

    def loss_fn(params, images_):
        recon, aux = model.apply({"params": params}, images_)
        total, terms = losses.combine(weights, recon, images_, aux)
        extras = dict(psnr=jnp.mean(psnr(recon, images_)))
        if codebook_size:
            hist = codebook_lib.code_histogram(aux["codes"], codebook_size)
            extras["batch_perplexity"] = codebook_lib.perplexity(hist)
        return total, (terms, extras)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute_grads(params, images_):
        if accum == 1:
            return grad_fn(params, images_)
        # Microbatch m takes rows m, m + accum, ... so every device contributes to each one.
        micro = images_.reshape((-1, accum) + images_.shape[1:]).swapaxes(0, 1)

        def body(carry, x):
            out, g = grad_fn(params, x)
            acc_out, acc_g = carry
            return (jax.tree.map(jnp.add, acc_out, out), jax.tree.map(jnp.add, acc_g, g)), None

        zeros = jax.eval_shape(grad_fn, params, micro[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (out, g), _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / accum, (out, g))

    def train_step(state: common.TrainState, batch):
        (loss, (terms, extras)), grads = compute_grads(state.params, batch["image"])
        grad_norm = optim.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optim.optax.apply_updates(state.params, updates)
        ema = (common.ema_update(state.ema_params, params, ema_decay)
               if state.ema_params is not None else None)
        new = common.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                                ema_params=ema)
        # The update must be finite too (its float32 squared norm also overflows for absurd
        # finite updates), so a step that would wreck the params is never applied or saved.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optim.global_norm(updates)))
        new = common.keep_if_finite(finite, new, state)
        scalars = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), **extras,
                       **{f"loss_{k}": v for k, v in terms.items()})
        return new, scalars, finite

    return train_step


def make_eval_step(model: nn.Module):
    codebook_size = getattr(model, "codebook_size", None)

    def eval_step(params, batch):
        recon, aux = model.apply({"params": params}, batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        err = jnp.mean(jnp.square(recon - batch["image"]), axis=(1, 2, 3))
        out = dict(psnr_sum=jnp.sum(psnr(recon, batch["image"]) * mask),
                   l2_sum=jnp.sum(err * mask), count=jnp.sum(mask))
        if codebook_size:
            out["hist"] = codebook_lib.code_histogram(aux["codes"], codebook_size, mask)
        return out, jnp.clip(recon, 0.0, 1.0)

    return eval_step


def evaluate(eval_fn, params, eval_ds, num_batches: int, feeder_args, num_grid: int):
    """One pass over the eval split. Returns (metrics dict, (inputs, recons) for the grid)."""
    feeder = common.Feeder(iter(eval_ds), *feeder_args)
    totals, grid_in, grid_out = None, None, None
    for i in range(num_batches):
        batch = next(feeder)
        out, recon = eval_fn(params, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        if i == 0:
            grid_in = _gather_rows(batch["image"], num_grid)
            grid_out = _gather_rows(recon, num_grid)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    metrics = dict(psnr=float(totals["psnr_sum"]) / count, l2=float(totals["l2_sum"]) / count,
                   num_examples=int(totals["count"]))
    if "hist" in totals:
        metrics["codebook_usage"] = float(codebook_lib.usage(np.asarray(totals["hist"])))
        metrics["codebook_perplexity"] = float(codebook_lib.perplexity(np.asarray(totals["hist"])))
    return metrics, (grid_in, grid_out)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _first_rows(x: jax.Array, n: int, replicated: jax.sharding.NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(x[:n], replicated)


def _gather_rows(x: jax.Array, n: int) -> np.ndarray:
    """First n rows of a global array, on every host (all-gathers only those rows)."""
    replicated = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
    return np.asarray(jax.device_get(_first_rows(x, n, replicated)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains a tokenizer; writes checkpoints, TensorBoard logs, grids and metrics.json."""
    # ---------------------------------------------------------------- setup
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    writer = summary.MetricWriter(workdir, enabled=is_chief)
    writer.write_hparams(config.to_dict())
    common.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    mesh = parallel.create_mesh(dict(config.mesh))
    rules = parallel.rules_from_config(config.sharding.rules)
    logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size,
                 jax.process_count())

    # ---------------------------------------------------------------- data
    dcfg = config.data
    batch_sh = parallel.batch_sharding(mesh, rules)
    start, stop = parallel.host_batch_slice(batch_sh, config.batch_size)
    train_src = sources.get_source(dcfg.name, dcfg.train_split, data_dir=dcfg.data_dir,
                                   demo_size=dcfg.demo_size)
    eval_src = sources.get_source(dcfg.name, dcfg.eval_split, data_dir=dcfg.data_dir,
                                  demo_size=dcfg.demo_size)
    train_ds = pipeline.train_dataset(
        train_src, global_batch=config.batch_size, host_start=start, host_stop=stop,
        seed=config.seed, image_size=dcfg.image_size, augment=dcfg.augment, flip=dcfg.flip,
        min_scale=dcfg.min_scale, num_workers=dcfg.num_workers)
    train_iter = iter(train_ds)
    e_start, e_stop = parallel.host_batch_slice(batch_sh, config.eval_batch_size)
    eval_ds, eval_batches = pipeline.eval_dataset(
        eval_src, global_batch=config.eval_batch_size, host_start=e_start, host_stop=e_stop,
        image_size=dcfg.image_size, num_examples=dcfg.eval_examples,
        num_workers=dcfg.num_workers)

    # ---------------------------------------------------------------- model and optimizer
    model = build_model(config)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    local_rows = config.batch_size // config.optim.grad_accum_steps
    dummy = jnp.zeros((min(local_rows, 2), dcfg.image_size, dcfg.image_size, 3), jnp.float32)
    init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731

    # ---------------------------------------------------------------- state
    abstract, shardings, init = common.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=config.ema_decay > 0)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    rng = jax.random.key(config.seed)
    state, first_step = common.init_or_restore(checkpointer, abstract, shardings, init, rng,
                                               train_iter)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Model %s: %.2fM parameters; starting at step %d.", config.model.name,
                 num_params / 1e6, first_step)

    # ---------------------------------------------------------------- steps
    feeder = common.Feeder(train_iter, batch_sh, config.batch_size)
    feeder_args = (batch_sh, config.eval_batch_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step = jax.jit(make_train_step(model, tx, schedule, config),
                             in_shardings=(shardings, batch_sh), out_shardings=(shardings, None,
                                                                                None),
                             donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model))

        # ------------------------------------------------------------ loop
        result = _loop(config, workdir, state, first_step, train_step, eval_step, feeder,
                       train_iter, eval_ds, eval_batches, feeder_args, checkpointer, writer)
    writer.close()
    return result


def _loop(config, workdir, state, first_step, train_step, eval_step, feeder, train_iter,
          eval_ds, eval_batches, feeder_args, checkpointer, writer) -> dict[str, Any]:
    total = config.total_steps
    preempt = ckpt_lib.PreemptionFlag()
    log = _print if jax.process_index() == 0 else _quiet
    progress = summary.ProgressReporter(total, batch_size=config.batch_size,
                                        every_steps=config.log_every_steps, first_step=first_step,
                                        print_fn=log)
    metric_cls, acc = None, None
    last_saved = first_step if first_step else None
    pending = None  # (step, finite flag) of the previous step, checked one step late
    eval_metrics: dict[str, Any] = {}
    step = first_step

    def run_eval(step_):
        params = state.ema_params if state.ema_params is not None else state.params
        with progress.timed_pause():
            metrics, (grid_in, grid_out) = evaluate(eval_step, params, eval_ds, eval_batches,
                                                    feeder_args, config.num_grid_images)
            grid = images.make_grid(images.interleave_pairs(grid_in, grid_out))
            writer.write_scalars(step_, {f"eval/{k}": v for k, v in metrics.items()})
            writer.write_images(step_, {"eval/input_vs_reconstruction": grid})
            if jax.process_index() == 0:
                images.save_png(os.path.join(workdir, "reconstructions.png"), grid)
            log(f"eval @ step {step_}: " + ", ".join(
                f"{k} {summary.format_number(v)}" for k, v in metrics.items()))
        return metrics

    try:
        while step < total:
            batch = next(feeder)
            state, scalars, finite = train_step(state, batch)
            step += 1
            if pending is not None:
                common.check_finite(*pending, last_saved)
            pending = (step, finite)
            if metric_cls is None:
                metric_cls = common.average_collection(sorted(scalars))
            update = metric_cls.single_from_model_output(**scalars)
            acc = update if acc is None else acc.merge(update)

            if step % config.log_every_steps == 0 or step == total:
                common.check_finite(*pending, last_saved)
                values = {k: float(v) for k, v in acc.compute().items()}
                acc = None
                rates = progress.update(step, values)
                if rates:
                    values.update({f"perf/{k}": v for k, v in rates.items()})
                writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})

            if step % config.eval_every_steps == 0 and step != total:
                eval_metrics = run_eval(step)

            stop = (checkpointer.reached_preemption(step) if jax.process_count() > 1
                    else preempt.is_set())
            if stop or step % config.checkpoint.every_steps == 0 or step == total:
                common.check_finite(*pending, last_saved)
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
        eval_metrics = run_eval(step)
        final = dict(step=step, **eval_metrics)
        common.write_json(os.path.join(workdir, "metrics.json"), final)
        return final
    finally:
        preempt.restore()
        checkpointer.close()
        writer.flush()


def _print(msg: str) -> None:
    print(msg, flush=True)


def _quiet(msg: str) -> None:  # noqa: ARG001
    pass
