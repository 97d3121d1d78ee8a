"""Generator trainer: any generator (`tok1d.models.interfaces.Generator`: MaskGIT's
masked-token, a LlamaGen-style GPT's next-token or RAR's permuted next-token objective),
class-conditional, on a token dataset written by `python -m tok1d.cli.tokenize`.

`train_and_evaluate(config, workdir)` runs when `config.trainer == "generator"`; `fit` trains a
generator from scratch on codes held in memory (the AR probe, `tok1d.probes.ar`). The model's
`objective` picks the loss (`tok1d.objectives.tokens`) and the sampler
(`tok1d.generation.common`). Sections: model and steps, evaluation (validation loss over the
held-out tokens, a grid of samples decoded by the tokenizer, gFID), setup, the run, fit.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tok1d import errors, images, models, parallel
from tok1d.data import feeding
from tok1d.data import tokens as tokens_lib
from tok1d.evaluation import evaluator
from tok1d.generation import common as gen_common
from tok1d.generation import decode
from tok1d.models import interfaces
from tok1d.objectives import tokens as tokens_obj
from tok1d.train import config_lib, loop, optim, programs
from tok1d.train import state as state_lib
from tok1d.train import step as step_lib
from tok1d.train.state import TrainState
from tok1d.weights import layout, loaders


# ---------------------------------------------------------------------------- model


def check_generator_config(config) -> None:
    """A ConfigError unless `config` is a generator's (a tokenizer's config, say)."""
    if config.get("trainer") != "generator":
        raise config_lib.ConfigError(
            f"the config trains a {config.get('trainer') or 'model'} ({config.model.name}), not "
            "a generator: pass a generator's config (configs/maskgit_titok.py, "
            "configs/gpt_gigatok.py, configs/rar.py or your own).")


def build_generator(config) -> nn.Module:
    """The generator of a generator config."""
    check_generator_config(config)
    model = models.create(config.model.name, **layout.model_kwargs(config))
    interfaces.check_generator(model)
    return model


# ---------------------------------------------------------------------------- steps


def make_train_step(model: nn.Module, tx, schedule, config):
    """(state, batch) -> (state, scalars, finite): loss, grads (accumulated over
    `optim.grad_accum_steps` microbatches), AdamW, EMA; a non-finite step is not applied.

    The order of the official loops (TiTok's `train_one_epoch_generator`, LlamaGen's
    train_c2i.py): gradients -> their global norm before clipping (scalar "grad_norm") ->
    clipping (`optim.grad_clip`, torch's rule with `optim.clip_eps`) -> AdamW at LR
    `schedule(step)` (scalar "lr"; when the schedule is read: `optim.schedule_step`) -> EMA
    with `optim.ema_decay_at(step + 1, ema_decay, ema_warmup)`. The loss reads the 0-based
    step (RAR's randomness annealing, scalar "random_ratio"). The batch may carry the official
    random draws ("draws", see `tok1d.objectives.tokens`)."""
    loss_fn = tokens_obj.make_loss_fn(model, config.generator)
    grad_fn = jax.value_and_grad(optim.frozen_as_constants(
        lambda p, b, r, s: loss_fn(p, b, r, True, s), config.optim), has_aux=True)
    base_rng = jax.random.key(config.seed + 1)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(base_rng, state.step)
        ((loss, metrics), grads), _ = step_lib.accumulate(
            lambda _, b, r: (grad_fn(state.params, b, r, state.step), None), None, batch, rng,
            config.optim.grad_accum_steps)
        new, grad_norm, finite = step_lib.apply_gradients(
            state, grads, tx, ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)
        finite = finite & jnp.isfinite(loss)
        scalars = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return step_lib.keep_if_finite(finite, new, state), scalars, finite

    return train_step


def make_eval_step(model: nn.Module, gcfg):
    """(params, batch, rng) -> (loss, metrics) without dropout or label dropout; MaskGIT masks
    with the given rng (fixed per batch, so evaluations are comparable)."""
    loss_fn = tokens_obj.make_loss_fn(model, gcfg)
    return lambda params, batch, rng: loss_fn(params, batch, rng, False)


def evaluate_loss(eval_step, params, source, global_batch: int, num_examples: int, sharding
                  ) -> dict[str, float]:
    """Mean validation loss and accuracy over the first whole batches of `source` (at most
    `num_examples`; -1: all). Every host loads its rows of each global batch."""
    n = len(source) if num_examples < 0 else min(num_examples, len(source))
    num_batches = n // global_batch
    if num_batches == 0:
        return {}
    start, stop = parallel.host_batch_slice(sharding, global_batch)
    totals: dict[str, float] = {}
    # The un-augmented image (the flipped or other cropped variants are for training).
    plain = getattr(source, "plain_variant", 0)
    for b in range(num_batches):
        rows = [source[b * global_batch + i] for i in range(start, stop)]
        local = {"codes": np.stack([np.asarray(r["codes"]).reshape(-1, r["codes"].shape[-1])[plain]
                                    for r in rows]).astype(np.int32),
                 "label": np.asarray([r["label"] for r in rows], np.int32)}
        batch = parallel.global_batch(local, sharding, global_batch)
        loss, metrics = eval_step(params, batch, jax.random.key(b))
        for k, v in {**metrics, "loss": loss}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {k: v / num_batches for k, v in totals.items()}
    out["num_examples"] = num_batches * global_batch
    return out


# ---------------------------------------------------------------------------- setup helpers


def token_sources(config):
    """(train source, eval source or None, dataset info) of `config.generator.tokens`, cut to
    the first `generator.prefix_tokens` tokens when that is > 0."""
    directory = config.generator.tokens
    if not directory:
        raise config_lib.ConfigError(
            "generator.tokens is empty: give the token dataset directory written by "
            "`python -m tok1d.cli.tokenize` (--config.generator.tokens=DIR).")
    errors.check_local(directory, "generator.tokens")
    k = config.generator.prefix_tokens
    train = tokens_lib.prefix_source(tokens_lib.TokenSource(directory, config.data.train_split),
                                     k)
    info = train.info
    splits = info.get("splits", {})
    evals = (tokens_lib.prefix_source(tokens_lib.TokenSource(directory, config.data.eval_split),
                                      k)
             if config.data.eval_split in splits else None)
    return train, evals, info


def check_tokens_match(model: nn.Module, info: dict[str, Any]) -> None:
    problems = []
    if info["num_tokens"] != model.num_tokens:
        problems.append(f"the tokens have {info['num_tokens']} codes per image but "
                        f"model.num_tokens={model.num_tokens}")
    if info["codebook_size"] > model.vocab_size:
        problems.append(f"the tokenizer has {info['codebook_size']} codes but the generator "
                        f"predicts {model.vocab_size}")
    if info.get("num_classes", 0) > model.num_classes:
        problems.append(f"the tokens have {info['num_classes']} classes but "
                        f"model.num_classes={model.num_classes}")
    if problems:
        raise config_lib.ConfigError("Token dataset does not match the generator:\n  - "
                                     + "\n  - ".join(problems))


def load_sample_decoder(config, model, sharding, log) -> Optional[decode.SampleDecoder]:
    path = config.generator.tokenizer
    if not path:
        log("generator.tokenizer is empty: no sample grids (validation loss only).")
        return None
    tokenizer, tok_params = loaders.load_tokenizer(path)
    return decode.SampleDecoder(model, config.sampling.to_dict(), tokenizer, tok_params,
                                sharding)


def init_generator(model: nn.Module, batch: int):
    codes = jnp.zeros((batch, model.num_tokens), jnp.int32)
    labels = jnp.zeros((batch,), jnp.int32)
    return lambda rng: model.init(rng, codes, labels)["params"]


# ---------------------------------------------------------------------------- train_and_evaluate


def build_training(config: ml_collections.ConfigDict, model: nn.Module, mesh, rules, batch_sh
                   ) -> tuple[Any, Any, Callable, Callable]:
    """(abstract state, its shardings, rng -> sharded state, jitted step (state donated)) of a
    generator config (shared by `train_and_evaluate` and `tok1d.cli.bench`)."""
    init_params = init_generator(model, 2)
    boxed = jax.eval_shape(init_params, jax.random.key(0))  # traced once
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, nn.unbox(boxed))
    abstract, shardings, init = state_lib.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=config.ema_decay > 0, boxed_params=boxed)
    step_fn = jax.jit(make_train_step(model, tx, schedule, config),
                      in_shardings=(shardings, batch_sh), out_shardings=(shardings, None, None),
                      donate_argnums=(0,))
    return abstract, shardings, init, step_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains a class-conditional generator on tokens; writes checkpoints, TensorBoard logs,
    `samples.png` (one row per class) and metrics.json."""
    # ---------------------------------------------------------------- setup
    workdir, mesh, rules, batch_sh = loop.setup_run(config, workdir)
    is_chief = jax.process_index() == 0
    log = loop.log_fn()

    # ---------------------------------------------------------------- data
    model = build_generator(config)
    train_src, eval_src, info = token_sources(config)
    check_tokens_match(model, info)
    row_start, row_stop = parallel.host_batch_slice(batch_sh, config.batch_size)

    def batches_from(step):
        return feeding.Feeder(iter(tokens_lib.token_dataset(
            train_src, global_batch=config.batch_size, host_start=row_start,
            host_stop=row_stop, seed=config.seed, start_batch=step)), batch_sh,
            config.batch_size)

    # ---------------------------------------------------------------- model, optimizer, state
    abstract, shardings, init, train_step = build_training(config, model, mesh, rules,
                                                           batch_sh)
    checkpointer = loop.checkpointer_for(config, workdir)
    steps = programs.PhasedStep.single(train_step)
    start = state_lib.start_or_resume(checkpointer, abstract, shardings, init,
                                      jax.random.key(config.seed), batches_from,
                                      steps, mesh, rules)
    state, first_step = start.state, start.step
    writer = loop.start_writing(config, workdir)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Generator %s: %.2fM parameters; starting at step %d.", config.model.name,
                 num_params / 1e6, first_step)
    log(f"{config.model.name}: {num_params / 1e6:.2f}M parameters, {len(train_src)} training "
        f"sequences of {model.num_tokens} tokens.")

    # ---------------------------------------------------------------- steps
    nets = None
    if config.evaluation.fid_every_steps > 0:
        nets = evaluator.load_metric_nets(config.evaluation, "", log)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        eval_step = jax.jit(make_eval_step(model, config.generator))
        decoder = load_sample_decoder(config, model, batch_sh, log)
        gfid = make_gfid_eval(config, model, decoder, nets, mesh, batch_sh)

        # ------------------------------------------------------------ evaluation
        def run_eval(state_, step_):
            params = loop.eval_params(state_)
            metrics = {}
            if eval_src is not None:
                metrics.update(evaluate_loss(eval_step, params, eval_src,
                                             config.eval_batch_size, config.data.eval_examples,
                                             batch_sh))
            if decoder is not None:
                n_cls = min(config.generator.num_sample_classes, model.num_classes)
                per_class = max(1, config.num_grid_images // max(n_cls, 1))
                labels = gen_common.sample_labels(n_cls, per_class)
                labels = _pad_to_multiple(labels, mesh.shape["data"] * mesh.shape["fsdp"])
                _, pixels = decoder(params, labels, jax.random.key(config.seed + step_))
                pixels = parallel.host_array(pixels)
                grid = images.make_grid([pixels[c * per_class:(c + 1) * per_class]
                                         for c in range(n_cls)])
                writer.write_images(step_, {"eval/samples": grid})
                if is_chief:
                    images.save_png(os.path.join(workdir, "samples.png"), grid)
            every = config.evaluation.fid_every_steps
            if gfid is not None and (step_ % every == 0 or step_ >= config.total_steps):
                metrics.update(gfid(params, step_))
            writer.write_scalars(step_, {f"eval/{k}": v for k, v in metrics.items()})
            return metrics

        # ------------------------------------------------------------ loop
        result = loop.train_loop(config, workdir, state, first_step, steps, start.batches,
                                 checkpointer, writer, run_eval, start.times,
                                 eval_periods=(config.evaluation.fid_every_steps,))
    writer.close()
    return result


def make_gfid_eval(config, model, decoder: Optional[decode.SampleDecoder], nets, mesh,
                   batch_sh):
    """`gfid(params, step) -> metrics` (gFID, IS, precision / recall of
    `evaluation.num_samples` cyclic-label samples against `evaluation.reference` or the
    data's eval split, with the metric networks `nets`), or None when
    `evaluation.fid_every_steps` is 0."""
    ecfg = config.evaluation
    if ecfg.fid_every_steps <= 0:
        return None
    if decoder is None:
        raise config_lib.ConfigError("evaluation.fid_every_steps needs generator.tokenizer to "
                                     "decode the samples.")
    cache: dict[str, Any] = {}

    def gfid(params, step: int) -> dict[str, float]:
        if "reference" not in cache:
            cache["reference"] = evaluator.load_reference(ecfg, config.data, nets, mesh,
                                                          batch_sh, config.eval_batch_size)
        labels = gen_common.cyclic_labels(ecfg.num_samples, model.num_classes)
        batches = decoder.batches(params, labels, config.eval_batch_size, config.seed + step)
        out, _ = evaluator.generation_metrics(nets, mesh, cache["reference"], batches, ecfg)
        out.pop("num_images", None)
        return out

    return gfid


def _pad_to_multiple(labels: np.ndarray, k: int) -> np.ndarray:
    extra = (-len(labels)) % k
    return np.concatenate([labels, labels[:extra]]) if extra else labels



# ---------------------------------------------------------------------------- fit


def fit(config, codes: np.ndarray, labels: np.ndarray, val_codes: np.ndarray,
        val_labels: np.ndarray, mesh, rules) -> tuple[nn.Module, Any, dict[str, float]]:
    """Trains the generator of `config` from scratch on (codes, labels) (host arrays, the same
    on every host; `config.total_steps` steps of `config.batch_size` rows drawn with
    replacement when there are fewer rows) and returns (model, params, metrics): its last train
    loss ("train_loss", the mean of the last 10 steps) and "val_<metric>" of the validation
    loss over (val_codes, val_labels). Works inside another run's mesh context."""
    model = build_generator(config)
    init_params = init_generator(model, 2)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)  # nothing frozen
    _, shardings, init = state_lib.state_shardings_and_init(init_params, tx, mesh, rules, False)
    batch_sh = parallel.batch_sharding(mesh, rules)
    start, stop = parallel.host_batch_slice(batch_sh, config.batch_size)
    rng = np.random.default_rng(config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init(jax.random.key(config.seed))
        # (built here, not with build_training: inside another run's mesh context abstract
        # evaluation of the boxed params would fail)
        step_fn = jax.jit(make_train_step(model, tx, schedule, config),
                          in_shardings=(shardings, batch_sh), out_shardings=(shardings, None, None),
                          donate_argnums=(0,))
        losses = []
        for _ in range(config.total_steps):
            rows = rng.choice(len(codes), config.batch_size, replace=len(codes) < config.batch_size)
            local = {"codes": codes[rows[start:stop]], "label": labels[rows[start:stop]]}
            state, scalars, _ = step_fn(state, parallel.global_batch(local, batch_sh,
                                                                     config.batch_size))
            losses.append(scalars["loss"])
        val = evaluate_loss(jax.jit(make_eval_step(model, config.generator)), state.params,
                            tokens_lib.ArrayTokenSource(val_codes, val_labels),
                            config.eval_batch_size, -1, batch_sh)
    tail = [float(x) for x in losses[-10:]]
    metrics = {"train_loss": float(np.mean(tail))}
    metrics.update({f"val_{k}": v for k, v in val.items() if k != "num_examples"})
    return model, state.params, metrics
