"""Tokenizer trainer (single-stage: reconstruction + quantizer losses).

`train_and_evaluate(config, workdir)` is importable (tests, Colab); `python -m tok1d.main`
calls it when `config.trainer == "tokenizer"`. Sections: setup, data, model and optimizer,
state (sharded init or resume), steps, evaluation, loop.
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

from tok1d.objectives import augment
from tok1d.train import checkpoint as ckpt_lib
from tok1d import images, models, parallel, summary
from tok1d.train import config_lib
from tok1d.objectives import gan
from tok1d.objectives import losses
from tok1d.train import optim
from tok1d.weights import loaders
from tok1d.objectives import perceptual as perceptual_lib
from tok1d.data import feeding, pipeline, sources
from tok1d.evaluation import codebook as codebook_lib
from tok1d.evaluation import evaluator
from tok1d.evaluation.image_metrics import psnr
from tok1d.train import common


def build_model(config) -> nn.Module:
    return models.create(config.model.name, **config_lib.model_kwargs(config))


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
    return loaders.load_teacher(tcfg.name, tcfg.weights, tcfg.model, precision=config.precision,
                                grid=getattr(student, "grid_size", None),
                                image_size=config.data.image_size, seed=config.seed + 17)


_MISSING_TEACHER = {
    "dinov2": (
        "teacher.weights is empty: the semantic loss needs the frozen DINOv2 ViT-B/14. "
        "Download dinov2_vitb14_pretrain.pth (facebookresearch/dinov2) and pass it as "
        "--config.teacher.weights=PATH (or convert it once: python -m tok1d.cli.convert dinov2 "
        "dinov2_vitb14_pretrain.pth DIR --pos_grid 16)."),
    "maskgit_vqgan": (
        "teacher.weights is empty: stage 1 needs the frozen MaskGIT-VQGAN. Download "
        "maskgit-vqgan-imagenet-f16-256.bin (HF fun-research/TiTok) and pass it as "
        "--config.teacher.weights=PATH (or convert it once: python -m tok1d.cli.convert "
        "maskgit_vqgan maskgit-vqgan-imagenet-f16-256.bin DIR)."),
}


def build_frozen(config, model: nn.Module):
    """(teacher, perceptual, frozen): the frozen networks the losses need and their params as
    one host tree {"teacher": ..., "perceptual": ...} (passed to the step, never optimized)."""
    frozen = {}
    teacher = build_teacher(config, model)
    if teacher is not None:
        frozen["teacher"] = teacher[1]
    perceptual = None
    if config.losses.perceptual:
        perceptual = perceptual_lib.make_perceptual(
            config.perceptual.kind, loaders.load_perceptual(
                perceptual_lib.parse_kind(config.perceptual.kind), config.perceptual.weights,
                allow_random_init=config.perceptual.allow_random_init),
            image_size=config.perceptual.image_size,
            lpips_dropout=config.perceptual.get("lpips_dropout", 0.0))
        frozen["perceptual"] = perceptual.params
    return teacher, perceptual, frozen


def build_discriminator(config) -> Optional[nn.Module]:
    """The discriminator module named by `discriminator.name` (None without a GAN term):
    "titok" (NLayer + BlurPool), "patchgan" (LlamaGen / GigaTok) or "dino" (GigaTok's DINO-v1
    ViT-S/16 trunk + spectral-norm heads; its trunk weights come from `discriminator.weights`,
    see `load_disc_trunk`)."""
    if not config.losses.gan:
        return None
    from tok1d.models import discriminator as disc_lib
    from tok1d.models import dino_disc
    classes = {"titok": disc_lib.TiTokDiscriminator, "patchgan": disc_lib.PatchGANDiscriminator,
               "dino": dino_disc.DinoDiscriminator}
    name = config.discriminator.name
    if name not in classes:
        raise config_lib.ConfigError(f"discriminator.name={name!r}; expected one of "
                                     f"{sorted(classes)}.")
    kwargs = dict(config.discriminator.model)
    models.check_kwargs(classes[name], kwargs, f"discriminator {name!r}")
    return classes[name](**kwargs)


def load_disc_trunk(config, disc: nn.Module) -> Optional[dict[str, Any]]:
    """Converted frozen trunk params of the DINO discriminator (None for the others)."""
    dcfg = config.discriminator
    if loaders.disc_needs_trunk(disc) and not (dcfg.weights or dcfg.allow_random_init):
        raise config_lib.ConfigError(
            "discriminator.weights is empty: the DINO discriminator needs the frozen DINO "
            "ViT-S/16 trunk. Download dino_deitsmall16_pretrain.pth (facebookresearch/dino) and "
            "pass it as --config.discriminator.weights=PATH.")
    return loaders.load_disc_trunk(dcfg.weights, disc)


# Discriminator calls of a tokenizer step, in the official order (GigaTok VQLoss), by the names
# of their replayable DiffAugment draws: the generator's D(x_hat) ("g/rec") and, in a warm-up +
# GAN overlap step, its direct-term call ("g/direct"); the D step's fake, real and, in an
# overlap step, direct-fake calls ("d/fake", "d/real", "d/direct"; fake / real in
# `discriminator.call_order`). The direct calls' input is `discriminator.direct_fake`.
DISC_CALLS = ("g/rec", "g/direct", "d/fake", "d/real", "d/direct")
DIRECT_FAKES = ("shortcut", "reconstruction")


def make_disc_apply(disc: nn.Module, dcfg, model: nn.Module):
    """(params, state, images, rng, draws=None, call="") -> (logits, new state): one
    discriminator call in training mode on images in the model's range (converted to the
    discriminator's `pixel_range` when it declares one, e.g. the pretrained DINO trunk's
    [-1, 1]), with DiffAugment first when `discriminator.diffaug_prob` > 0. `state` holds the
    discriminator's non-param collections (the DINO discriminator's spectral-norm vectors,
    advanced by every call as torch's spectral_norm in train mode) or None.

    DiffAugment's uniforms are the step's replayable draws (`common.injected`) of the call named
    `call` (`DISC_CALLS`): "diffaug/<call>/flags" (3,) and "diffaug/<call>/rand01" (7, B), the
    official `torch.rand(3)` / `torch.rand(7, B, 1, 1)` of that call (`augment.draw_uniforms`
    from `rng` otherwise)."""
    import inspect
    takes_train = "train" in inspect.signature(disc.__call__).parameters
    _, to_unit = pixel_range_fns(model)
    to_disc, _ = pixel_range_fns(disc)
    disc_range = getattr(disc, "pixel_range", None)
    convert = disc_range is not None and disc_range != getattr(model, "pixel_range", (0.0, 1.0))

    def apply(params, state, images, rng, draws=None, call=""):
        if convert:
            images = to_disc(to_unit(images))
        k_aug, k_crop = jax.random.split(rng)
        if dcfg.diffaug_prob > 0:
            fresh = augment.draw_uniforms(k_aug, images.shape[0])  # dead code when replayed
            flags = common.injected({"draws": draws}, f"diffaug/{call}/flags", lambda: fresh[0])
            rand01 = common.injected({"draws": draws}, f"diffaug/{call}/rand01",
                                     lambda: fresh[1])
            images = augment.diff_augment_with_uniforms(
                images, jnp.asarray(flags, jnp.float32), jnp.asarray(rand01, jnp.float32),
                prob=dcfg.diffaug_prob, cutout=dcfg.diffaug_cutout)
        kwargs = {"train": True} if takes_train else {}
        if state is None:
            return disc.apply({"params": params}, images, rngs={"crop": k_crop}, **kwargs), None
        logits, new = disc.apply({"params": params, **state}, images, rngs={"crop": k_crop},
                                 mutable=list(state), **kwargs)
        return logits, dict(new)

    return apply


def _put_like(host_tree: Any, like: Any) -> Any:
    """Host arrays -> global arrays with the shardings of `like` (same structure and shapes)."""
    def put(x, ref):
        x = np.asarray(x, ref.dtype)
        if x.shape != ref.shape:
            raise ValueError(f"shape {x.shape} does not match the model's {ref.shape}")
        return jax.make_array_from_callback(x.shape, ref.sharding, lambda idx: x[idx])
    return jax.tree.map(put, host_tree, like)


def replicate(tree: Any, mesh) -> Any:
    """Host NumPy tree -> arrays replicated over the mesh (works across hosts)."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def load_initial_weights(config, state: common.TrainState, log) -> common.TrainState:
    """Overwrites freshly initialised params with `config.init` weights (path + shape match)."""
    loaded = loaders.load_initial_params(state.params, config.init.checkpoint,
                                         config.init.pixel_decoder, log)
    if not loaded:
        return state
    flat = flax.traverse_util.flatten_dict(state.params)
    for k, value in loaded.items():
        flat[k] = _put_like(value, flat[k])
    params = flax.traverse_util.unflatten_dict(flat)
    # The EMA must not share buffers with params: the train step donates both.
    ema = (jax.jit(lambda t: jax.tree.map(jnp.copy, t))(params)
           if state.ema_params is not None else None)
    return state.replace(params=params, ema_params=ema)


# -------------------------------------------------------------------- steps

# Warm-up terms: applied only while step < config.aux_loss_end_step.
WARMUP_TERMS = ("fea_rec", "shortcut")


def pixel_range_fns(model: nn.Module):
    """(to_model, to_unit): data images in [0, 1] <-> the model's pixel range (GigaTok works in
    [-1, 1]). Pixel losses and the discriminator see the model's range, as in the official code;
    perceptual networks, PSNR and the grids see [0, 1]."""
    lo, hi = getattr(model, "pixel_range", (0.0, 1.0))
    if (lo, hi) == (0.0, 1.0):
        return (lambda x: x), (lambda y: y)
    return (lambda x: x * (hi - lo) + lo), (lambda y: (y - lo) / (hi - lo))


def make_loss_fn(model: nn.Module, config, teacher=None, perceptual=None, disc=None):
    """The generator objective. Returns

        loss_fn(params, images, frozen, disc_params, disc_state, active, aux_on, rng,
                draws=None) -> (total, (terms, extras, outputs, new disc_state))

    `images` in [0, 1]; `frozen` holds the teacher / perceptual params (not differentiated:
    they get no gradient and no optimizer state); `active` gates the GAN term, `aux_on` the
    warm-up terms; `terms` are the unweighted values of every enabled term; `outputs` holds the
    reconstruction ("pixels", the model's range) and, with the shortcut term, the shortcut
    reconstruction ("shortcut_pixels", zeros while the warm-up is off). `draws`: the batch's
    recorded random draws (`common.injected`): the LPIPS dropout keep masks
    "lpips_keep/rec/lin{k}" (reconstruction) and "lpips_keep/shortcut/lin{k}" (shortcut), each
    (B, H_k, W_k, C_k) for VGG tap k, used when `perceptual.lpips_dropout` > 0 (otherwise
    drawn with `perceptual.bernoulli_keep`). TiTok stage 1 reads its targets as the draw
    "proxy_codes", (B, h, w) integer codes (default: the frozen teacher's encode, as
    upstream's `pretrained_tokenizer.encode(images)`).

    GigaTok's shortcut term (official VQLoss with `use_direct_rec_loss`), for x~ = CNN decoder
    on the encoder's map: w_l2 MSE(x, x~) + w_perceptual LPIPS(x, x~), plus in a step where the
    warm-up and the GAN overlap the "direct" G term gan * G-loss(D(f)) of a second D call, f =
    x~ (`discriminator.direct_fake` "shortcut": the PatchGAN branch) or the reconstruction x_hat
    again ("reconstruction": the official dinodisc branch); `losses.shortcut` (1.0) scales the
    sum. With DiffAugment the G step's D calls read the draws "diffaug/g/rec/*" and
    "diffaug/g/direct/*" (`make_disc_apply`)."""
    weights = {k: float(v) for k, v in config.losses.items() if v and k != "gan"}
    gan_weight = float(config.losses.gan)
    num_codes = getattr(model, "num_codes", None)
    sample = getattr(model, "quantizer", "vq") == "vae"
    call_kwargs = {"sample": True} if sample else {}
    outputs_pixels = getattr(model, "outputs_pixels", True)
    to_model, to_unit = pixel_range_fns(model)
    g_loss_fn_ = gan.g_loss_fn(config.discriminator.loss) if disc is not None else None
    disc_apply = (make_disc_apply(disc, config.discriminator, model) if disc is not None
                  else None)
    lpips_rate = getattr(perceptual, "lpips_dropout", 0.0)
    direct_fake = config.discriminator.get("direct_fake", "shortcut")
    if direct_fake not in DIRECT_FAKES:
        raise config_lib.ConfigError(f"discriminator.direct_fake={direct_fake!r}; expected one "
                                     f"of {DIRECT_FAKES}.")

    def perceptual_value(frozen, pixels, images, draws, call, rng):
        """The perceptual term of `pixels` (model range) vs `images` ([0, 1]); with LPIPS dropout
        its keep masks are the draws "lpips_keep/<call>/lin<k>"."""
        keep = None
        if lpips_rate:
            default = perceptual_lib.bernoulli_keep(rng, lpips_rate)
            keep = lambda k, shape: common.injected(  # noqa: E731
                {"draws": draws}, f"lpips_keep/{call}/lin{k}", lambda: default(k, shape))
        return perceptual.apply(frozen["perceptual"], to_unit(pixels), images, keep)

    def term_values(out, aux, x, images, frozen, draws=None, rng=None):
        """Unweighted terms; `x` is the input in the model's range, `images` in [0, 1]."""
        terms = {}
        for name in weights:
            if name in losses.RECONSTRUCTION_TERMS:
                if not outputs_pixels:
                    raise config_lib.ConfigError(f"losses.{name} needs pixel outputs; this model "
                                                 "predicts proxy codes (use losses.proxy_ce).")
                terms[name] = losses.RECONSTRUCTION_TERMS[name](out, x)
            elif name == "proxy_ce":
                codes = common.injected({"draws": draws}, "proxy_codes",
                                        lambda: teacher_codes(frozen, images))
                terms[name] = losses.proxy_code_ce(out, codes)
            elif name == "perceptual":
                terms[name] = perceptual_value(frozen, out, images, draws, "rec", rng)
            elif name == "semantic":
                if "semantic_features" not in aux:
                    raise config_lib.ConfigError("losses.semantic needs a model with a semantic "
                                                 "head (gigatok with distill_depth > 0).")
                feats = aux["semantic_features"]
                terms[name] = losses.semantic_cosine(
                    feats, teacher_features(frozen, images, feats.shape[1]))
            elif name == "shortcut":
                continue  # computed in g_loss, only during the warm-up
            elif f"{name}_loss" in aux:
                terms[name] = aux[f"{name}_loss"]
            else:
                raise config_lib.ConfigError(
                    f"losses.{name} is neither a loss of this trainer nor provided by the model "
                    f"({sorted(k[:-5] for k in aux if k.endswith('_loss'))}).")
        return terms

    def teacher_codes(frozen, images):
        """TiTok stage 1's targets: the frozen MaskGIT-VQGAN's (B, h, w) codes."""
        if teacher is None:
            raise config_lib.ConfigError("losses.proxy_ce needs the teacher (teacher.name="
                                         "'maskgit_vqgan') or the draw 'proxy_codes' in the batch.")
        _, aux = teacher[0].apply({"params": frozen["teacher"]}, images,
                                  method=teacher[0].encode)
        return jax.lax.stop_gradient(aux["codes"])

    def teacher_features(frozen, images, num_tokens):
        """DINOv2 patch tokens on a sqrt(N) x sqrt(N) grid (224 px for N = 256)."""
        from tok1d.models.frozen.dinov2 import preprocess_gigatok
        t_model = teacher[0]
        grid = int(round(num_tokens ** 0.5))
        pixels = preprocess_gigatok(images * 2.0 - 1.0, size=grid * t_model.patch_size)
        feats = t_model.apply({"params": frozen["teacher"]}, pixels)["patch_tokens"]
        return jax.lax.stop_gradient(feats)

    def shortcut_terms(params, cnn_map, x, images, frozen, disc_params, disc_state, active,
                       draws, rng, x_hat):
        """GigaTok's early-phase direct reconstruction x~ (CNN decoder on the encoder's map):
        (weighted loss, unweighted parts, x~, disc_state); see `make_loss_fn`."""
        k_perc, k_disc = jax.random.split(rng)
        pixels = model.apply({"params": params}, cnn_map, method="decode_cnn_map")
        parts = {name: fn(pixels, x) for name, fn in losses.RECONSTRUCTION_TERMS.items()
                 if name in weights}
        if "perceptual" in weights:
            parts["perceptual"] = perceptual_value(frozen, pixels, images, draws, "shortcut",
                                                   k_perc)
        loss = losses.weighted_sum(weights, parts)
        if disc is not None:  # only called in an overlap step, after D(x_hat) (official order)
            def gan_on():
                fake = pixels if direct_fake == "shortcut" else x_hat
                logits, new_state = disc_apply(disc_params, disc_state, fake, k_disc, draws,
                                               "g/direct")
                return g_loss_fn_(logits), new_state

            parts["gan"], disc_state = jax.lax.cond(
                active > 0, gan_on, lambda: (jnp.zeros((), jnp.float32), disc_state))
            loss = loss + gan_weight * active * parts["gan"]
        return loss, parts, pixels, disc_state

    def g_loss(params, images, frozen, disc_params, disc_state, active, aux_on, rng,
               draws=None):
        rng, disc_rng = jax.random.split(rng)
        rec_rng, short_rng = jax.random.split(jax.random.fold_in(rng, 1))
        x = to_model(images)
        out, aux = model.apply({"params": params}, x, rngs={"sample": rng}, **call_kwargs)
        terms = term_values(out, aux, x, images, frozen, draws, rec_rng)
        scale = {k: w * aux_on if k in WARMUP_TERMS else w for k, w in weights.items()}
        if disc is not None:
            logits, disc_state = disc_apply(disc_params, disc_state, out, disc_rng, draws,
                                            "g/rec")
            terms["gan"] = g_loss_fn_(logits)
        outputs, extras = {"pixels": out}, {}
        if "shortcut" in weights:
            def shortcut_on():
                return shortcut_terms(params, aux["cnn_map"], x, images, frozen, disc_params,
                                      disc_state, active, draws, short_rng, out)

            zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype),
                                 jax.eval_shape(shortcut_on)[:3])
            terms["shortcut"], parts, outputs["shortcut_pixels"], disc_state = jax.lax.cond(
                aux_on > 0, shortcut_on, lambda: (*zeros, disc_state))
            extras.update({f"shortcut_{k}": v for k, v in parts.items()})
        total = losses.weighted_sum(scale, {k: v for k, v in terms.items() if k != "gan"})
        if disc is not None:
            total = total + gan_weight * active * terms["gan"]
        if "quantizer" in weights and "codebook_loss" in aux:  # the official log's two parts
            extras.update(quantizer_codebook=aux["codebook_loss"],
                          quantizer_commitment=aux["commitment_loss"])
        if outputs_pixels:
            extras["psnr"] = jnp.mean(psnr(to_unit(out), images))
        if num_codes:
            hist = codebook_lib.code_histogram(aux["codes"], num_codes)
            extras["batch_perplexity"] = codebook_lib.perplexity(hist)
        return total, (terms, extras, outputs, disc_state)

    return g_loss


def schedule_count(opt_state: Any) -> jax.Array:
    """The update count that an optimizer's LR schedule reads (its `ScaleByScheduleState`): the
    index of the optimizer's next update, whatever steps it skipped."""
    counts = [v for path, v in optim.optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if any(getattr(k, "tuple_name", None) == "ScaleByScheduleState" for k in path)]
    if not counts:
        raise ValueError("the optimizer state holds no LR schedule count")
    return counts[0]


def make_train_step(model: nn.Module, tx, schedule, config, teacher=None, perceptual=None,
                    disc=None, disc_tx=None, disc_schedule=None):
    """The jitted-to-be update: forward, losses (`make_loss_fn`), grads (optionally
    accumulated), AdamW, EMA, then (with a GAN) the discriminator update on the same, detached
    reconstructions.

    Signature: (state, batch, frozen) -> (state, scalars, finite); `frozen` holds the params of
    the teacher / perceptual networks, which therefore get no gradient and no optimizer state.
    `batch["draws"]` (optional) carries recorded random draws by name (`common.injected`); this
    step reads the LPIPS dropout masks "lpips_keep/rec/lin{k}" and "lpips_keep/shortcut/lin{k}"
    (see `make_loss_fn`; not with grad_accum_steps > 1) and TiTok stage 1's "proxy_codes".

    The discriminator step calls D on the real and the detached fake batch in
    `discriminator.call_order`; in a step where GigaTok's warm-up and the GAN overlap it also
    trains on a third, "direct" fake (d_weight * D-loss(D(x), D(f)) with the same real logits,
    official VQLoss), f = the detached shortcut reconstruction x~ (`discriminator.direct_fake`
    "shortcut", PatchGAN) or x_hat again ("reconstruction", the dinodisc branch). Every D call of
    the step (the generator's included) advances the discriminator's non-param state (BatchNorm
    running stats, spectral-norm vectors). With DiffAugment each call reads its draws
    "diffaug/<call>/flags" and "diffaug/<call>/rand01", call in `DISC_CALLS` (`make_disc_apply`).
    Discriminator scalars: d_loss (what D minimises), d_adv_loss (d_weight * D-loss on x_hat),
    d_shortcut_adv_loss / d_direct_logits_fake (the direct call's weighted D-loss and mean
    logit), d_grad_norm (before clipping), d_lr (the LR of its update; 0 when D is not
    trained)."""
    g_loss = make_loss_fn(model, config, teacher, perceptual, disc)
    weights = {k for k, v in config.losses.items() if v and k != "gan"}
    accum = config.optim.grad_accum_steps
    ema_decay = config.ema_decay
    to_model, _ = pixel_range_fns(model)
    aux_end = config.aux_loss_end_step
    dcfg = config.discriminator
    d_loss_fn_ = gan.d_loss_fn(dcfg.loss) if disc is not None else None
    disc_apply = make_disc_apply(disc, dcfg, model) if disc is not None else None
    base_rng = jax.random.key(config.seed + 1)
    orders = {"fake_real": ("fake", "real"), "real_fake": ("real", "fake")}
    if dcfg.get("call_order", "fake_real") not in orders:
        raise config_lib.ConfigError(f"discriminator.call_order={dcfg.call_order!r}; expected "
                                     f"one of {sorted(orders)}.")
    call_order = orders[dcfg.get("call_order", "fake_real")]
    direct_fake = dcfg.get("direct_fake", "shortcut")

    def d_loss(disc_params, disc_state, images, fake, lecam_state, rng, shortcut=None,
               shortcut_on=0.0, draws=None):
        k_fake, k_real = jax.random.split(rng)
        inputs = {"fake": (fake, k_fake), "real": (to_model(images), k_real)}
        logits = {}
        for which in call_order:
            logits[which], disc_state = disc_apply(disc_params, disc_state, *inputs[which],
                                                   draws, f"d/{which}")
        real_logits, fake_logits = logits["real"], logits["fake"]
        loss = dcfg.d_weight * d_loss_fn_(real_logits, fake_logits)
        means = dict(logits_real=jnp.mean(real_logits), logits_fake=jnp.mean(fake_logits),
                     adv_loss=loss)
        if shortcut is not None:  # GigaTok warm-up + GAN overlap: a third (direct) fake call
            def shortcut_d_loss():
                lg, new_state = disc_apply(disc_params, disc_state, shortcut,
                                           jax.random.fold_in(rng, 2), draws, "d/direct")
                return (d_loss_fn_(real_logits, lg), jnp.mean(lg)), new_state

            zero = jnp.zeros((), jnp.float32)
            (means["shortcut_adv_loss"], means["direct_logits_fake"]), disc_state = jax.lax.cond(
                shortcut_on > 0, shortcut_d_loss, lambda: ((zero, zero), disc_state))
            means["shortcut_adv_loss"] = dcfg.d_weight * means["shortcut_adv_loss"]
            loss = loss + means["shortcut_adv_loss"]
        if dcfg.lecam:
            means["lecam"] = gan.lecam_loss(real_logits, fake_logits, lecam_state)
            loss = loss + dcfg.lecam * means["lecam"]
        return loss, (means, disc_state)

    g_grad = jax.value_and_grad(g_loss, has_aux=True)
    d_grad = jax.value_and_grad(d_loss, has_aux=True)

    def micro_step(state, disc_state, images, frozen, flags, rng, draws=None):
        """One microbatch: G loss + grads, then the D loss + grads on the detached output.
        Returns (summable results, the advanced discriminator state)."""
        active, aux_on = flags
        g_rng, d_rng = jax.random.split(rng)
        (loss, (terms, extras, outs, disc_state)), grads = g_grad(
            state.params, images, frozen, state.disc_params, disc_state, active, aux_on, g_rng,
            draws)
        result = dict(loss=loss, terms=terms, extras=extras, grads=grads)
        if disc is not None:
            shortcut = outs.get("shortcut_pixels")
            if shortcut is not None and direct_fake == "reconstruction":
                shortcut = outs["pixels"]
            (dl, (means, disc_state)), dg = d_grad(
                state.disc_params, disc_state, images, jax.lax.stop_gradient(outs["pixels"]),
                state.lecam, d_rng,
                None if shortcut is None else jax.lax.stop_gradient(shortcut), active * aux_on,
                draws)
            result.update(d_loss=dl, d_means=means, d_grads=dg)
        return result, disc_state

    def accumulate(state, images, frozen, flags, rng, draws=None):
        if accum == 1:
            return micro_step(state, state.disc_state, images, frozen, flags, rng, draws)
        if draws:
            raise ValueError("batch['draws'] (recorded random draws) needs grad_accum_steps=1.")
        # Microbatch m takes rows m, m + accum, ... so every device contributes to each one.
        micro = images.reshape((-1, accum) + images.shape[1:]).swapaxes(0, 1)
        rngs = jax.random.split(rng, accum)

        def body(carry, xs):
            sums, disc_state = carry
            out, disc_state = micro_step(state, disc_state, xs[0], frozen, flags, xs[1])
            return (jax.tree.map(jnp.add, sums, out), disc_state), None

        zeros = jax.eval_shape(micro_step, state, state.disc_state, micro[0], frozen, flags,
                               rngs[0])[0]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (total, disc_state), _ = jax.lax.scan(body, (zeros, state.disc_state), (micro, rngs))
        return jax.tree.map(lambda x: x / accum, total), disc_state

    def train_step(state: common.TrainState, batch, frozen):
        rng = jax.random.fold_in(base_rng, state.step)
        active = (gan.gan_active(state.step, dcfg.start_step) if disc is not None
                  else jnp.float32(0))
        aux_on = (state.step < aux_end).astype(jnp.float32)
        r, disc_state = accumulate(state, batch["image"], frozen, (active, aux_on), rng,
                                   batch.get("draws"))
        loss, grads = r["loss"], r["grads"]
        grad_norm = optim.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optim.optax.apply_updates(state.params, updates)
        ema = (common.ema_update(state.ema_params, params,
                                 optim.ema_decay_at(state.step + 1, ema_decay, config.ema_warmup))
               if state.ema_params is not None else None)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
        # The update must be finite too (its float32 squared norm also overflows for absurd
        # finite updates), so a step that would wreck the params is never applied or saved.
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                  & jnp.isfinite(optim.global_norm(updates)))
        scalars = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), **r["extras"],
                       **{f"loss_{k}": v for k, v in r["terms"].items()})
        if any(k in weights for k in WARMUP_TERMS):
            scalars["warmup_losses_active"] = aux_on
        if disc is not None:
            d_updates, d_opt = disc_tx.update(r["d_grads"], state.disc_opt_state,
                                              state.disc_params)
            d_params = optim.optax.apply_updates(state.disc_params, d_updates)
            lecam = gan.lecam_update(state.lecam, r["d_means"]["logits_real"],
                                     r["d_means"]["logits_fake"], dcfg.lecam_decay)
            on = active > 0  # before start_step D is not trained (its optimizer count stays 0)
            keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(on, a, b), n, o)  # noqa
            new = new.replace(disc_params=keep(d_params, state.disc_params),
                              disc_opt_state=keep(d_opt, state.disc_opt_state),
                              disc_state=keep(disc_state, state.disc_state),
                              lecam=keep(lecam, state.lecam))
            finite = finite & jnp.isfinite(r["d_loss"])
            scalars.update(d_loss=r["d_loss"], gan_active=active,
                           d_grad_norm=optim.global_norm(r["d_grads"]),
                           **{f"d_{k}": v for k, v in r["d_means"].items()})
            if disc_schedule is not None:
                scalars["d_lr"] = active * disc_schedule(schedule_count(state.disc_opt_state))
        new = common.keep_if_finite(finite, new, state)
        return new, scalars, finite

    return train_step


def make_eval_step(model: nn.Module, teacher=None):
    """(params, batch, frozen) -> (sums, reconstructions in [0, 1]). A proxy-code model is
    judged through the teacher: pixels = teacher.decode(argmax logits)."""
    num_codes = getattr(model, "num_codes", None)
    outputs_pixels = getattr(model, "outputs_pixels", True)
    to_model, to_unit = pixel_range_fns(model)

    def eval_step(params, batch, frozen):
        images = batch["image"]
        out, aux = model.apply({"params": params}, to_model(images))
        mask = batch["mask"].astype(jnp.float32)
        sums = {}
        if outputs_pixels:
            recon = to_unit(out)
        else:
            if teacher is None:
                raise ValueError("A proxy-code model needs the teacher to evaluate.")
            t_model = teacher[0]
            _, t_aux = t_model.apply({"params": frozen["teacher"]}, images, method=t_model.encode)
            pred = jnp.argmax(out, axis=-1)
            acc = jnp.mean((pred == t_aux["codes"]).astype(jnp.float32), axis=(1, 2))
            sums["proxy_accuracy_sum"] = jnp.sum(acc * mask)
            recon = t_model.apply({"params": frozen["teacher"]}, pred,
                                  method=t_model.decode_codes)
        err = jnp.mean(jnp.square(recon - images), axis=(1, 2, 3))
        sums.update(psnr_sum=jnp.sum(psnr(recon, images) * mask), l2_sum=jnp.sum(err * mask),
                    count=jnp.sum(mask))
        if num_codes:
            sums["hist"] = codebook_lib.code_histogram(aux["codes"], num_codes, mask)
        return sums, jnp.clip(recon, 0.0, 1.0)

    return eval_step


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
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
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
    if image_metrics is not None:
        extra = image_metrics.result()
        extra.pop("num_images", None)
        metrics.update({("rfid" if k == "fid" else k): v for k, v in extra.items()})
    return metrics, (grid_in, grid_out)


def make_ar_probe(config, model, train_src, eval_ds, eval_batches: int, feeder_args, mesh, rules,
                  host_start: int, host_stop: int):
    """`probe(params) -> metrics` for `config.ar_probe` (None when off or the model has no
    codes): encodes the first `train_examples` training images (center crops) and the eval
    split with `params`, then fits a fresh probe GPT on those codes (`generator.fit_probe`)."""
    pcfg = config.ar_probe
    num_codes = getattr(model, "num_codes", None)
    if pcfg.every_steps <= 0 or not num_codes:
        return None
    from tok1d.train import generator as gen_trainer
    to_model, _ = pixel_range_fns(model)
    batch_sh, eval_batch = feeder_args
    train_ds, train_batches = pipeline.eval_dataset(
        train_src, global_batch=eval_batch, host_start=host_start, host_stop=host_stop,
        image_size=config.data.image_size, num_examples=pcfg.train_examples)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, to_model(x),
                                              method=model.encode)[1]["codes"])
    def codes_of(params, ds, num_batches):
        feeder = feeding.Feeder(iter(ds), batch_sh, eval_batch)
        codes, labels = [], []
        for _ in range(num_batches):
            batch = next(feeder)
            c = parallel.host_array(encode(params, batch["image"]))
            keep = parallel.host_array(batch["mask"])
            codes.append(c.reshape(len(c), -1)[keep])
            labels.append(parallel.host_array(batch["label"])[keep])
        return np.concatenate(codes).astype(np.int32), np.concatenate(labels).astype(np.int32)

    def probe(params):
        codes, labels = codes_of(params, train_ds, train_batches)
        val_codes, val_labels = codes_of(params, eval_ds, eval_batches)
        num_classes = int(getattr(train_src, "num_classes", 0) or labels.max() + 1)
        gcfg = gen_trainer.probe_config(pcfg, num_codes, codes.shape[1], num_classes,
                                        config.mesh, config.seed)
        return gen_trainer.fit_probe(gcfg, codes, labels, val_codes, val_labels, mesh, rules,
                                     config.evaluation)

    return probe


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
    teacher: Any
    perceptual: Any
    disc: Optional[nn.Module]
    frozen: Any                # frozen params (teacher, perceptual), replicated on the mesh
    abstract: Any              # abstract TrainState
    shardings: Any             # its shardings
    init: Callable             # rng -> sharded TrainState (random init)
    step_fn: Callable          # jitted (state, batch, frozen) -> (state, scalars, finite)


def build_training(config: ml_collections.ConfigDict, mesh, rules, batch_sh) -> Training:
    """Model, optimizer(s), frozen networks, discriminator, state shardings and the jitted step
    (state donated) of `config`."""
    dcfg = config.data
    # ---------------------------------------------------------------- model and optimizer
    model = build_model(config)
    local_rows = config.batch_size // config.optim.grad_accum_steps
    dummy = jnp.zeros((min(local_rows, 2), dcfg.image_size, dcfg.image_size, 3), jnp.float32)
    init_params = lambda rng: model.init(rng, dummy)["params"]  # noqa: E731
    param_shapes = nn.unbox(jax.eval_shape(init_params, jax.random.key(0)))
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps, param_shapes)

    # ---------------------------------------------------------------- frozen networks, GAN
    teacher, perceptual, frozen = build_frozen(config, model)
    frozen = replicate(frozen, mesh)
    disc = build_discriminator(config)
    disc_tx = init_disc = disc_schedule = None
    if disc is not None:
        start = config.discriminator.start_step
        if config.discriminator.global_schedule:  # GigaTok: D's lr follows the global step
            disc_steps, offset = config.total_steps, start
        else:  # TiTok: D's schedule (and warm-up) starts when D does
            procs = config.discriminator.get("schedule_processes", 1)
            if procs < 1:
                raise config_lib.ConfigError(
                    f"discriminator.schedule_processes={procs} must be >= 1.")
            late = start // procs if start % procs == 0 else start / procs  # exact either way
            disc_steps, offset = max(config.total_steps - late, 1), 0

        def _init_disc(rng):
            return disc.init({"params": rng, "crop": rng}, dummy)

        init_disc = _init_disc
        disc_shapes = nn.unbox(jax.eval_shape(init_disc, jax.random.key(0))["params"])
        disc_tx, disc_schedule = optim.make_optimizer(config.disc_optim, disc_steps,
                                                      disc_shapes, step_offset=offset)

    abstract, shardings, init = common.state_shardings_and_init(
        init_params, tx, mesh, rules, use_ema=config.ema_decay > 0, init_disc=init_disc,
        disc_tx=disc_tx)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step_fn = jax.jit(
        make_train_step(model, tx, schedule, config, teacher, perceptual, disc, disc_tx,
                        disc_schedule),
        in_shardings=(shardings, batch_sh, frozen_sh), out_shardings=(shardings, None, None),
        donate_argnums=(0,))
    return Training(model, teacher, perceptual, disc, frozen, abstract, shardings, init, step_fn)


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
    mesh, rules, batch_sh = parallel.mesh_from_config(config)
    logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size,
                 jax.process_count())

    # ---------------------------------------------------------------- data
    dcfg = config.data
    start, stop = parallel.host_batch_slice(batch_sh, config.batch_size)
    train_src = sources.get_source(dcfg.name, dcfg.train_split, data_dir=dcfg.data_dir,
                                   demo_size=dcfg.demo_size, image_size=dcfg.image_size)
    eval_src = sources.get_source(dcfg.name, dcfg.eval_split, data_dir=dcfg.data_dir,
                                  demo_size=dcfg.demo_size, image_size=dcfg.image_size)
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

    # ---------------------------------------------------------------- model, frozen nets, state
    log = common.log_fn()
    t = build_training(config, mesh, rules, batch_sh)
    model, teacher, disc, frozen = t.model, t.teacher, t.disc, t.frozen
    abstract, shardings, init = t.abstract, t.shardings, t.init
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    rng = jax.random.key(config.seed)
    state, first_step = common.init_or_restore(checkpointer, abstract, shardings, init, rng,
                                               train_iter)
    if first_step == 0:
        state = load_initial_weights(config, state, log)
        trunk = load_disc_trunk(config, disc) if disc is not None else None
        if trunk is not None:
            state = state.replace(disc_params={**state.disc_params, "trunk": _put_like(
                trunk, state.disc_params["trunk"])})
            log(f"Discriminator trunk loaded from {config.discriminator.weights}.")
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Model %s: %.2fM parameters; starting at step %d.", config.model.name,
                 num_params / 1e6, first_step)

    # ---------------------------------------------------------------- steps
    feeder = feeding.Feeder(train_iter, batch_sh, config.batch_size)
    feeder_args = (batch_sh, config.eval_batch_size)
    ecfg = config.evaluation
    nets = (evaluator.load_metric_nets(ecfg, config.perceptual.weights, log)
            if ecfg.fid_every_steps > 0 else None)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step = lambda s, b: t.step_fn(s, b, frozen)  # noqa: E731
        eval_step = jax.jit(make_eval_step(model, teacher))

        probe = make_ar_probe(config, model, train_src, eval_ds, eval_batches, feeder_args,
                              mesh, rules, e_start, e_stop)

        def run_eval(state_, step_):
            params = state_.ema_params if state_.ema_params is not None else state_.params
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
        result = common.train_loop(config, workdir, state, first_step, train_step, feeder,
                                   train_iter, checkpointer, writer, run_eval)
    writer.close()
    return result


