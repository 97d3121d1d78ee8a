r"""Evaluation jobs: the numbers of the papers' tables, measured by tok1d on accelerators.

    # Tokenizer (config with trainer "tokenizer"): rFID, sFID, IS, precision / recall, PSNR,
    # SSIM, LPIPS, codebook usage / perplexity over data.eval_split (papers: 50k ImageNet val).
    tok1d evaluate --config=configs/titok.py:l32_stage2 --checkpoint=WORKDIR_OR_DIR \
        --out=eval_l32/ --config.evaluation.inception=inception_fid/ \
        --config.data.eval_examples=50000

    # Generator (trainer "generator"): samples evaluation.num_samples images (50 per class),
    # decodes them with --tokenizer (default generator.tokenizer) and computes gFID, IS and
    # precision / recall against evaluation.reference (the ADM reference batch) or the
    # data's eval split.
    tok1d evaluate --config=configs/maskgit_titok.py:l32 --checkpoint=GEN \
        --tokenizer=titok_l32/ --out=eval_gen/ --config.evaluation.inception=inception_fid/ \
        --config.evaluation.reference=VIRTUAL_imagenet256_labeled.npz

    # Samples already written (tok1d.cli.sample's or any ADM-format samples.npz):
    tok1d evaluate --samples=samples.npz --out=eval_samples/ \
        --inception=inception_fid/ --reference=VIRTUAL_imagenet256_labeled.npz

    # Ordered tokens (a 1D tokenizer, e.g. trained with model.nested_dropout): PSNR / SSIM /
    # LPIPS / rFID of the first k tokens for each k, one report with a table and a plot.
    # k counts tokens as num_tokens and encode do (residual VQ: tokens x depth codes, so every
    # k must be a multiple of the depth).
    tok1d evaluate --config=configs/tiny_test.py --checkpoint=WORKDIR --out=eval_k/ \
        --prefixes=1,2,4,8   # or --prefixes=all

    # GigaTok's tokenizer linear probe (lin_probe.py; "not recommended" upstream: it does not
    # follow the AR probe) of the encoder's features, beside the reconstruction metrics:
    tok1d evaluate --config=configs/gigatok.py:b_l --checkpoint=TOK --out=eval_probe/ \
        --config.evaluation.tokenizer_probe=encoder --config.evaluation.linear_probe_epochs=90

    # The reference statistics of a data's eval split (FID, sFID, and the pool features of
    # precision / recall), computed once and written for later --reference=FILE runs; also
    # the features of an ADM reference batch's images, which every run would recompute:
    tok1d evaluate --config=configs/gpt_gigatok.py:b --save_reference=imagenet256_val.npz \
        --config.evaluation.inception=inception_fid --config.data.eval_examples=-1

`--checkpoint` is a training workdir (its latest checkpoint, EMA params when kept) or a
converted pretrained directory, checked against the config's model. Without --config the
defaults of `tok1d.train.config_lib.base_config()` apply; --inception / --reference set
config.evaluation.inception / .reference (with --config, any key: --config.a.b=v).
Writes OUT/metrics.json, OUT/report.md with the PNG grids beside it, and TensorBoard events.
The FID Inception must be converted once: `tok1d convert inception_fid
--checkpoint=pt_inception-2015-12-05-6726825d.pth --out=inception_fid/`.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from tok1d import errors, images, parallel
from tok1d.cli import app
from tok1d.cli import sample as sample_lib
from tok1d.data import feeding, pipeline, sources
from tok1d.data import tokens as tokens_lib
from tok1d.evaluation import evaluator, linear_probe, report
from tok1d.models.generators.gpt import GPT
from tok1d.models.tokenizers import nested
from tok1d.train import config_lib, loop
from tok1d.train import generator as gen_trainer
from tok1d.train import tokenizer as tok_trainer
from tok1d.weights import loaders
from tok1d.generation import common as gen_common
from tok1d.generation import decode as decode_lib
from tok1d.generation.decode import SampleDecoder

USAGE = ("[--config=FILE] --checkpoint=DIR --out=DIR [--tokenizer=DIR] [flags]  |  "
         "--samples=NPZ --out=DIR [flags]  |  [--config=FILE] --save_reference=NPZ [flags]")
CONFIG = ("Training config file (get_config()) or a run's config.json; default: the "
          "--checkpoint run's config.json, else the defaults of "
          "tok1d.train.config_lib.base_config().")
REQUIRED = ()  # --out: every job but --save_reference (checked by `run`)
POSITIONAL = ""


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", "", "Training workdir or pretrained directory.",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "Generator evaluation: the tokenizer decoding the "
                        "samples (default: config.generator.tokenizer).", flag_values=fv)
    flags.DEFINE_string("samples", "", "Evaluate this samples .npz (arr_0 uint8 images).",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory (required except with --save_reference).",
                        flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed (generator evaluation).", flag_values=fv)
    flags.DEFINE_string("inception", "", "Converted FID Inception directory (sets "
                        "config.evaluation.inception).", flag_values=fv)
    flags.DEFINE_string("reference", "", "FID reference .npz (sets "
                        "config.evaluation.reference).", flag_values=fv)
    flags.DEFINE_string("save_reference", "", "Write the FID reference statistics (of "
                        "evaluation.reference's images, else of the data's eval split) to this "
                        ".npz, for --reference later; no --checkpoint or --out.",
                        flag_values=fv)
    flags.DEFINE_string("prefixes", "", "Tokenizer evaluation of the first k tokens for each "
                        "k: 'all' (1, 2, 4, ..., N) or e.g. 1,2,4,8 (a 1D tokenizer; k "
                        "counts codes like num_tokens: residual VQ, multiples of its depth).",
                        flag_values=fv)
    app.define_distributed_flags(fv)


def _setup(config):
    return (*parallel.mesh_from_config(config), jax.process_index() == 0)


def _probe_setting(ecfg) -> str:
    """A report's line on the linear probe's settings (what decides whether two probes'
    accuracies compare)."""
    return (f"{ecfg.linear_probe_epochs} epochs, batch {ecfg.linear_probe_batch_size}, lr "
            f"{ecfg.linear_probe_lr:g}, source {ecfg.get('linear_probe_source', '') or 'default'}"
            f", dropout {'on' if ecfg.get('linear_probe_dropout', True) else 'off'}")


def _details(config, **extra: Any) -> dict[str, Any]:
    ecfg = config.evaluation
    out = dict(extra)
    out.update(inception=ecfg.inception or ("random" if ecfg.allow_random_init else "none"),
               devices=f"{jax.device_count()} x {jax.devices()[0].platform}",
               processes=jax.process_count(), jax=jax.__version__)
    return out


def evaluate_tokenizer(config, checkpoint: str, out: str, log=print,
                       prefixes: Sequence[int] = ()) -> dict[str, Any]:
    """rFID and the reconstruction metrics of a tokenizer over `data.eval_split`; with
    `prefixes`, of the first k tokens for every k of them (`evaluate_prefixes`)."""
    config_lib.validate(config)
    mesh, rules, batch_sh, is_chief = _setup(config)
    precision = config.evaluation.get("tokenizer_precision", "")
    model, = decode_lib.at_precision(precision, tok_trainer.build_model(config))
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    boxed = jax.eval_shape(lambda r: model.init(r, dummy)["params"], jax.random.key(0))
    step = loaders.checkpoint_step(checkpoint)  # (a run still training saves more)
    params = sample_lib.load_checked(config, checkpoint, parallel.unbox_abstract(boxed),
                                     "tokenizer", step)
    # Sharded like in training (fsdp / tensor axes of config.mesh), not replicated.
    params = jax.device_put(params, parallel.logical_shardings(boxed, mesh, rules))
    # before the reconstruction metrics: a failure there would lose them
    probe = _check_tokenizer_probe(config, model, params, mesh, rules, prefixes)
    teacher = tok_trainer.build_teacher(config, model)
    frozen = {"teacher": teacher[1]} if teacher is not None else {}
    nets = evaluator.load_metric_nets(config.evaluation, config.perceptual.weights, log)

    dcfg, batch = config.data, config.eval_batch_size
    src = sources.get_source(dcfg.name, dcfg.eval_split, data_dir=dcfg.data_dir,
                             demo_size=dcfg.demo_size, image_size=size)
    start, stop = parallel.host_batch_slice(batch_sh, batch)
    ds, num_batches = pipeline.eval_dataset(src, global_batch=batch, host_start=start,
                                            host_stop=stop, image_size=size,
                                            num_examples=dcfg.eval_examples,
                                            num_workers=dcfg.num_workers,
                                            resize_on=dcfg.resize_on,
                                            resize_rule=pipeline.resize_rule_of(dcfg))
    log(f"Evaluating {checkpoint} on {dcfg.name}:{dcfg.eval_split} "
        f"({num_batches} batches of {batch}).")
    ecfg = config.evaluation
    if prefixes:
        with decode_lib.matmuls_at(precision):
            return evaluate_prefixes(config, model, params, frozen, teacher, nets, ds,
                                     num_batches, (mesh, rules, batch_sh, is_chief), prefixes,
                                     checkpoint, out, log, step)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), decode_lib.matmuls_at(precision):
        frozen = parallel.replicate(frozen, mesh)
        eval_step = jax.jit(tok_trainer.make_eval_step(
            model, teacher[0] if teacher is not None else None))
        metrics_acc = evaluator.ImageMetrics.from_config(nets, mesh, ecfg)
        metrics, (grid_in, grid_out) = tok_trainer.evaluate(
            eval_step, params, frozen, ds, num_batches, (batch_sh, batch),
            ecfg.num_report_images, metrics_acc, log)
    metrics.update(_tokenizer_probe(config, model, params, mesh, rules, log, probe))
    grid = images.make_grid(images.interleave_pairs(grid_in, grid_out))
    path = report.write_report(
        out, f"Reconstruction: {os.path.basename(os.path.normpath(checkpoint))}", metrics,
        {"reconstructions": grid},
        _details(config, checkpoint=loaders.recorded_path(checkpoint), model=config.model.name,
                 data=f"{dcfg.name}:{dcfg.eval_split} at {size} px (center crops)",
                 tokenizer_precision=_tokenizer_precision(config),
                 **({"tokenizer_probe": f"{ecfg.tokenizer_probe} features on "
                     f"{dcfg.train_split}, {_probe_setting(ecfg)}"} if probe else {})),
        nets.notes, step=step, enabled=is_chief)
    log(f"Wrote {path}: " + ", ".join(f"{k} {report.format_value(v, k)}"
                                      for k, v in metrics.items()))
    return metrics


PREFIX_METRICS = ("psnr", "ssim", "lpips", "rfid")


def _tokenizer_precision(config) -> str:
    """The tokenizer's compute dtype in the evaluate job, for its reports."""
    return config.evaluation.get("tokenizer_precision", "") or config.precision


def parse_prefixes(text: str, num_tokens: int, step: int = 1) -> list[int]:
    """`--prefixes`: "all" (1, 2, 4, ..., N tokens) or comma-separated lengths in 1..N, counted
    like `num_tokens` (codes; residual VQ: `step` = depth codes per token, every k a multiple;
    "all": step x 1, 2, 4, ... latent tokens)."""
    if text == "all":
        return [step * int(k) for k in nested.prefix_choices(num_tokens // step, "pow2")]
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise errors.UserError(f"--prefixes={text!r}: expected 'all' or comma-separated token "
                               "counts, e.g. 1,2,4,8.") from None
    bad = [k for k in ks if not 1 <= k <= num_tokens]
    if bad or not ks:
        raise errors.UserError(f"--prefixes={text!r}: every k must be in 1..{num_tokens} (the "
                               "tokenizer's tokens).")
    if any(k % step for k in ks):
        raise errors.UserError(f"--prefixes={text!r}: every k must be a whole number of tokens, "
                               f"a multiple of {step} (the quantizer's codes per token).")
    return ks


def evaluate_prefixes(config, model, params, frozen, teacher, nets, ds, num_batches, setup,
                      prefixes: Sequence[int], checkpoint: str, out: str, log=print,
                      step: Optional[int] = None) -> dict[str, Any]:
    """Reconstruction quality as a function of the number k of leading tokens decoded (a 1D
    tokenizer; `tok1d.models.tokenizers.nested`): PSNR, SSIM, LPIPS and rFID (those the
    configured metric networks give) per k, in one report with a table, the curves
    (quality_vs_k.png, needs matplotlib) and a grid (inputs, then one row per k)."""
    mesh, rules, batch_sh, is_chief = setup
    nested.require_prefix_support(model, "--prefixes")
    warning = nested.unordered_warning(model, "--prefixes decodes the first k tokens")
    if warning:
        log("Warning: " + warning)
    ecfg, batch = config.evaluation, config.eval_batch_size
    rows, grid_rows = {}, []
    t_model = teacher[0] if teacher is not None else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        frozen = parallel.replicate(frozen, mesh)
        # With the mask vector k is traced (one compilation); without it the decoder reads
        # k tokens (a static slice per k).
        traced = (jax.jit(tok_trainer.make_eval_step(model, t_model))
                  if model.nested_dropout != "none" else None)
        for k in prefixes:  # k codes: the first nested.prefix_tokens latent tokens
            n = nested.prefix_tokens(model, k)
            eval_step = (functools.partial(traced, prefix_length=jnp.int32(n)) if traced
                         else jax.jit(tok_trainer.make_eval_step(model, t_model, prefix=n)))
            metrics_acc = evaluator.ImageMetrics.from_config(nets, mesh, ecfg)
            metrics, (grid_in, grid_out) = tok_trainer.evaluate(
                eval_step, params, frozen, ds, num_batches, (batch_sh, batch),
                ecfg.num_report_images, metrics_acc)
            rows[k] = {m: metrics[m] for m in PREFIX_METRICS if m in metrics}
            grid_rows = grid_rows or [grid_in]
            grid_rows.append(grid_out)
            log(f"k={k}: " + ", ".join(f"{m} {report.format_value(v, m)}"
                                       for m, v in rows[k].items()))
    name = os.path.basename(os.path.normpath(checkpoint))
    grids = {"prefix_reconstructions": images.make_grid(grid_rows)}
    plot = report.plot_curves("k (tokens decoded)", rows, f"{name}: quality vs k")
    notes = list(nets.notes)
    if plot is None:
        notes.append("quality_vs_k.png needs matplotlib (pip install matplotlib).")
    else:
        grids["quality_vs_k"] = plot
    metrics = {f"{m}_k{k}": v for k, r in rows.items() for m, v in r.items()}
    path = report.write_report(
        out, f"Reconstruction vs number of tokens: {name}", metrics, grids,
        _details(config, checkpoint=loaders.recorded_path(checkpoint), model=config.model.name,
                 prefixes=",".join(map(str, prefixes)),
                 data=f"{config.data.name}:{config.data.eval_split} at "
                      f"{config.data.image_size} px (center crops)",
                 tokenizer_precision=_tokenizer_precision(config)),
        notes, step=step, enabled=is_chief,
        sections=["## Quality vs k (first k tokens decoded)",
                  report.curve_table("k", rows),
                  "prefix_reconstructions.png: the inputs, then one row per k."])
    log(f"Wrote {path}")
    return metrics


def evaluate_generator(config, checkpoint: str, tokenizer_path: str, out: str, seed: int = 0,
                       log=print) -> dict[str, Any]:
    """gFID / IS / precision-recall of `evaluation.num_samples` samples of a generator."""
    config_lib.validate(config)
    tokenizer_path = sample_lib.tokenizer_of(config, checkpoint, tokenizer_path, log)
    _check_linear_probe(config)  # before sampling: its failure would lose the gFID
    if config.evaluation.linear_probe_epochs <= 0:  # else nothing to measure
        evaluator.require_inception(config.evaluation, "Generator evaluation")
    nets = evaluator.load_metric_nets(config.evaluation, "", log, lpips=False)
    mesh, rules, batch_sh, is_chief = _setup(config)
    step = loaders.checkpoint_step(checkpoint)  # (a run still training saves more)
    model, params = sample_lib.load_generator(config, checkpoint, step)
    tokenizer, tok_params = loaders.load_tokenizer(tokenizer_path)
    gen_trainer.check_tokens_tokenizer(config, tok_params, tokenizer_path, log)
    probe_images = _probe_images(config, model, tokenizer, tok_params)  # before sampling too
    _probe_options(config, model, mesh, rules, probe_images)
    ecfg = config.evaluation
    labels = gen_common.cyclic_labels(ecfg.num_samples, model.num_classes)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.device_put(params, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))
        decoder = SampleDecoder(model, config.sampling.to_dict(), tokenizer, tok_params,
                                batch_sh, config.sampling_precision, log)
        reference = evaluator.load_reference(ecfg, config.data, nets, mesh, batch_sh,
                                             config.eval_batch_size, log)
        batches = decoder.batches(params, labels, config.eval_batch_size, seed, log)
        metrics, kept = evaluator.generation_metrics(nets, mesh, reference, batches, ecfg,
                                                     keep=_grid_rows(ecfg, labels))
    kept_labels = labels[_grid_rows(ecfg, labels)]
    metrics.update(_linear_probe(config, model, params, tokenizer, tok_params, mesh, rules,
                                 log, probe_images))
    return _finish_samples(config, metrics, kept, kept_labels, model.num_classes, out, is_chief,
                           nets.notes + reference.notes(ecfg, nets), log, step,
                           checkpoint=loaders.recorded_path(checkpoint),
                           tokenizer=loaders.recorded_path(tokenizer_path), model=config.model.name,
                           sampling=config.sampling.to_dict(),
                           sampling_precision=config.sampling_precision, seed=seed,
                           reference=_reference_line(reference))


def linear_probe_source(config) -> str:
    """What the linear probe reads: evaluation.linear_probe_source, or when it is empty
    "tokens" if generator.tokens is set, else "images"."""
    return config.evaluation.linear_probe_source or (
        "tokens" if config.generator.get("tokens") else "images")


def _check_linear_probe(config) -> None:
    """A ValueError when evaluation.linear_probe_epochs > 0 cannot run: the probe needs a GPT,
    and the token dataset or the image splits it reads."""
    if config.evaluation.linear_probe_epochs <= 0:
        return
    if config.model.name != "gpt":
        raise ValueError("evaluation.linear_probe_epochs > 0 needs a GPT generator (GigaTok's "
                         f"linear probe of AR features), not {config.model.name!r}.")
    if linear_probe_source(config) == "tokens":
        if not config.generator.tokens:
            raise ValueError(
                "evaluation.linear_probe_source='tokens' reads its codes from a token dataset: "
                "set generator.tokens (the train and eval splits written by tok1d tokenize), "
                "or probe on images (evaluation.linear_probe_source=images).")
        return
    for split in (config.data.train_split, config.data.eval_split):  # opens them: fails early
        sources.source_of(config.data, split)


def _probe_images(config, model, tokenizer, tok_params) -> Optional[tuple[Any, Any]]:
    """(train, eval) image sources of the linear probe when it runs on images, after checking
    that the tokenizer's codes of `data.image_size` images fit the GPT (a ConfigError
    otherwise); None when it does not."""
    ecfg = config.evaluation
    if ecfg.linear_probe_epochs <= 0 or linear_probe_source(config) != "images":
        return None
    _check_linear_probe(config)
    dcfg = config.data
    train_src = sources.source_of(dcfg, dcfg.train_split)
    info = gen_trainer.tokenizer_info(tokenizer, tok_params, config.generator.prefix_tokens,
                                      dcfg.image_size, getattr(train_src, "num_classes", None))
    gen_trainer.check_tokens_match(model, info)
    return train_src, sources.source_of(dcfg, dcfg.eval_split)


def _probe_options(config, model, mesh, rules, images: Optional[tuple[Any, Any]]
                   ) -> Optional[dict[str, Any]]:
    """The probe's options (`linear_probe.probe_options`: a ValueError for a batch the mesh
    cannot split), or None when no probe runs."""
    ecfg = config.evaluation
    if ecfg.linear_probe_epochs <= 0 or not isinstance(model, GPT):
        return None
    if images is not None:  # trained online: batches sharded over the mesh
        return linear_probe.probe_options(ecfg, len(images[0]), config.seed,
                                          linear_probe.batch_shards(mesh, rules))
    n = len(tokens_lib.TokenSource(config.generator.tokens, config.data.train_split))
    return linear_probe.probe_options(ecfg, n, config.seed,
                                      linear_probe.code_probe_shards(ecfg, model, mesh, rules))


def _linear_probe(config, model, params, tokenizer, tok_params, mesh, rules, log,
                  images: Optional[tuple[Any, Any]] = None) -> dict[str, float]:
    """GigaTok's linear probe of a GPT's features (train -> eval split) when
    evaluation.linear_probe_epochs > 0: on the codes of generator.tokens, or on `data`'s
    images encoded by the tokenizer in every step (`linear_probe_source`; `images`: their
    sources from `_probe_images`, read here when not given)."""
    ecfg = config.evaluation
    if ecfg.linear_probe_epochs <= 0:
        return {}
    _check_linear_probe(config)
    if not isinstance(model, GPT):
        raise ValueError("evaluation.linear_probe_epochs > 0 needs a GPT generator (GigaTok's "
                         f"linear probe of AR features), not {config.model.name!r}.")
    if linear_probe_source(config) == "tokens":
        read = lambda split, plain=False: linear_probe.read_token_split(  # noqa: E731
            tokens_lib.TokenSource(config.generator.tokens, split), plain_only=plain)
        return linear_probe.probe_from_config(model, params, read(config.data.train_split),
                                              read(config.data.eval_split, True), ecfg, mesh,
                                              rules, seed=config.seed, log_fn=log)
    train_src, eval_src = images or _probe_images(config, model, tokenizer, tok_params)
    options = _probe_options(config, model, mesh, rules, (train_src, eval_src))
    train, val = _probe_image_batches(config, train_src, eval_src, options["batch_size"],
                                      mesh, rules)
    tok_params = gen_trainer.place_tokenizer(tokenizer, tok_params, config.data.image_size,
                                             mesh, rules)
    out = linear_probe.run_linear_probe_on_images(
        model, params, tokenizer, tok_params, train, len(train_src), val,
        prefix_tokens=config.generator.prefix_tokens, dropout=ecfg.linear_probe_dropout,
        mesh=mesh, rules=rules, log_fn=log, **options)
    return linear_probe.probe_metrics(out)


def _check_tokenizer_probe(config, model, params, mesh, rules, prefixes: Sequence[int] = ()
                           ) -> Optional[tuple[Any, Any, dict[str, Any]]]:
    """(train and eval image sources, probe options) of GigaTok's tokenizer linear probe when
    evaluation.tokenizer_probe names a tap, after checking that it can run: epochs set, no
    --prefixes, the tap traced on the model, labelled splits, a batch the mesh splits
    (ValueErrors); else None."""
    ecfg, dcfg = config.evaluation, config.data
    tap = ecfg.get("tokenizer_probe", "")
    if not tap:
        return None
    size = dcfg.image_size  # the tap first: a mistyped one is the problem to name
    jax.eval_shape(lambda p: linear_probe.tokenizer_feature_fn(model, tap)(
        p, None, {"image": jnp.zeros((1, size, size, 3))}, None), params)
    if ecfg.linear_probe_epochs <= 0:
        raise ValueError(f"evaluation.tokenizer_probe={tap!r} trains its probe for "
                         "evaluation.linear_probe_epochs epochs: set them (GigaTok: 90).")
    if prefixes:
        raise ValueError("evaluation.tokenizer_probe runs without --prefixes (it probes the "
                         "whole tokenizer's features).")
    train_src = sources.source_of(dcfg, dcfg.train_split)
    if getattr(train_src, "num_classes", None) is None:
        raise ValueError(f"The tokenizer linear probe needs class labels; {dcfg.name}:"
                         f"{dcfg.train_split} has none.")
    options = linear_probe.probe_options(ecfg, len(train_src), config.seed,
                                         linear_probe.batch_shards(mesh, rules))
    return train_src, sources.source_of(dcfg, dcfg.eval_split), options


def _tokenizer_probe(config, model, params, mesh, rules, log,
                     probe: Optional[tuple[Any, Any, dict[str, Any]]]) -> dict[str, float]:
    """GigaTok's tokenizer linear probe (`linear_probe.run_tokenizer_linear_probe`) of the
    evaluation.tokenizer_probe tap, train -> eval split, when `probe` (from
    `_check_tokenizer_probe`) is given: {"tokenizer_probe_accuracy",
    "tokenizer_probe_train_accuracy"}. The tokenizer computes in float32 here (upstream's
    default --mixed-precision none), whatever the run's compute dtype."""
    if probe is None:
        return {}
    train_src, eval_src, options = probe
    ecfg = config.evaluation
    model, = decode_lib.at_precision("float32", model)
    train, val = _probe_image_batches(config, train_src, eval_src, options["batch_size"],
                                      mesh, rules)
    with decode_lib.matmuls_at("float32"):
        out = linear_probe.run_tokenizer_linear_probe(
            model, params, train, len(train_src), val, train_src.num_classes,
            tap=ecfg.tokenizer_probe, mesh=mesh, rules=rules, log_fn=log, **options)
    return {"tokenizer_probe_accuracy": float(out["val_accuracy"]),
            "tokenizer_probe_train_accuracy": float(out["train_accuracy"])}


def _probe_image_batches(config, train_src, eval_src, batch: int, mesh, rules):
    """The linear probes' global image batches: the recipe's training augmentation (GigaTok:
    ADM random crop + flip, a fresh draw every epoch) over `train_src`, endless, and the
    whole `eval_src` once (center crops, masked padding)."""
    dcfg = config.data
    batch_sh = parallel.batch_sharding(mesh, rules)
    start, stop = parallel.host_batch_slice(batch_sh, batch)
    train = feeding.Feeder(iter(pipeline.recipe_train_dataset(
        train_src, dcfg, global_batch=batch, host_start=start, host_stop=stop,
        seed=config.seed)), batch_sh, batch)
    val_ds, _ = pipeline.recipe_eval_dataset(eval_src, dcfg, global_batch=batch,
                                             host_start=start, host_stop=stop, num_examples=-1)
    return train, feeding.Feeder(iter(val_ds), batch_sh, batch)


def evaluate_samples(config, samples: str, out: str, log=print) -> dict[str, Any]:
    """gFID / IS / precision-recall of the images in a samples .npz."""
    mesh, _, batch_sh, is_chief = _setup(config)
    images = evaluator.load_npz_images(samples)
    with np.load(samples) as z:
        labels = z["arr_1"] if "arr_1" in z.files else np.zeros(len(images), np.int32)
    evaluator.require_inception(config.evaluation, "--samples")  # every metric needs it
    nets = evaluator.load_metric_nets(config.evaluation, "", log, lpips=False)
    ecfg = config.evaluation
    num_classes = int(labels.max()) + 1 if len(labels) else 1
    with jax.set_mesh(mesh):
        reference = evaluator.load_reference(ecfg, config.data, nets, mesh, batch_sh,
                                             config.eval_batch_size, log)
        batches = evaluator.numpy_batches(images, config.eval_batch_size, batch_sh)
        metrics, kept = evaluator.generation_metrics(nets, mesh, reference, batches, ecfg,
                                                     keep=_grid_rows(ecfg, labels))
    kept_labels = labels[_grid_rows(ecfg, labels)]
    return _finish_samples(config, metrics, kept, kept_labels, num_classes, out, is_chief,
                           nets.notes + reference.notes(ecfg, nets), log, None,
                           samples=os.path.abspath(samples), reference=_reference_line(reference))


def save_reference(config, path: str, log=print) -> evaluator.Reference:
    """The FID reference of `evaluation.reference` (its images' features added) or of the
    data's eval split, written to `path` (`evaluator.Reference.save`)."""
    _check_reference_path(path)
    mesh, _, batch_sh, is_chief = _setup(config)
    evaluator.require_inception(config.evaluation, "--save_reference")
    nets = evaluator.load_metric_nets(config.evaluation, "", log, lpips=False)
    with jax.set_mesh(mesh):
        reference = evaluator.load_reference(config.evaluation, config.data, nets, mesh,
                                             batch_sh, config.eval_batch_size, log)
    if not is_chief:
        return reference
    reference.save(path, config.evaluation, nets)
    parts = [f"FID statistics ({len(reference.mu)} features)"]
    if reference.spatial is not None:
        parts.append(f"sFID statistics ({len(reference.spatial[0])} features)")
    if reference.features is not None:
        parts.append("precision / recall features")
    count = f", {reference.count} images" if reference.count else ""
    log(f"Wrote {path} ({reference.source}{count}): {', '.join(parts)}.")
    return reference


def _check_reference_path(path: str) -> None:
    """One error, before any work, for a --save_reference the job could not or should not
    write: not a .npz, an existing file (kept: remove it first), a missing or unwritable
    folder."""
    errors.check_local(path, "--save_reference")
    if not path.endswith(".npz"):
        raise errors.UserError(f"--save_reference={path}: the name must end in .npz.")
    if os.path.exists(path):
        raise errors.UserError(f"--save_reference={path} exists; remove it or choose another "
                               "name (it is not overwritten).")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise errors.UserError(f"--save_reference={path}: {folder} is not a writable folder.")


def _reference_line(reference: evaluator.Reference) -> str:
    """The report's "reference" detail: its source, and how many images when known."""
    return reference.source + (f" ({reference.count} images)" if reference.count else "")


def _grid_rows(ecfg, labels):
    """Which samples the report's grid shows: the first 10 of each of the first classes
    (evaluation.num_report_images // 10 classes, one row each)."""
    rows = max(1, ecfg.num_report_images // 10)
    keep = np.zeros(len(labels), bool)
    for c in range(rows):
        keep[np.flatnonzero(labels == c)[:10]] = True
    return keep


def _finish_samples(config, metrics, kept, labels, num_classes: int, out: str, is_chief: bool,
                    notes, log, step: Optional[int], **details) -> dict[str, Any]:
    rows = min(num_classes, max(1, config.evaluation.num_report_images // 10))
    grid = sample_lib.class_grid(kept, labels, rows)
    if "linear_probe_accuracy" in metrics:
        details["linear_probe"] = _probe_setting(config.evaluation)
    path = report.write_report(out, "Generation", metrics, {"samples": grid},
                               _details(config, **details), notes, step=step,
                               enabled=is_chief)
    log(f"Wrote {path}: " + ", ".join(f"{k} {report.format_value(v, k)}"
                                      for k, v in metrics.items()))
    return metrics


def run(config, checkpoint: str = "", tokenizer: str = "", samples: str = "", out: str = "",
        seed: Optional[int] = None, log=print, prefixes: str = "",
        reference_out: str = "") -> Any:
    """`tok1d evaluate` (module docstring); `seed`: the generator's sampling seed (None: not
    given, 0), refused by the other evaluations, which draw nothing."""
    if reference_out:
        if checkpoint or samples or out or prefixes or tokenizer or seed is not None:
            raise errors.UserError("--save_reference is a job of its own: give it without "
                                   "--checkpoint, --samples, --out, --prefixes, --tokenizer "
                                   "or --seed.")
        return save_reference(config, reference_out, log)
    if not out:
        raise errors.UserError("--out is required (see tok1d evaluate --help).")
    if samples and checkpoint:
        raise errors.UserError("Give --checkpoint (a model to evaluate) or --samples (images "
                               "to evaluate), not both.")
    if not samples and not checkpoint:
        raise ValueError("Give --checkpoint (a workdir or pretrained directory) or --samples.")
    # Flags that do not apply to this evaluation are refused, not dropped.
    kind = "samples" if samples else config.trainer
    if prefixes and kind != "tokenizer":
        raise errors.UserError("--prefixes evaluates a tokenizer's prefixes (a --checkpoint "
                               "with a config of trainer 'tokenizer'), not "
                               + ("--samples." if samples else f"a {kind} config."))
    if tokenizer and kind != "generator":
        raise errors.UserError("--tokenizer decodes a generator's samples (a --checkpoint with a "
                               "config of trainer 'generator'); "
                               + ("--samples are images already." if samples else
                                  "a tokenizer evaluation decodes with --checkpoint itself."))
    if seed is not None and kind != "generator":
        raise errors.UserError("--seed is a generator's sampling seed; "
                               + ("--samples are images already." if samples else
                                  f"a {kind} evaluation draws nothing."))
    ks = ()
    if kind == "tokenizer" and prefixes:
        model = tok_trainer.build_model(config)
        nested.require_prefix_support(model, "--prefixes")
        ks = parse_prefixes(prefixes, model.num_tokens, model.codes_per_token)
    if kind in ("samples", "generator", "tokenizer"):
        report.refuse_earlier_results(out)  # an earlier evaluation's results: kept
    if samples:
        return evaluate_samples(config, samples, out, log)
    if kind == "generator":
        return evaluate_generator(config, checkpoint, tokenizer, out, seed or 0, log)
    if kind == "tokenizer":
        return evaluate_tokenizer(config, checkpoint, out, log, ks)
    raise ValueError(f"Cannot evaluate a config with trainer {config.trainer!r}: use a tokenizer "
                     "or generator config.")


def execute(fv: flags.FlagValues, args: list[str]) -> None:
    del args
    errors.check_output_dir(fv.out, "--out")
    app.setup_process(fv, paths=("checkpoint", "samples", "tokenizer" if fv.tokenizer
                                 else "config.generator.tokenizer"))
    config = fv.config if fv.config is not None else config_lib.base_config()
    with config.unlocked():
        for key in ("inception", "reference"):
            if fv[key].value:
                config.evaluation[key] = fv[key].value
    run(config, fv.checkpoint, fv.tokenizer, fv.samples, fv.out or "",
        fv.seed if fv["seed"].present else None,
        log=loop.log_fn(), prefixes=fv.prefixes, reference_out=fv.save_reference)  # (process 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return app.run(sys.modules[__name__], argv)


if __name__ == "__main__":
    app.exit_process(main())
