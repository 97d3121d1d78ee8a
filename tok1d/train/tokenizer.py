"""Tokenizer trainer: any tokenizer (`tok1d.models.interfaces.Tokenizer`) under the registered
loss terms of `config.losses` (`tok1d.objectives.terms`), with the GAN objective
(`tok1d.objectives.adversarial`) when `losses.gan` > 0.

`train_and_evaluate(config, workdir)` is importable (tests, Colab); `python -m tok1d.main`
calls it when `config.trainer == "tokenizer"`. Sections: frozen networks and discriminator,
steps, evaluation, setup (`build_training`), the run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tok1d import images, models, parallel, summary
from tok1d.data import feeding, pipeline, sources
from tok1d.evaluation import codebook as codebook_lib
from tok1d.evaluation import evaluator
from tok1d.evaluation.image_metrics import psnr
from tok1d.models import dino_disc, interfaces, presets, quantizers
from tok1d.models import discriminator as disc_lib
from tok1d.objectives import adversarial
from tok1d.objectives import draws as draws_lib
from tok1d.objectives import perceptual as perceptual_lib
from tok1d.objectives import terms as terms_lib
from tok1d.objectives import tokenizer_loss
from tok1d.train import config_lib, loop, optim, programs
from tok1d.train import state as state_lib
from tok1d.train import step as step_lib
from tok1d.train.state import TrainState
from tok1d.weights import layout, loaders


def build_model(config) -> nn.Module:
    return models.create(config.model.name, **layout.model_kwargs(config))


# -------------------------------------------------------------------- frozen helper networks

def build_teacher(config, student: Optional[nn.Module] = None) -> Optional[tuple[nn.Module, Any]]:
    """The frozen teacher as (model, params), or None:
      maskgit_vqgan  TiTok stage 1's proxy-code teacher (run in float32);
      dinov2         GigaTok's semantic-regularisation target, with its position table
                     resampled to the student's decoder grid (16x16 for 256 px, i.e. 224 px
                     teacher inputs) as the official code does; run at the compute precision
                     (the official code uses fp16 autocast)."""
    tcfg = config.teacher
    if not tcfg.name:
        return None
    if tcfg.name not in loaders.TEACHERS:
        raise config_lib.ConfigError(f"teacher.name={tcfg.name!r}: expected 'maskgit_vqgan' or "
                                     "'dinov2'.")
    if not (tcfg.weights or tcfg.allow_random_init):
        raise config_lib.ConfigError(_MISSING_TEACHER[tcfg.name])
    grid = student.semantic_grid if isinstance(student, interfaces.SemanticTokenizer) else None
    return loaders.load_teacher(tcfg.name, tcfg.weights, tcfg.model, precision=config.precision,
                                grid=grid,
                                image_size=config.data.image_size, seed=config.seed + 17)


_MISSING_TEACHER = {
    "dinov2": (
        "teacher.weights is empty: the semantic loss needs the frozen DINOv2 ViT-B/14. "
        "Pass the released name: --config.teacher.weights=dinov2_vitb14 (downloaded once), or "
        "download dinov2_vitb14_pretrain.pth (facebookresearch/dinov2) and pass it as "
        "--config.teacher.weights=PATH (or convert it once: tok1d convert dinov2 "
        "--checkpoint=dinov2_vitb14_pretrain.pth --out=DIR --pos_grid=16)."),
    "maskgit_vqgan": (
        "teacher.weights is empty: stage 1 needs the frozen MaskGIT-VQGAN. Pass the released "
        "name: --config.teacher.weights=maskgit_vqgan (downloaded and converted once), or "
        "download "
        "maskgit-vqgan-imagenet-f16-256.bin (HF fun-research/TiTok) and pass it as "
        "--config.teacher.weights=PATH (or convert it once: tok1d convert maskgit_vqgan "
        "--checkpoint=maskgit-vqgan-imagenet-f16-256.bin --out=DIR)."),
}


def build_frozen(config, model: nn.Module) -> tuple[terms_lib.FrozenNets, dict[str, Any]]:
    """(nets, frozen): the frozen networks the loss terms need and their params as one host
    tree {"teacher": ..., "perceptual": ...} (passed to the step, never optimized). The
    perceptual net computes at `loss_precision`; the teacher at its own `teacher.model` dtype
    (`build_teacher`)."""
    frozen = {}
    teacher = build_teacher(config, model)
    if teacher is not None:
        frozen["teacher"] = teacher[1]
    perceptual = None
    if config.losses.perceptual:
        perceptual = perceptual_lib.make_perceptual(
            config.perceptual.kind, loaders.load_perceptual(
                perceptual_lib.parse_kind(config.perceptual.kind), config.perceptual.weights,
                allow_random_init=config.perceptual.allow_random_init,
                lpips_channels=config.perceptual.lpips_channels),
            dtype=models.dtype_from_name(config.loss_precision),
            image_size=config.perceptual.image_size,
            lpips_dropout=config.perceptual.get("lpips_dropout", 0.0))
        frozen["perceptual"] = perceptual.params
    nets = terms_lib.FrozenNets(teacher=teacher[0] if teacher is not None else None,
                                teacher_name=config.teacher.name, perceptual=perceptual)
    return nets, frozen


def build_discriminator(config) -> Optional[nn.Module]:
    """The discriminator module named by `discriminator.name` (None without a GAN term):
    "titok" (NLayer + BlurPool), "patchgan" (LlamaGen / GigaTok) or "dino" (GigaTok's DINO-v1
    ViT-S/16 trunk + spectral-norm heads; its trunk weights come from `discriminator.weights`,
    see `load_disc_trunk`), computing at `loss_precision` unless its `model` names a dtype."""
    if not config.losses.gan:
        return None
    classes = {"titok": disc_lib.TiTokDiscriminator, "patchgan": disc_lib.PatchGANDiscriminator,
               "dino": dino_disc.DinoDiscriminator}
    name = config.discriminator.name
    if name not in classes:
        raise config_lib.ConfigError(f"discriminator.name={name!r}; expected one of "
                                     f"{sorted(classes)}.")
    kwargs = dict(config.discriminator.model)
    presets.check_kwargs(classes[name], kwargs, f"discriminator {name!r}")
    kwargs["dtype"] = models.dtype_from_name(kwargs.get("dtype", config.loss_precision))
    return classes[name](**kwargs)


def load_disc_trunk(config, disc: nn.Module) -> Optional[dict[str, Any]]:
    """Converted frozen trunk params of the DINO discriminator (None for the others)."""
    dcfg = config.discriminator
    if loaders.disc_needs_trunk(disc) and not (dcfg.weights or dcfg.allow_random_init):
        raise config_lib.ConfigError(
            "discriminator.weights is empty: the DINO discriminator needs the frozen DINO "
            "ViT-S/16 trunk: pass the released name --config.discriminator.weights=dino_vits16 "
            "(downloaded once), or download dino_deitsmall16_pretrain.pth "
            "(facebookresearch/dino) and pass it as --config.discriminator.weights=PATH.")
    return loaders.load_disc_trunk(dcfg.weights, disc)


def load_initial_weights(config, state: TrainState, log) -> TrainState:
    """Overwrites freshly initialised params with `config.init` weights (path + shape match)."""
    loaded = loaders.load_initial_params(state.params, config.init.checkpoint,
                                         config.init.pixel_decoder, log)
    if not loaded:
        return state
    flat = flax.traverse_util.flatten_dict(state.params)
    for k, value in loaded.items():
        flat[k] = parallel.put_like(value, flat[k])
    params = flax.traverse_util.unflatten_dict(flat)
    # The EMA must not share buffers with params: the train step donates both.
    ema = (jax.jit(lambda t: jax.tree.map(jnp.copy, t))(params)
           if state.ema_params is not None else None)
    return state.replace(params=params, ema_params=ema)


# -------------------------------------------------------------------- steps


@dataclasses.dataclass(frozen=True)
class Phase:
    """The switches a step compiled for one phase fixes: the warm-up terms (`losses.fea_rec`,
    `losses.shortcut`, while step < `aux_loss_end_step`) and the GAN (from
    `discriminator.start_step`). `has_warmup` / `has_gan`: whether the run has them at all
    (what the phase's description names)."""
    warmup: bool
    gan: bool
    has_warmup: bool = True
    has_gan: bool = True

    def __str__(self) -> str:
        parts = ([f"warm-up terms {'on' if self.warmup else 'off'}"] if self.has_warmup else []
                 ) + ([f"discriminator {'on' if self.gan else 'off'}"] if self.has_gan else [])
        return ", ".join(parts) or "no warm-up terms, no discriminator"


def phase_schedule(config) -> tuple[Callable[[int], Phase], tuple[int, ...]]:
    """(phase_at(step) -> Phase, the steps where it may change) of a tokenizer config."""
    has_warmup = bool(terms_lib.warmup_terms(config.losses))
    aux_end = config.aux_loss_end_step if has_warmup else 0
    start = config.discriminator.start_step if config.losses.gan else None

    def phase_at(step: int) -> Phase:
        return Phase(warmup=step < aux_end, gan=start is not None and step >= start,
                     has_warmup=has_warmup, has_gan=start is not None)

    return phase_at, tuple(b for b in (aux_end, start) if b)


def make_train_step(model: nn.Module, tx, schedule, config,
                    nets: terms_lib.FrozenNets = terms_lib.FrozenNets(),
                    gan: Optional[adversarial.GANObjective] = None,
                    phase: Optional[Phase] = None):
    """(state, batch, frozen) -> (state, scalars, finite): the tokenizer objective
    (`tok1d.objectives.tokenizer_loss`) and its gradients, accumulated over
    `optim.grad_accum_steps` microbatches together with the GAN objective's discriminator loss
    on the same, detached outputs; then the update core (`tok1d.train.step.apply_gradients`:
    global norm, clipping, AdamW, EMA), the discriminator's update (`GANObjective.update`) and
    the non-finite guard.

    `frozen` holds the params of the frozen networks `nets` (teacher, perceptual), which
    therefore get no gradient and no optimizer state. `batch["draws"]` (optional) carries
    recorded random draws by name (`tok1d.objectives.draws`; not with grad_accum_steps > 1):
    the objective's (see `tokenizer_loss`) and the discriminator calls' DiffAugment uniforms
    "diffaug/<call>/{flags,rand01}" (`adversarial.DISC_CALLS`).

    Every D call of the step (the generator's included) advances the discriminator's non-param
    collections (BatchNorm running stats, spectral-norm vectors). A phase step before D's start
    calls no D (as upstream, which skips D's step and logs its generator term as 0): the D
    scalars and loss_gan log 0. Discriminator scalars: d_loss
    (what D minimises), d_adv_loss (d_weight * D-loss on x_hat), d_shortcut_adv_loss /
    d_direct_logits_fake (the direct call's weighted D-loss and mean logit), d_grad_norm (before
    clipping), d_lr (the LR of its update; 0 when D is not trained).

    `phase` (a `Phase`): a step for the steps of that phase only (`phase_schedule`), the
    switches fixed while tracing, so what is off is not in the program; None: one step for
    every step, the switches traced from the step count. Both compute the same values."""
    loss_fn = tokenizer_loss.make_loss_fn(model, config.losses, nets, gan)
    g_grad = jax.value_and_grad(optim.frozen_as_constants(loss_fn, config.optim), has_aux=True)
    accum = config.optim.grad_accum_steps
    aux_end = config.aux_loss_end_step
    to_model, to_unit = images.range_converters(model.pixel_range)
    base_rng = jax.random.key(config.seed + 1)
    levels = model.codes_per_token  # residual VQ: per-level code statistics

    def micro_step(state, carry, images_, rng, frozen, flags, draws):
        """One microbatch: the objective and its grads, then the discriminator's loss and grads
        on the detached outputs. `carry`: (the discriminator's collections, None or the
        clustering VQ's (usage EMA, re-anchored codebooks) so far, None or the LeCam EMAs so
        far). Returns (summable results, the advanced carry)."""
        active, aux_on = flags
        collections, quantizer, lecam = carry
        g_rng, d_rng = jax.random.split(rng)
        gan_state = state.extras["gan"] if gan is not None else None
        params, q_state = state.params, None
        if quantizer is not None:  # as upstream, each forward sees the codes the last re-anchored
            q_state, codebooks = quantizer
            params = quantizers.merge_param_updates(params, codebooks)
        (loss, (terms, extras, outs, collections)), grads = g_grad(
            params, images_, frozen, gan_state, collections, active, aux_on, g_rng, draws,
            q_state)
        if model.outputs_pixels:
            extras["psnr"] = jnp.mean(psnr(to_unit(outs["pixels"]), images_))
        if model.num_codes:
            hist = codebook_lib.code_histogram(outs["codes"], model.num_codes, levels=levels)
            extras["batch_perplexity"] = codebook_lib.perplexity(hist)
        result = dict(loss=loss, terms=terms, extras=extras, grads=grads)
        if quantizer is not None:  # (a frozen quantizer, in eval mode, re-anchors nothing)
            quantizer = (outs["quantizer_state"],
                         quantizers.merge_param_updates(quantizer[1], outs["param_updates"]))
        if gan is not None:
            direct = outs.get("shortcut_pixels")
            if direct is not None and gan.direct_fake == "reconstruction":
                direct = outs["pixels"]
            # as upstream under accelerator.accumulate, each microbatch's D loss sees the LeCam
            # EMAs the previous one advanced
            d_state = gan_state.replace(lecam=lecam)
            (dl, (means, collections)), dg = gan.d_loss_and_grads(
                d_state, collections, to_model(images_), jax.lax.stop_gradient(outs["pixels"]),
                d_rng, None if direct is None else jax.lax.stop_gradient(direct),
                active * aux_on, draws, active, state.step)
            lecam = gan.advance_lecam(lecam, means, state.step, active * aux_on)
            result.update(d_loss=dl, d_means=means, d_grads=dg)
        return result, (collections, quantizer, lecam)

    stateful = issubclass(quantizers.QUANTIZERS.get(getattr(model, "quantizer", ""), object),
                          quantizers.ClusteringVectorQuantizer)

    def train_step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(base_rng, state.step)
        if phase is not None:  # Python numbers: the switches are fixed while tracing
            active, aux_on = float(phase.gan and gan is not None), float(phase.warmup)
        else:
            active = gan.active(state.step) if gan is not None else jnp.float32(0)
            aux_on = (state.step < aux_end).astype(jnp.float32)
        draws = draws_lib.of_batch(batch)
        if draws and accum > 1:
            raise ValueError("batch['draws'] (recorded random draws) needs grad_accum_steps=1.")
        collections = state.extras["gan"].collections if gan is not None else None
        q_state = (state.extras or {}).get("quantizer")
        if q_state is None and stateful:
            raise ValueError(  # (it trained on as a plain VQ: no re-anchoring, no word)
                f"{model.quantizer} trains with its codes' usage EMA, the "
                f"{quantizers.STATE!r} collection of model.init: keep it in "
                "state.extras['quantizer'] (as build_training's QuantizerState does).")
        quantizer = (None if q_state is None else
                     (q_state, quantizers.codebooks_of(state.params, q_state)))
        lecam = state.extras["gan"].lecam if gan is not None else None
        r, (collections, quantizer, lecam) = step_lib.accumulate(
            lambda c, b, k: micro_step(state, c, b["image"], k, frozen, (active, aux_on), draws),
            (collections, quantizer, lecam), {"image": batch["image"]}, rng, accum)
        loss = r["loss"]
        old = state  # what a non-finite step falls back to (before any re-anchoring)
        if quantizer is not None:  # clustering VQ: re-anchored codes, then the optimizer step
            state = state.replace(params=quantizers.merge_param_updates(state.params, quantizer[1]),
                                  extras={**state.extras, "quantizer": quantizer[0]})
        new, grad_norm, finite = step_lib.apply_gradients(
            state, r["grads"], tx, ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)
        finite = finite & jnp.isfinite(loss)
        scalars = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), **r["extras"],
                       **{f"loss_{k}": v for k, v in r["terms"].items()})
        if loss_fn.warmup_terms:
            scalars["warmup_losses_active"] = jnp.float32(aux_on)
        if gan is not None:
            gan_state, d_scalars = gan.update(state.extras["gan"], r["d_grads"], r["d_means"],
                                              collections, active, lecam)
            new = new.replace(extras={**new.extras, "gan": gan_state})
            finite = finite & jnp.isfinite(r["d_loss"])
            scalars.update(d_loss=r["d_loss"], gan_active=jnp.float32(active), **d_scalars,
                           **{f"d_{k}": v for k, v in r["d_means"].items()})
        return step_lib.keep_if_finite(finite, new, old), scalars, finite

    return train_step


def make_eval_step(model: nn.Module, teacher: Optional[nn.Module] = None,
                   prefix: Optional[int] = None):
    """(params, batch, frozen[, prefix_length]) -> (sums, reconstructions in [0, 1] as decoded,
    not clipped: the metrics clip them as their convention says). A
    proxy-code model is judged through the teacher: pixels = teacher.decode_codes(argmax
    logits). `prefix` k: decode the first k tokens only (a 1D tokenizer,
    `tok1d.models.tokenizers.nested`); the traced `prefix_length` does the same for a model
    trained with nested_dropout (its mask vector), with one compilation for every k."""
    num_codes = model.num_codes
    levels = model.codes_per_token  # residual VQ: per-level code statistics
    outputs_pixels = model.outputs_pixels
    to_model, to_unit = images.range_converters(model.pixel_range)
    kwargs = {} if prefix is None else {"prefix_lengths": int(prefix)}

    def eval_step(params, batch, frozen, prefix_length=None):
        images = batch["image"]
        kw = kwargs if prefix_length is None else {
            "prefix_lengths": jnp.full((images.shape[0],), prefix_length, jnp.int32)}
        out, aux = model.apply({"params": params}, to_model(images), **kw)
        mask = batch["mask"].astype(jnp.float32)
        sums = {}
        if outputs_pixels:
            recon = to_unit(out)
        else:
            if teacher is None:
                raise ValueError("A proxy-code model needs the teacher to evaluate.")
            t_model = teacher
            t_codes = t_model.apply({"params": frozen["teacher"]}, images, method=t_model.encode)
            pred = jnp.argmax(out, axis=-1)
            acc = jnp.mean((pred == t_codes).astype(jnp.float32), axis=(1, 2))
            sums["proxy_accuracy_sum"] = jnp.sum(acc * mask)
            recon = t_model.apply({"params": frozen["teacher"]}, pred,
                                  method=t_model.decode_codes)
        err = jnp.mean(jnp.square(recon - images), axis=(1, 2, 3))
        sums.update(psnr_sum=jnp.sum(psnr(recon, images) * mask), l2_sum=jnp.sum(err * mask),
                    count=jnp.sum(mask))
        if num_codes:
            sums["hist"] = codebook_lib.code_histogram(aux.codes, num_codes, mask, levels)
        return sums, recon

    return eval_step


_add_totals = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))  # one dispatch per batch


def evaluate(eval_fn, params, frozen, eval_ds, num_batches: int, feeder_args, num_grid: int,
             image_metrics=None, log=None):
    """One pass over the eval split. Returns (metrics dict, (inputs, recons) for the grid).

    `image_metrics` (a `tok1d.evaluation.evaluator.ImageMetrics`) also receives every batch and
    adds its numbers (SSIM, LPIPS, rFID, IS, precision/recall) to the dict."""
    feeder = feeding.Feeder(iter(eval_ds), *feeder_args)
    totals, grid_in, grid_out = None, None, None
    progress = (summary.ProgressReporter(num_batches, batch_size=feeder_args[1],
                                         every_secs=30.0, print_fn=log) if log else None)
    for i in range(num_batches):
        batch = next(feeder)
        out, recon = eval_fn(params, batch, frozen)
        totals = out if totals is None else _add_totals(totals, out)
        if image_metrics is not None:
            image_metrics.add_pairs(batch["image"], recon, batch["mask"])
        if progress is not None:
            progress.update(i + 1)
        if i == 0:
            grid_in = _gather_rows(batch["image"], num_grid)
            grid_out = _gather_rows(recon, num_grid)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    metrics = dict(psnr=float(totals["psnr_sum"]) / count, l2=float(totals["l2_sum"]) / count,
                   num_examples=int(totals["count"]))
    if "proxy_accuracy_sum" in totals:
        metrics["proxy_accuracy"] = float(totals["proxy_accuracy_sum"]) / count
    if "hist" in totals:
        metrics["codebook_usage"] = float(codebook_lib.usage(np.asarray(totals["hist"])))
        metrics["codebook_perplexity"] = float(codebook_lib.perplexity(np.asarray(totals["hist"])))
        metrics["codebook_dead"] = int(codebook_lib.dead_codes(np.asarray(totals["hist"])))
    if image_metrics is not None:
        extra = image_metrics.result()
        extra.pop("num_images", None)
        metrics.update({("rfid" if k == "fid" else k): v for k, v in extra.items()})
    return metrics, (grid_in, grid_out)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _first_rows(x: jax.Array, n: int, replicated: jax.sharding.NamedSharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(x[:n], replicated)


def _gather_rows(x: jax.Array, n: int) -> np.ndarray:
    """First n rows of a global array, on every host (all-gathers only those rows)."""
    replicated = jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
    return np.asarray(jax.device_get(_first_rows(x, n, replicated)))


@dataclasses.dataclass
class Training:
    """Everything a tokenizer training step needs, built from a config (shared by
    `train_and_evaluate` and `tok1d.cli.bench`)."""

    model: nn.Module
    nets: terms_lib.FrozenNets         # frozen networks (teacher, perceptual)
    gan: Optional[adversarial.GANObjective]
    frozen: Any                # frozen params (teacher, perceptual), replicated on the mesh
    abstract: Any              # abstract TrainState
    shardings: Any             # its shardings
    init: Callable             # rng -> sharded TrainState (random init)
    steps: programs.PhasedStep  # .at(step): jitted (state, batch, frozen) -> (state, scalars,
                                # finite) of that step's phase (`config.phase_programs`)


def build_gan(config, model: nn.Module, sample_images: jax.Array
              ) -> Optional[adversarial.GANObjective]:
    """The GAN objective of `config` (None without a GAN term): the discriminator, its
    optimizer and schedule (`disc_optim`; GigaTok's `global_schedule` follows the global step,
    TiTok's starts when D does, `schedule_processes` stretching it as the official scheduler
    stepped once per process)."""
    disc = build_discriminator(config)
    if disc is None:
        return None
    d = config.discriminator
    if d.global_schedule:  # GigaTok: D's lr follows the global step
        disc_steps, offset = config.total_steps, d.start_step
    else:  # TiTok: D's schedule (and warm-up) starts when D does
        procs = d.get("schedule_processes", 1)
        if procs < 1:
            raise config_lib.ConfigError(f"discriminator.schedule_processes={procs} must be >= 1.")
        start = d.start_step
        late = start // procs if start % procs == 0 else start / procs  # exact either way
        disc_steps, offset = max(config.total_steps - late, 1), 0
    abstract = adversarial.abstract_variables(disc, sample_images)  # traced once
    tx, schedule = optim.make_optimizer(config.disc_optim, disc_steps, nn.unbox(abstract[0]),
                                        step_offset=offset)
    try:
        return adversarial.GANObjective(
            disc, tx=tx, schedule=schedule, sample_images=sample_images,
            model_range=model.pixel_range, loss=d.loss, weight=float(config.losses.gan),
            d_weight=d.d_weight, start_step=d.start_step, lecam=d.lecam,
            lecam_decay=d.lecam_decay, lecam_form=d.lecam_form,
            call_order=d.get("call_order", "fake_real"),
            direct_fake=d.get("direct_fake", "shortcut"), diffaug_prob=d.diffaug_prob,
            diffaug_cutout=d.diffaug_cutout, abstract=abstract)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class QuantizerState:
    """`TrainState.extras["quantizer"]`: the training state of a quantizer that keeps one (the
    clustering VQ's usage EMA, collection "quantizer_state"), replicated."""

    model: nn.Module
    sample: jax.Array
    abstract: Any = None  # its abstract value, where the caller has traced the init already

    def init(self, rng: jax.Array) -> Any:
        return self.model.init(rng, self.sample)[quantizers.STATE]

    def abstract_and_shardings(self, mesh, rules) -> tuple[Any, Any]:
        abstract = self.abstract
        if abstract is None:
            abstract = jax.eval_shape(self.init, jax.random.key(0))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return abstract, jax.tree.map(lambda _: replicated, abstract)


def check_reconstruction_shape(recon: tuple[int, ...], images: tuple[int, ...]) -> None:
    """A ConfigError when the tokenizer's reconstruction is not the size of its input (the
    pixel losses' shape error came from inside the train step's trace, as a traceback)."""
    if tuple(recon) != tuple(images):
        raise config_lib.ConfigError(
            f"the tokenizer reconstructs {'x'.join(map(str, recon[1:]))} images from "
            f"{'x'.join(map(str, images[1:]))} inputs (data.image_size={images[1]}): its "
            "decoder's upsampling differs from its encoder's downsampling (e.g. a pixel "
            "decoder that upsamples by 16 after model.patch_size=8).")


def build_training(config: ml_collections.ConfigDict, mesh, rules, batch_sh) -> Training:
    """Model, optimizer, frozen networks, GAN objective, state shardings and the jitted step
    (state donated) of `config`."""
    dcfg = config.data
    model = build_model(config)
    interfaces.check_tokenizer(model)
    local_rows = config.batch_size // config.optim.grad_accum_steps
    dummy = jnp.zeros((min(local_rows, 2), dcfg.image_size, dcfg.image_size, 3), jnp.float32)
    init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731
    # Boxed; traced once, with the reconstruction's shape for free.
    (recon, _), variables = jax.eval_shape(model.init_with_output, jax.random.key(0), dummy)
    if model.outputs_pixels:  # (not TiTok stage 1's proxy-code logits)
        check_reconstruction_shape(recon.shape, dummy.shape)
    param_shapes = nn.unbox(variables["params"])
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, param_shapes)

    nets, frozen = build_frozen(config, model)
    frozen = parallel.replicate(frozen, mesh)
    gan = build_gan(config, model, dummy)
    extras = {"gan": gan} if gan is not None else {}
    if quantizers.STATE in variables:
        extras["quantizer"] = QuantizerState(model, dummy, variables[quantizers.STATE])
    abstract, shardings, init = state_lib.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=config.ema_decay > 0, extras=extras or None,
        boxed_params=variables["params"])
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)

    def make_step(phase: Optional[Phase]):
        return jax.jit(make_train_step(model, tx, schedule, config, nets, gan, phase),
                       in_shardings=(shardings, batch_sh, frozen_sh),
                       out_shardings=(shardings, None, None), donate_argnums=(0,))

    if config.phase_programs:
        steps = programs.PhasedStep(make_step, *phase_schedule(config))
    else:
        steps = programs.PhasedStep.single(make_step(None))
    return Training(model, nets, gan, frozen, abstract, shardings, init, steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       ar_probe: Optional[Callable] = None) -> dict[str, Any]:
    """Trains a tokenizer; writes checkpoints, TensorBoard logs, grids and metrics.json.

    `ar_probe`: the AR-probe factory run when `config.ar_probe.every_steps` > 0
    (`tok1d.probes.ar.make_ar_probe`, passed by `tok1d.main`), called as
    `ar_probe(config, encode, num_codes, train_src, eval_ds, eval_batches, feeder_args, mesh,
    rules, host_start, host_stop)` with the tokenizer's jitted `encode(params, images in
    [0, 1]) -> codes`; it returns `probe(params) -> metrics` or None."""
    if config.ar_probe.every_steps > 0 and ar_probe is None:
        raise config_lib.ConfigError(
            "ar_probe.every_steps > 0 but no AR probe was given: run through "
            "`python -m tok1d.main`, or pass ar_probe=tok1d.probes.ar.make_ar_probe.")
    # ---------------------------------------------------------------- setup
    workdir, mesh, rules, batch_sh = loop.setup_run(config, workdir)
    is_chief = jax.process_index() == 0

    # ---------------------------------------------------------------- data
    dcfg = config.data
    row_start, row_stop = parallel.host_batch_slice(batch_sh, config.batch_size)
    train_src, eval_src = parallel.everywhere(  # (a host without the data: all stop)
        lambda: (sources.source_of(dcfg, dcfg.train_split),
                 sources.source_of(dcfg, dcfg.eval_split)), f"the data {dcfg.name}")

    def batches_from(step):
        return feeding.Feeder(iter(pipeline.recipe_train_dataset(
            train_src, dcfg, global_batch=config.batch_size, host_start=row_start,
            host_stop=row_stop, seed=config.seed, start_batch=step)), batch_sh, config.batch_size)

    e_start, e_stop = parallel.host_batch_slice(batch_sh, config.eval_batch_size)
    eval_ds, eval_batches = pipeline.recipe_eval_dataset(
        eval_src, dcfg, global_batch=config.eval_batch_size, host_start=e_start, host_stop=e_stop)

    # ---------------------------------------------------------------- model, frozen nets, state
    log = loop.log_fn()
    t = build_training(config, mesh, rules, batch_sh)
    model, frozen = t.model, t.frozen
    checkpointer = loop.checkpointer_for(config, workdir)
    start = state_lib.start_or_resume(checkpointer, t.abstract, t.shardings, t.init,
                                      jax.random.key(config.seed), batches_from,
                                      t.steps, mesh, rules, step_args=(frozen,))
    state, first_step = start.state, start.step
    writer = loop.start_writing(config, workdir, first_step,
                                loop.data_record(train_src, eval_src))
    if first_step == 0:
        state = load_initial_weights(config, state, log)
        trunk = load_disc_trunk(config, t.gan.disc) if t.gan is not None else None
        if trunk is not None:
            gan_state = state.extras["gan"]
            params = {**gan_state.params,
                      "trunk": parallel.put_like(trunk, gan_state.params["trunk"])}
            state = state.replace(extras={**state.extras,
                                          "gan": gan_state.replace(params=params)})
            log(f"Discriminator trunk loaded from {config.discriminator.weights}.")
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Model %s: %.2fM parameters; starting at step %d.", config.model.name,
                 num_params / 1e6, first_step)

    # ---------------------------------------------------------------- steps
    feeder_args = (batch_sh, config.eval_batch_size)
    ecfg = config.evaluation
    nets = (evaluator.load_metric_nets(ecfg, config.perceptual.weights, log)
            if ecfg.fid_every_steps > 0 else None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        eval_step = jax.jit(make_eval_step(model, t.nets.teacher))

        probe = None
        if config.ar_probe.every_steps > 0:
            to_model, _ = images.range_converters(model.pixel_range)
            encode = jax.jit(lambda p, x: model.apply({"params": p}, to_model(x),
                                                      method=model.encode))
            probe = ar_probe(config, encode, model.num_codes, train_src, eval_ds, eval_batches,
                             feeder_args, mesh, rules, e_start, e_stop)

        def run_eval(state_, step_):
            params = loop.eval_params(state_)
            image_metrics = None
            if nets is not None and (step_ % ecfg.fid_every_steps == 0
                                     or step_ >= config.total_steps):
                image_metrics = evaluator.ImageMetrics.from_config(nets, mesh, ecfg)
            metrics, (grid_in, grid_out) = evaluate(eval_step, params, frozen, eval_ds,
                                                    eval_batches, feeder_args,
                                                    config.num_grid_images, image_metrics)
            every = config.ar_probe.every_steps
            if probe is not None and (step_ % every == 0 or step_ >= config.total_steps):
                metrics.update({f"ar_probe_{k}": v for k, v in probe(params).items()})
            grid = images.make_grid(images.interleave_pairs(grid_in, grid_out))
            writer.write_scalars(step_, {f"eval/{k}": v for k, v in metrics.items()})
            writer.write_images(step_, {"eval/input_vs_reconstruction": grid})
            if is_chief:
                images.save_png(os.path.join(workdir, "reconstructions.png"), grid)
            return metrics

        # ------------------------------------------------------------ loop
        result = loop.train_loop(config, workdir, state, first_step, t.steps, start.batches,
                                 checkpointer, writer, run_eval, start.times,
                                 step_args=(frozen,),
                                 eval_periods=(ecfg.fid_every_steps, config.ar_probe.every_steps))
    writer.close()
    return result


