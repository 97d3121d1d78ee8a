"""Generator trainer: MaskGIT (masked-token prediction) or a LlamaGen-style GPT (next token),
class-conditional, on a token dataset written by `python -m tok1d.cli.tokenize`.

`train_and_evaluate(config, workdir)` runs when `config.trainer == "generator"`. The model
decides the objective: a model with a `mask_id` (MaskGIT) learns to fill masked tokens, any
other (GPT) learns the next token. Sections: model and loss, steps, evaluation (validation
loss over the held-out tokens and a grid of samples decoded by the tokenizer), loop.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tok1d.train import checkpoint as ckpt_lib
from tok1d import images, models, parallel, summary
from tok1d.train import config_lib
from tok1d.train import optim
from tok1d.data import feeding
from tok1d.data import tokens as tokens_lib
from tok1d.generation import common as gen_common
from tok1d.generation import maskgit as maskgit_lib
from tok1d.train import common
from tok1d.weights import layout, loaders


# ---------------------------------------------------------------------------- model and loss


def build_generator(config) -> nn.Module:
    return models.create(config.model.name, **config_lib.model_kwargs(config))


def is_maskgit(model: nn.Module) -> bool:
    return hasattr(model, "mask_id")


def vocab_size(model: nn.Module) -> int:
    """Number of tokenizer codes the generator predicts."""
    return model.codebook_size if is_maskgit(model) else model.vocab_size


def next_token_loss(logits: jax.Array, codes: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Mean cross-entropy of teacher-forced logits (B, N, V) against the codes (B, N)
    (LlamaGen: plain CE, mean over all positions), and the top-1 accuracy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
    acc = jnp.mean((jnp.argmax(logits, -1) == codes).astype(jnp.float32))
    return jnp.mean(ce), dict(accuracy=acc)


def make_loss_fn(model: nn.Module, gcfg) -> Callable[..., tuple[jax.Array, dict[str, Any]]]:
    """(params, batch, rng, train) -> (loss, metrics). Training drops labels to the null class
    with probability `label_dropout` (classifier-free guidance); MaskGIT masks a random,
    schedule-drawn fraction of every sequence.

    `batch`: "codes" (B, N) ints, "label" (B,) ints and optionally "draws", the official random
    draws to replay instead of drawing (`common.injected`), each with a leading batch axis:
    "drop_rand_u" / "drop_labels" (`generation.common.drop_labels`, training only) and, for
    MaskGIT, "mask_timesteps_u" / "mask_rand_u" (`generation.maskgit.random_mask`)."""
    maskgit = is_maskgit(model)

    def loss_fn(params, batch, rng, train: bool):
        codes = batch["codes"].astype(jnp.int32)
        labels = batch["label"].astype(jnp.int32)
        draw = functools.partial(common.injected, batch)
        k_label, k_mask, k_dropout = jax.random.split(rng, 3)
        if train:
            labels = gen_common.drop_labels(k_label, labels, gcfg.label_dropout,
                                            model.null_label, draw=draw)
        rngs = {"dropout": k_dropout}
        if maskgit:
            tokens, masked = maskgit_lib.random_mask(k_mask, codes, model.mask_id,
                                                     gcfg.mask_schedule, draw=draw)
            logits = model.apply({"params": params}, tokens, labels, train=train, rngs=rngs)
            return maskgit_lib.token_loss(logits, codes, masked, gcfg.label_smoothing,
                                          gcfg.unmasked_weight)
        logits = model.apply({"params": params}, codes, labels, train=train, rngs=rngs)
        return next_token_loss(logits, codes)

    return loss_fn


# ---------------------------------------------------------------------------- steps


def make_train_step(model: nn.Module, tx, schedule, config):
    """(state, batch) -> (state, scalars, finite): loss, grads (accumulated over
    `optim.grad_accum_steps` microbatches), AdamW, EMA; a non-finite step is not applied.

    The order of the official loops (TiTok's `train_one_epoch_generator`, LlamaGen's
    train_c2i.py): gradients -> their global norm before clipping (scalar "grad_norm") ->
    clipping (`optim.grad_clip`, torch's rule with `optim.clip_eps`) -> AdamW at LR
    `schedule(step)` (scalar "lr"; when the schedule is read: `optim.schedule_step`) -> EMA
    with `optim.ema_decay_at(step + 1, ema_decay, ema_warmup)`. The batch may carry the
    official random draws ("draws", see `make_loss_fn`)."""
    loss_fn = make_loss_fn(model, config.generator)
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, r, True), has_aux=True)
    accum = config.optim.grad_accum_steps
    base_rng = jax.random.key(config.seed + 1)

    def grads_of(params, batch, rng):
        if accum == 1:
            return grad_fn(params, batch, rng)
        micro = jax.tree.map(lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1),
                             batch)

        def body(total, xs):
            out = grad_fn(params, xs[0], xs[1])
            return jax.tree.map(jnp.add, total, out), None

        rngs = jax.random.split(rng, accum)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro),
                                            rngs[0]))
        total, _ = jax.lax.scan(body, zeros, (micro, rngs))
        return jax.tree.map(lambda x: x / accum, total)

    def train_step(state: common.TrainState, batch):
        rng = jax.random.fold_in(base_rng, state.step)
        (loss, metrics), grads = grads_of(state.params, batch, rng)
        grad_norm = optim.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_decay = optim.ema_decay_at(state.step + 1, config.ema_decay, config.ema_warmup)
        ema = (common.ema_update(state.ema_params, params, ema_decay)
               if state.ema_params is not None else None)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optim.global_norm(updates)))
        scalars = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return common.keep_if_finite(finite, new, state), scalars, finite

    return train_step


def make_eval_step(model: nn.Module, gcfg):
    """(params, batch, rng) -> (loss, metrics) without dropout or label dropout; MaskGIT masks
    with the given rng (fixed per batch, so evaluations are comparable)."""
    loss_fn = make_loss_fn(model, gcfg)
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
    for b in range(num_batches):
        rows = [source[b * global_batch + i] for i in range(start, stop)]
        # Variant 0: the un-augmented image (flipped variants are for training).
        local = {"codes": np.stack([np.asarray(r["codes"]).reshape(-1, r["codes"].shape[-1])[0]
                                    for r in rows]).astype(np.int32),
                 "label": np.asarray([r["label"] for r in rows], np.int32)}
        batch = parallel.global_batch(local, sharding, global_batch)
        loss, metrics = eval_step(params, batch, jax.random.key(b))
        for k, v in {**metrics, "loss": loss}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    out = {k: v / num_batches for k, v in totals.items()}
    out["num_examples"] = num_batches * global_batch
    return out


def sample_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Labels 0..num_classes-1, each repeated per_class times (one grid row per class)."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


class SampleDecoder:
    """Samples codes with the configured sampler and decodes them to [0, 1] images with the
    tokenizer; jitted once, sharded over the batch axis of the mesh."""

    def __init__(self, model: nn.Module, sampling: dict[str, Any], tokenizer, tok_params,
                 sharding):
        from tok1d.train.tokenizer import pixel_range_fns
        self.sharding = sharding
        self.sampler = gen_common.make_sampler(model, **sampling)
        self.tokenizer, self.tok_params = tokenizer, tok_params
        _, to_unit = pixel_range_fns(tokenizer)

        def decode(tok_params, codes):
            pixels = tokenizer.apply({"params": tok_params}, codes,
                                     method=tokenizer.decode_codes)
            return jnp.clip(to_unit(pixels), 0.0, 1.0)
        self.decode = jax.jit(decode)

    def __call__(self, params, labels: np.ndarray, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        global_labels = parallel.global_batch({"label": labels[self._host_rows(len(labels))]},
                                              self.sharding, len(labels))["label"]
        codes = self.sampler(params, global_labels, rng)
        return codes, self.decode(self.tok_params, codes)

    def batches(self, params, labels: np.ndarray, batch_size: int, seed: int, log=None
                ) -> Iterator[tuple[jax.Array, np.ndarray]]:
        """Samples images for every label, `batch_size` at a time (the last batch repeats
        labels); yields (global [0, 1] pixels of the whole batch, its valid-row mask) and
        prints progress (images/s, ETA) through `log`."""
        t0 = time.time()
        for b, start in enumerate(range(0, len(labels), batch_size)):
            batch = labels[start:start + batch_size]
            padded = np.resize(batch, batch_size)
            _, pixels = self(params, padded, jax.random.fold_in(jax.random.key(seed), b))
            yield pixels, np.arange(batch_size) < len(batch)
            done = start + len(batch)
            if log is not None:
                rate = done / max(time.time() - t0, 1e-9)
                log(f"{done}/{len(labels)} images, {rate:.1f} img/s, "
                    f"ETA {(len(labels) - done) / max(rate, 1e-9):.0f} s")

    def _host_rows(self, n: int) -> slice:
        start, stop = parallel.host_batch_slice(self.sharding, n)
        return slice(start, stop)


# ---------------------------------------------------------------------------- setup helpers


def token_sources(config):
    """(train source, eval source or None, dataset info) of `config.generator.tokens`."""
    directory = config.generator.tokens
    if not directory:
        raise config_lib.ConfigError(
            "generator.tokens is empty: give the token dataset directory written by "
            "`python -m tok1d.cli.tokenize` (--config.generator.tokens=DIR).")
    train = tokens_lib.TokenSource(directory, config.data.train_split)
    info = train.info
    splits = info.get("splits", {})
    evals = (tokens_lib.TokenSource(directory, config.data.eval_split)
             if config.data.eval_split in splits else None)
    return train, evals, info


def check_tokens_match(model: nn.Module, info: dict[str, Any]) -> None:
    problems = []
    if info["num_tokens"] != model.num_tokens:
        problems.append(f"the tokens have {info['num_tokens']} codes per image but "
                        f"model.num_tokens={model.num_tokens}")
    if info["codebook_size"] > vocab_size(model):
        problems.append(f"the tokenizer has {info['codebook_size']} codes but the generator "
                        f"predicts {vocab_size(model)}")
    if info.get("num_classes", 0) > model.num_classes:
        problems.append(f"the tokens have {info['num_classes']} classes but "
                        f"model.num_classes={model.num_classes}")
    if problems:
        raise config_lib.ConfigError("Token dataset does not match the generator:\n  - "
                                     + "\n  - ".join(problems))


def load_sample_decoder(config, model, sharding, log) -> Optional[SampleDecoder]:
    path = config.generator.tokenizer
    if not path:
        log("generator.tokenizer is empty: no sample grids (validation loss only).")
        return None
    tokenizer, tok_params = loaders.load_tokenizer(path)
    return SampleDecoder(model, config.sampling.to_dict(), tokenizer, tok_params, sharding)


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
    param_shapes = nn.unbox(jax.eval_shape(init_params, jax.random.key(0)))
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, param_shapes)
    abstract, shardings, init = common.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=config.ema_decay > 0)
    step_fn = jax.jit(make_train_step(model, tx, schedule, config),
                      in_shardings=(shardings, batch_sh), out_shardings=(shardings, None, None),
                      donate_argnums=(0,))
    return abstract, shardings, init, step_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains a class-conditional generator on tokens; writes checkpoints, TensorBoard logs,
    `samples.png` (one row per class) and metrics.json."""
    # ---------------------------------------------------------------- setup
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_chief = jax.process_index() == 0
    log = common.log_fn()
    writer = summary.MetricWriter(workdir, enabled=is_chief)
    writer.write_hparams(config.to_dict())
    common.write_json(layout.config_path(workdir), config.to_dict())
    mesh, rules, batch_sh = parallel.mesh_from_config(config)

    # ---------------------------------------------------------------- data
    model = build_generator(config)
    train_src, eval_src, info = token_sources(config)
    check_tokens_match(model, info)
    start, stop = parallel.host_batch_slice(batch_sh, config.batch_size)
    train_ds = tokens_lib.token_dataset(train_src, global_batch=config.batch_size,
                                        host_start=start, host_stop=stop, seed=config.seed)
    train_iter = iter(train_ds)

    # ---------------------------------------------------------------- model, optimizer, state
    abstract, shardings, init, train_step = build_training(config, model, mesh, rules,
                                                           batch_sh)
    checkpointer = ckpt_lib.Checkpointer(
        layout.checkpoint_dir(workdir), every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    state, first_step = common.init_or_restore(checkpointer, abstract, shardings, init,
                                               jax.random.key(config.seed), train_iter)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Generator %s: %.2fM parameters; starting at step %d.", config.model.name,
                 num_params / 1e6, first_step)
    log(f"{config.model.name}: {num_params / 1e6:.2f}M parameters, {len(train_src)} training "
        f"sequences of {model.num_tokens} tokens.")

    # ---------------------------------------------------------------- steps
    feeder = feeding.Feeder(train_iter, batch_sh, config.batch_size)
    nets = None
    if config.evaluation.fid_every_steps > 0:
        from tok1d.evaluation import evaluator
        nets = evaluator.load_metric_nets(config.evaluation, "", log)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        eval_step = jax.jit(make_eval_step(model, config.generator))
        decoder = load_sample_decoder(config, model, batch_sh, log)
        gfid = make_gfid_eval(config, model, decoder, nets, mesh, batch_sh)

        # ------------------------------------------------------------ evaluation
        def run_eval(state_, step_):
            params = state_.ema_params if state_.ema_params is not None else state_.params
            metrics = {}
            if eval_src is not None:
                metrics.update(evaluate_loss(eval_step, params, eval_src,
                                             config.eval_batch_size, config.data.eval_examples,
                                             batch_sh))
            if decoder is not None:
                n_cls = min(config.generator.num_sample_classes, model.num_classes)
                per_class = max(1, config.num_grid_images // max(n_cls, 1))
                labels = sample_labels(n_cls, per_class)
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
        result = common.train_loop(config, workdir, state, first_step, train_step, feeder,
                                   train_iter, checkpointer, writer, run_eval)
    writer.close()
    return result


def make_gfid_eval(config, model, decoder: Optional[SampleDecoder], nets, mesh, batch_sh):
    """`gfid(params, step) -> metrics` (gFID, IS, precision / recall of
    `evaluation.num_samples` cyclic-label samples against `evaluation.reference` or the
    data's eval split, with the metric networks `nets`), or None when
    `evaluation.fid_every_steps` is 0."""
    from tok1d.evaluation import evaluator
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



# ---------------------------------------------------------------------------- AR probing


def probe_config(probe_cfg, vocab: int, num_tokens: int, num_classes: int, mesh_cfg,
                 seed: int) -> ml_collections.ConfigDict:
    """The generator config of an AR probe (`config.ar_probe` of a tokenizer run): a small GPT
    over the tokenizer's codes, AdamW at a constant lr after a short warm-up, no dropout."""
    c = config_lib.base_config()
    c.trainer, c.seed, c.precision, c.ema_decay = "generator", seed, "float32", 0.0
    c.total_steps, c.batch_size, c.eval_batch_size = (probe_cfg.steps, probe_cfg.batch_size,
                                                      probe_cfg.batch_size)
    c.mesh = mesh_cfg
    c.model = dict(name="gpt", vocab_size=vocab, num_tokens=num_tokens, num_classes=num_classes,
                   token_dropout=0.0, dropout_rate=0.0, **probe_cfg.model.to_dict())
    o = c.optim
    o.lr, o.warmup_steps, o.schedule, o.b2, o.weight_decay, o.decay_mask = (
        probe_cfg.lr, min(50, probe_cfg.steps // 10), "constant", 0.95, 0.05, "matrices")
    return c


def fit_probe(config, codes: np.ndarray, labels: np.ndarray, val_codes: np.ndarray,
              val_labels: np.ndarray, mesh, rules, ecfg=None) -> dict[str, float]:
    """Trains the probe GPT of `config` from scratch on (codes, labels) (host arrays, the same
    on every host) and returns its last train loss and its validation loss / accuracy: how
    learnable the tokens are for an AR model (GigaTok's AR probing, shortened)."""
    model = build_generator(config)
    init_params = init_generator(model, 2)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)  # nothing frozen
    _, shardings, init = common.state_shardings_and_init(init_params, tx, mesh, rules, False)
    batch_sh = parallel.batch_sharding(mesh, rules)
    start, stop = parallel.host_batch_slice(batch_sh, config.batch_size)
    rng = np.random.default_rng(config.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = init(jax.random.key(config.seed))
        # (built here, not with build_training: this runs inside the tokenizer run's mesh
        # context, where abstract evaluation of the boxed params would fail)
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
    out = {"train_loss": float(np.mean(tail))}
    out.update({f"val_{k}": v for k, v in val.items() if k != "num_examples"})
    from tok1d.models.generators.gpt import GPT
    if ecfg is not None and ecfg.linear_probe_epochs > 0 and isinstance(model, GPT):
        from tok1d.evaluation import linear_probe
        out.update(linear_probe.probe_from_config(model, state.params, (codes, labels),
                                                  (val_codes, val_labels), ecfg, mesh, rules,
                                                  seed=config.seed))
    return out
