"""Generator trainer: any generator (`tok1d.models.interfaces.Generator`: MaskGIT's
masked-token, a LlamaGen-style GPT's next-token or RAR's permuted next-token objective),
class-conditional, on a token dataset written by `python -m tok1d.cli.tokenize`, or on images
that the frozen tokenizer encodes inside every train step (`generator.token_source`).

`train_and_evaluate(config, workdir)` runs when `config.trainer == "generator"`; `fit` trains a
generator from scratch on codes held in memory (the AR probe, `tok1d.probes.ar`). The model's
`objective` picks the loss (`tok1d.objectives.tokens`) and the sampler
(`tok1d.generation.common`). Sections: model and steps, evaluation (validation loss over the
held-out tokens, a grid of samples decoded by the tokenizer, gFID), setup, the run, fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tok1d import errors, images, models, parallel
from tok1d.data import feeding, pipeline, sources
from tok1d.data import tokens as tokens_lib
from tok1d.evaluation import evaluator
from tok1d.generation import common as gen_common
from tok1d.generation import decode
from tok1d.models import interfaces
from tok1d.models.tokenizers import nested
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


def make_train_step(model: nn.Module, tx, schedule, config,
                    tokenizer: Optional[nn.Module] = None):
    """(state, batch) -> (state, scalars, finite): loss, grads (accumulated over
    `optim.grad_accum_steps` microbatches), AdamW, EMA; a non-finite step is not applied.
    With a `tokenizer` (generator.token_source "images") the step is (state, batch, tok_params)
    and the batch holds [0, 1] "image"s that the frozen tokenizer encodes first, the whole
    batch at once (GigaTok's train_c2i.py with --dataset imagenet: `tokenizer.encode` under
    no_grad, then the GPT step).

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

    def train_step(state: TrainState, batch, tok_params=None):
        if tokenizer is not None:
            batch = images_to_codes(tokenizer, tok_params, batch, config.generator.prefix_tokens)
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


def images_to_codes(tokenizer: nn.Module, tok_params, batch, prefix_tokens: int = 0):
    """A batch of [0, 1] "image"s (and "label", maybe "mask") -> the batch of their codes
    ("codes", "label"; other entries kept, the images and mask dropped)."""
    out = {k: v for k, v in batch.items() if k not in ("image", "mask")}
    out["codes"] = interfaces.encode_images(tokenizer, tok_params, batch["image"], prefix_tokens)
    return out


def make_eval_step(model: nn.Module, gcfg):
    """(params, batch, rng) -> (loss, metrics) without dropout or label dropout; MaskGIT masks
    with the given rng (fixed per batch, so evaluations are comparable)."""
    loss_fn = tokens_obj.make_loss_fn(model, gcfg)
    return lambda params, batch, rng: loss_fn(params, batch, rng, False)


def evaluate_loss(eval_step, params, batches: Iterable[Any]) -> dict[str, float]:
    """Mean validation loss and accuracy over global batches of codes ({"codes", "label"})."""
    totals: dict[str, float] = {}
    count = num_examples = 0
    for b, batch in enumerate(batches):
        loss, metrics = eval_step(params, batch, jax.random.key(b))
        for k, v in {**metrics, "loss": loss}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count, num_examples = count + 1, num_examples + batch["label"].shape[0]
    if not count:
        return {}
    out = {k: v / count for k, v in totals.items()}
    out["num_examples"] = num_examples
    return out


def num_eval_batches(source_size: int, global_batch: int, num_examples: int) -> int:
    """Whole global batches of the first `num_examples` (-1: all) of `source_size` examples."""
    n = source_size if num_examples < 0 else min(num_examples, source_size)
    return n // global_batch


def token_batches(source, global_batch: int, num_examples: int, sharding) -> Iterator[Any]:
    """The validation batches of a token source: its first whole global batches (at most
    `num_examples`; -1: all), the un-augmented variant of each example (the flipped or other
    cropped variants are for training). Every host loads its rows of each global batch."""
    start, stop = parallel.host_batch_slice(sharding, global_batch)
    plain = getattr(source, "plain_variant", 0)
    for b in range(num_eval_batches(len(source), global_batch, num_examples)):
        rows = [source[b * global_batch + i] for i in range(start, stop)]
        local = {"codes": np.stack([np.asarray(r["codes"]).reshape(-1, r["codes"].shape[-1])[plain]
                                    for r in rows]).astype(np.int32),
                 "label": np.asarray([r["label"] for r in rows], np.int32)}
        yield parallel.global_batch(local, sharding, global_batch)


def image_batches(encode, tok_params, eval_ds, num_batches: int, sharding, global_batch: int
                  ) -> Iterator[Any]:
    """The validation batches of an image split (`tok1d.data.pipeline.eval_dataset`: center
    crops), encoded by `encode(tok_params, batch)` (`images_to_codes`, jitted); whole batches
    only, as `token_batches`."""
    feeder = feeding.Feeder(iter(eval_ds), sharding, global_batch)
    for _ in range(num_batches):
        yield encode(tok_params, next(feeder))


# ---------------------------------------------------------------------------- setup helpers


def token_sources(config):
    """(train source, eval source or None, dataset info) of `config.generator.tokens`, cut to
    the first `generator.prefix_tokens` tokens when that is > 0."""
    check_token_source(config)
    directory = config.generator.tokens
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


def no_eval_split_warning(config, info: dict[str, Any]) -> str:
    """The line a run on a token dataset without `data.eval_split` says once at its start."""
    splits = ", ".join(sorted(info.get("splits", {}))) or "none"
    return (f"Warning: the tokens {config.generator.tokens} have no {config.data.eval_split!r} "
            f"split (data.eval_split; they have: {splits}), so there is no validation loss. "
            f"Tokenize that split into them (tok1d tokenize --split={config.data.eval_split}) "
            "or name one they have (--config.data.eval_split=...).")


def tokens_identity(info: dict[str, Any], splits: Sequence[str]) -> dict[str, Any]:
    """What must be the same in the token dataset every host reads (`parallel.check_same`):
    its tokens and tokenizer, and the examples and code statistics of each split of
    `splits` it has; not where it was written from."""
    same = {k: info.get(k) for k in ("format", "num_tokens", "codebook_size", "codes_dtype",
                                      "tokenizer_fingerprint", "num_classes")}
    for split in splits:
        done = info.get("splits", {}).get(split)
        if done is not None:
            same[f"splits.{split}"] = {k: done.get(k) for k in (
                "num_examples", "num_variants", "variants", "shards", "code_usage")}
    return same


def check_tokens_match(model: nn.Module, info: dict[str, Any]) -> None:
    problems = []
    if info["num_tokens"] != model.num_tokens:
        problems.append(f"the tokens have {info['num_tokens']} codes per image but "
                        f"model.num_tokens={model.num_tokens}")
    if info["codebook_size"] != model.vocab_size:  # (fewer: sampling is refused, check_pair)
        problems.append(f"the tokenizer has {info['codebook_size']} codes but the generator "
                        f"predicts {model.vocab_size} (give it {info['codebook_size']}: "
                        "model.vocab_size, MaskGIT's model.codebook_size)")
    if info.get("num_classes", 0) > model.num_classes:
        problems.append(f"the tokens have {info['num_classes']} classes but "
                        f"model.num_classes={model.num_classes}")
    if problems:
        raise config_lib.ConfigError("Token dataset does not match the generator:\n  - "
                                     + "\n  - ".join(problems))


@dataclasses.dataclass(frozen=True)
class FrozenTokenizer:
    """A generator run's frozen tokenizer (`load_frozen_tokenizer`): the module, its params
    (global arrays split over the mesh by the logical rules, except, with
    generator.tokenizer_decoder "host", the ones encoding does not read: NumPy in host memory)
    and every param's sharding by the rules."""
    module: nn.Module
    params: Any
    shardings: Any

    @property
    def encode_params(self) -> Any:
        """The params on the devices (all of them, or the ones encoding reads): what the
        train step takes."""
        return _without_host_leaves(self.params)

    @property
    def keeps_host_params(self) -> bool:
        return any(isinstance(x, np.ndarray) for x in jax.tree.leaves(self.params))

    def on_devices(self) -> Any:
        """All params on the devices: the host ones put with their shardings (a copy that
        lives as long as the caller keeps it: an evaluation's decoding)."""
        return jax.tree.map(lambda x, s: parallel.put_host(x, s) if isinstance(x, np.ndarray)
                            else x, self.params, self.shardings)


def _without_host_leaves(tree: Any) -> Any:
    if isinstance(tree, dict):
        out = {k: _without_host_leaves(v) for k, v in tree.items()}
        return {k: v for k, v in out.items()
                if v is not None and (not isinstance(v, dict) or v)}
    return None if isinstance(tree, np.ndarray) else tree


def load_frozen_tokenizer(config, mesh, rules) -> Optional[FrozenTokenizer]:
    """The `FrozenTokenizer` of `generator.tokenizer`, or None when it is empty. It encodes
    the training images (token_source "images") and decodes the sample grids. When it
    encodes, it computes in float32, as upstream's encode runs outside the autocast (a
    tok1d-trained tokenizer would otherwise compute in its run's bf16, as `tok1d tokenize`,
    `sample` and `evaluate` run it); its params are split over the mesh by the logical rules
    like a trained model's (an XL-XXL tokenizer is 10.8 GiB in float32). With
    generator.tokenizer_decoder "host" (only when it encodes) the params encoding does not
    read, 7.2 GiB of the decoder for XL-XXL, stay in host memory and are put on the devices
    only while an evaluation decodes (upstream deletes its decoder; tok1d's grids need it)."""
    check_token_source(config)
    path = config.generator.tokenizer
    if not path:
        return None
    encodes = encodes_images(config)
    if not loaders.is_released(path):  # (a name's download and conversion agree on their own)
        # A host without it stopped alone; the others waited in the load's collective.
        parallel.everywhere(lambda: loaders.describe_tokenizer(path), f"the tokenizer {path}")
    tokenizer, tok_params = loaders.load_tokenizer(path, **({"dtype": "float32"} if encodes
                                                             else {}))
    tok_params = nn.unbox(tok_params)
    if jax.process_count() > 1:  # (another tokenizer under that path on one host)
        parallel.check_same({"weights": loaders.params_fingerprint(tok_params)},
                            f"the tokenizer {path}")
    shardings = tokenizer_shardings(tokenizer, config.data.image_size, mesh, rules)
    on_devices = jax.tree.map(lambda _: True, tok_params)
    if encodes and config.generator.get("tokenizer_decoder", "device") == "host":
        on_devices = interfaces.params_encode_reads(
            tokenizer, tok_params, tokenizer.input_size or config.data.image_size)
    params = jax.tree.map(lambda x, s, dev: parallel.put_host(np.asarray(x), s) if dev
                          else np.asarray(x), tok_params, shardings, on_devices)
    return FrozenTokenizer(tokenizer, params, shardings)


def tokenizer_shardings(tokenizer: nn.Module, image_size: int, mesh, rules) -> Any:
    """The shardings of a tokenizer's params by the logical `rules`, like a trained model's
    (its init traced at `image_size` for the logical axes)."""
    size = tokenizer.input_size or image_size
    sample = jnp.zeros((1, size, size, 3), jnp.float32)
    return parallel.rules_shardings(lambda rng: tokenizer.init(rng, sample)["params"], mesh,
                                    rules)


def place_tokenizer(tokenizer: nn.Module, tok_params, image_size: int, mesh, rules):
    """A loaded tokenizer's params split over `mesh` by the logical `rules`
    (`tokenizer_shardings`)."""
    return jax.tree.map(lambda x, s: parallel.put_host(np.asarray(x), s), nn.unbox(tok_params),
                        tokenizer_shardings(tokenizer, image_size, mesh, rules))


def check_tokens_tokenizer(config, tok_params, tokenizer_path: str, log,
                           info: Optional[dict[str, Any]] = None) -> None:
    """Warns when the tokenizer that decodes a generator's tokens is not the one that wrote
    its token dataset (`info`, default config.generator.tokens' tokens_info.json when there
    is one): the fingerprint of its params differs, so its codes mean other images and the
    samples (and their gFID) are wrong. A warning, not an error: the weights may have moved."""
    directory = config.generator.get("tokens")
    if info is None:
        if not directory or not os.path.isfile(os.path.join(directory,
                                                            tokens_lib.INFO_FILENAME)):
            return
        try:
            info = tokens_lib.read_info(directory)
        except (OSError, ValueError):  # (a damaged info: training on it says so)
            return
    written = info.get("tokenizer_fingerprint")
    if not written:
        return
    now = loaders.params_fingerprint(tok_params)
    if now is None or now == written:
        return
    made = info.get("tokenizer") or {}
    by = (f" ({made['path']}" + (f" at step {made['step']}" if made.get("step") is not None
                                 else "") + ")") if made.get("path") else ""
    log(f"Warning: the tokenizer {tokenizer_path} is not the one that wrote the tokens "
        f"{directory}{by}: its weights' fingerprint differs from the one in "
        f"{tokens_lib.INFO_FILENAME}, so its codes mean other images and the samples and their "
        "metrics are wrong. Give that tokenizer (--tokenizer / --config.generator.tokenizer).")


def check_token_source(config) -> None:
    """A ConfigError when the training sequences' source lacks what it needs."""
    if encodes_images(config) and not config.generator.tokenizer:
        raise config_lib.ConfigError(
            "generator.token_source='images' needs generator.tokenizer, the tokenizer that "
            "encodes the training images (--config.generator.tokenizer=DIR).")
    if encodes_images(config) and config.generator.tokens:
        raise config_lib.ConfigError(
            "generator.tokens is set but generator.token_source='images' encodes the images "
            "of `data` instead: drop --config.generator.tokens, or read it with "
            "--config.generator.token_source=dataset (configs/gpt_gigatok.py trains on images "
            "by default since 2026-12-06).")
    if not encodes_images(config) and not config.generator.tokens:
        raise config_lib.ConfigError(
            "generator.tokens is empty: give the token dataset directory written by "
            "`python -m tok1d.cli.tokenize` (--config.generator.tokens=DIR), or train on "
            "images encoded in the step (--config.generator.token_source=images).")


def tokenizer_info(tokenizer: nn.Module, tok_params, prefix_tokens: int, image_size: int,
                   num_classes: Optional[int]) -> dict[str, Any]:
    """What a token dataset's info says of its codes, for the sequences `tokenizer` encodes
    from `image_size` images (the first `prefix_tokens` when > 0) of `num_classes` classes;
    a ConfigError where it cannot encode them."""
    if not tokenizer.num_codes:
        raise config_lib.ConfigError(
            f"generator.token_source='images' needs a VQ tokenizer: generator.tokenizer is a "
            f"{type(tokenizer).__name__} without discrete codes.")
    if tokenizer.input_size not in (None, image_size):
        raise config_lib.ConfigError(
            f"generator.tokenizer encodes {tokenizer.input_size} px images but "
            f"data.image_size={image_size}.")
    try:
        nested.check_code_prefix(tokenizer, prefix_tokens, "generator.prefix_tokens")
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    # The codes of one image at this size (a fully convolutional tokenizer, MaskGIT-VQGAN,
    # gives more at a larger size than its num_tokens says).
    codes = jax.eval_shape(lambda p: interfaces.encode_images(
        tokenizer, p, jnp.zeros((1, image_size, image_size, 3), jnp.float32)), tok_params)
    info = {"num_tokens": prefix_tokens or codes.shape[1], "codebook_size": tokenizer.num_codes}
    if num_classes:
        info["num_classes"] = int(num_classes)
    return info


def sample_decoder(config, model, frozen_tokenizer: Optional[FrozenTokenizer], sharding, log
                   ) -> Optional[decode.SampleDecoder]:
    if frozen_tokenizer is None:
        log("generator.tokenizer is empty: no sample grids (validation loss only).")
        return None
    return decode.SampleDecoder(model, config.sampling.to_dict(), frozen_tokenizer.module,
                                frozen_tokenizer.params, sharding, config.sampling_precision, log)


def init_generator(model: nn.Module, batch: int):
    inputs = interfaces.generator_inputs(model, batch)
    return lambda rng: model.init(rng, *inputs)["params"]


# ---------------------------------------------------------------------------- train_and_evaluate


def build_training(config: ml_collections.ConfigDict, model: nn.Module, mesh, rules, batch_sh,
                   frozen_tokenizer: Optional[FrozenTokenizer] = None
                   ) -> tuple[Any, Any, Callable, Callable]:
    """(abstract state, its shardings, rng -> sharded state, jitted step (state donated)) of a
    generator config (shared by `train_and_evaluate` and `tok1d.cli.bench`). With
    generator.token_source "images" the step encodes images with `frozen_tokenizer`
    (`load_frozen_tokenizer`) and takes its `encode_params` as a third
    argument."""
    init_params = init_generator(model, 2)
    boxed = jax.eval_shape(init_params, jax.random.key(0))  # traced once
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, nn.unbox(boxed))
    abstract, shardings, init = state_lib.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=config.ema_decay > 0, boxed_params=boxed)
    tokenizer, tok_sh = None, ()
    if encodes_images(config):
        tokenizer = frozen_tokenizer.module
        tok_sh = (jax.tree.map(lambda x: x.sharding, frozen_tokenizer.encode_params),)
    step_fn = jax.jit(make_train_step(model, tx, schedule, config, tokenizer),
                      in_shardings=(shardings, batch_sh, *tok_sh),
                      out_shardings=(shardings, None, None), donate_argnums=(0,))
    return abstract, shardings, init, step_fn


def encodes_images(config) -> bool:
    """Whether the generator trains on images its tokenizer encodes in the step."""
    return config.generator.get("token_source", "dataset") == "images"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains a class-conditional generator on tokens; writes checkpoints, TensorBoard logs,
    `samples.png` (one row per class) and metrics.json."""
    # ---------------------------------------------------------------- setup
    check_token_source(config)  # before the workdir is made
    workdir, mesh, rules, batch_sh = loop.setup_run(config, workdir)
    is_chief = jax.process_index() == 0
    log = loop.log_fn()
    nets = None
    if config.evaluation.fid_every_steps > 0:  # before any work: a wrong reference fails now
        nets = evaluator.load_metric_nets(config.evaluation, "", log, lpips=False)
        check_gfid_reference(config.evaluation, nets)

    # ---------------------------------------------------------------- data
    model = build_generator(config)
    frozen_tokenizer = load_frozen_tokenizer(config, mesh, rules)
    row_start, row_stop = parallel.host_batch_slice(batch_sh, config.batch_size)
    e_start, e_stop = parallel.host_batch_slice(batch_sh, config.eval_batch_size)
    step_args: tuple = ()
    if encodes_images(config):  # images, encoded in the step by the frozen tokenizer
        dcfg = config.data
        tokenizer, tok_params = frozen_tokenizer.module, frozen_tokenizer.encode_params
        train_src, eval_src = parallel.everywhere(  # (a host without the data: all stop)
            lambda: (sources.source_of(dcfg, dcfg.train_split),
                     sources.source_of(dcfg, dcfg.eval_split)), f"the data {dcfg.name}")
        info = tokenizer_info(tokenizer, tok_params, config.generator.prefix_tokens,
                              dcfg.image_size, getattr(train_src, "num_classes", None))
        parallel.everywhere(lambda: check_tokens_match(model, info), "the tokenizer's codes")
        step_args = (tok_params,)
        data_line = (f"{len(train_src)} training images ({dcfg.name}:{dcfg.train_split}, "
                     f"{dcfg.augment}{' + flip' if dcfg.flip else ''}) encoded in every step "
                     f"into {info['num_tokens']} tokens")

        def batches_from(step):
            return feeding.Feeder(iter(pipeline.recipe_train_dataset(
                train_src, dcfg, global_batch=config.batch_size, host_start=row_start,
                host_stop=row_stop, seed=config.seed, start_batch=step)), batch_sh,
                config.batch_size)

        encode_batch = jax.jit(functools.partial(images_to_codes, tokenizer,
                                                 prefix_tokens=config.generator.prefix_tokens))

        def eval_batches():
            ds, _ = pipeline.recipe_eval_dataset(eval_src, dcfg,
                                                 global_batch=config.eval_batch_size,
                                                 host_start=e_start, host_stop=e_stop)
            n = num_eval_batches(len(eval_src), config.eval_batch_size, dcfg.eval_examples)
            return image_batches(encode_batch, tok_params, ds, n, batch_sh,
                                 config.eval_batch_size)
    else:  # a token dataset
        def matching_tokens():
            found = token_sources(config)
            check_tokens_match(model, found[2])
            return found

        train_src, eval_src, info = parallel.everywhere(  # (a host without them: all stop)
            matching_tokens, f"the tokens {config.generator.tokens}")
        parallel.check_same(tokens_identity(info, (config.data.train_split,
                                                   config.data.eval_split)),
                            f"the tokens {config.generator.tokens}")
        if frozen_tokenizer is not None:
            check_tokens_tokenizer(config, frozen_tokenizer.params, config.generator.tokenizer,
                                   log, info)
        data_line = f"{len(train_src)} training sequences of {model.num_tokens} tokens"
        if eval_src is None:  # (training goes on: a token dataset of the train split alone)
            log(no_eval_split_warning(config, info))

        def batches_from(step):
            return feeding.Feeder(iter(tokens_lib.token_dataset(
                train_src, global_batch=config.batch_size, host_start=row_start,
                host_stop=row_stop, seed=config.seed, start_batch=step)), batch_sh,
                config.batch_size)

        def eval_batches():
            return token_batches(eval_src, config.eval_batch_size, config.data.eval_examples,
                                 batch_sh)

    # ---------------------------------------------------------------- model, optimizer, state
    abstract, shardings, init, train_step = build_training(config, model, mesh, rules,
                                                           batch_sh, frozen_tokenizer)
    checkpointer = loop.checkpointer_for(config, workdir)
    steps = programs.PhasedStep.single(train_step)
    start = state_lib.start_or_resume(checkpointer, abstract, shardings, init,
                                      jax.random.key(config.seed), batches_from,
                                      steps, mesh, rules, step_args=step_args)
    state, first_step = start.state, start.step
    writer = loop.start_writing(config, workdir, first_step,
                                loop.data_record(train_src, eval_src))
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Generator %s: %.2fM parameters; starting at step %d.", config.model.name,
                 num_params / 1e6, first_step)
    log(f"{config.model.name}: {num_params / 1e6:.2f}M parameters, {data_line}.")

    # ---------------------------------------------------------------- steps
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        eval_step = jax.jit(make_eval_step(model, config.generator))
        decoder = sample_decoder(config, model, frozen_tokenizer, batch_sh, log)
        gfid = make_gfid_eval(config, model, decoder, nets, mesh, batch_sh)

        # ------------------------------------------------------------ evaluation
        def run_eval(state_, step_):
            params = loop.eval_params(state_)
            metrics = {}
            if eval_src is not None:
                metrics.update(evaluate_loss(eval_step, params, eval_batches()))
            with decoding_params(frozen_tokenizer, decoder):
                metrics.update(eval_samples(params, step_))
            writer.write_scalars(step_, {f"eval/{k}": v for k, v in metrics.items()})
            return metrics

        def eval_samples(params, step_):
            metrics = {}
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
            return metrics

        # ------------------------------------------------------------ loop
        result = loop.train_loop(config, workdir, state, first_step, steps, start.batches,
                                 checkpointer, writer, run_eval, start.times,
                                 step_args=step_args,
                                 eval_periods=(config.evaluation.fid_every_steps,))
    writer.close()
    return result


def decoding_params(frozen_tokenizer: Optional[FrozenTokenizer],
                    decoder: Optional[decode.SampleDecoder]):
    """A context in which `decoder` decodes with all the tokenizer's params on the devices:
    with generator.tokenizer_decoder "host", a copy put there for the evaluation and dropped
    after it."""
    if decoder is None or frozen_tokenizer is None or not frozen_tokenizer.keeps_host_params:
        return contextlib.nullcontext()
    return decoder.decoding_with(frozen_tokenizer.on_devices())


def check_gfid_reference(ecfg, nets) -> None:
    """A missing `evaluation.reference` file, or one saved with other feature settings, fails
    at the start of the run instead of at its first gFID evaluation."""
    if ecfg.reference:
        evaluator.check_reference_file(ecfg.reference, ecfg, nets)


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
        # Validation batches no larger than the validation rows (a whole number of batch
        # shards): a validation set smaller than one batch was skipped without a word.
        shards = parallel.batch_shards(batch_sh)
        eval_batch = min(config.eval_batch_size, len(val_codes) // shards * shards)
        if eval_batch == 0:
            logging.warning("The validation loss is left out: %d validation examples do not "
                            "fill one row per batch shard (%d).", len(val_codes), shards)
            val = {}
        else:
            val = evaluate_loss(jax.jit(make_eval_step(model, config.generator)), state.params,
                                token_batches(tokens_lib.ArrayTokenSource(val_codes, val_labels),
                                              eval_batch, -1, batch_sh))
    tail = [float(x) for x in losses[-10:]]
    metrics = {"train_loss": float(np.mean(tail))}
    metrics.update({f"val_{k}": v for k, v in val.items() if k != "num_examples"})
    return model, state.params, metrics
