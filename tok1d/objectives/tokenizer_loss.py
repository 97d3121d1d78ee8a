"""The tokenizer's training objective: the registered loss terms (`tok1d.objectives.terms`),
weighted by `config.losses`, plus the GAN objective's generator term and GigaTok's shortcut
term, in the official order of the discriminator calls.

    loss_fn(params, images, frozen, gan_state, collections, active, aux_on, rng, draws=None)
        -> (total, (terms, extras, outputs, new collections))

`images` in [0, 1]; `frozen` holds the frozen networks' params (teacher, perceptual: no
gradient, no optimizer state); `gan_state` the GAN sub-state (its params are read, not
differentiated) and `collections` the discriminator's current variable collections; `active`
gates the GAN term, `aux_on` the warm-up terms (each a traced 0/1 float32, or a Python 0.0 / 1.0
in a step compiled for one phase: what is off is then not in the program); `terms` are the unweighted values of every
enabled term; `outputs` holds the reconstruction ("pixels", the tokenizer's range), the codes ("codes", VQ
tokenizers) and, with
the shortcut term, the shortcut reconstruction ("shortcut_pixels", zeros while the warm-up is
off). A tokenizer whose quantizer keeps training state (clustering VQ) takes it as
`quantizer_state` (the collection "quantizer_state"); `outputs` then carries its new value
("quantizer_state") and the quantizer's param edits ("param_updates", see
`tok1d.models.quantizers.clustering`).

Replayable draws (`tok1d.objectives.draws`): the LPIPS dropout keep masks
"lpips_keep/rec/lin{k}" and "lpips_keep/shortcut/lin{k}", each (B, H_k, W_k, C_k) for VGG tap
k, used when the perceptual net has `lpips_dropout` > 0 (otherwise drawn with
`perceptual.bernoulli_keep`); TiTok stage 1's "proxy_codes", (B, h, w) integer codes (default:
the frozen teacher's encode); with DiffAugment, the G step's discriminator calls read
"diffaug/g/rec/*" and "diffaug/g/direct/*" (`GANObjective.apply`).

GigaTok's shortcut term (official VQLoss with `use_direct_rec_loss`), for x~ = the CNN decoder
on the encoder's map: w_l2 MSE(x, x~) + w_perceptual LPIPS(x, x~), plus in a step where the
warm-up and the GAN overlap the "direct" G term gan * G-loss(D(f)) of a second D call, f = x~
(`direct_fake` "shortcut") or the reconstruction again ("reconstruction"); `losses.shortcut`
scales the sum.
"""

from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tok1d import images as images_lib
from tok1d.models import quantizers
from tok1d.objectives import losses, terms as terms_lib
from tok1d.objectives.adversarial import GANObjective


# The quantizers' loss parts (`tok1d.models.interfaces.LOSS_PARTS`) and the term each belongs
# to: every part a quantizer reports is logged as quantizer_<part> while that term is weighted
# (an unweighted entropy term is not computed just for its log).
QUANTIZER_PARTS = {"codebook": "quantizer", "commitment": "quantizer",
                   "per_sample_entropy": "entropy", "codebook_entropy": "entropy"}


def make_loss_fn(model: nn.Module, weights: Mapping[str, float], nets: terms_lib.FrozenNets,
                 gan: Optional[GANObjective] = None):
    """The objective of `model` under the loss weights `weights` (`config.losses`); see the
    module docstring."""
    weights = terms_lib.enabled(weights)
    gan_weight = weights.pop("gan", 0.0)
    unknown = [k for k in weights if k not in terms_lib.TERMS]
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; registered: {sorted(terms_lib.TERMS)}")
    if gan_weight and gan is None:
        raise ValueError("losses.gan > 0 needs the GAN objective (a discriminator).")
    if not model.outputs_pixels:
        pixel_terms = [k for k in weights if "pixels" in terms_lib.TERMS[k].needs]
        if pixel_terms:
            raise ValueError(f"losses {pixel_terms} need pixel outputs; this model predicts "
                             "proxy codes (use losses.proxy_ce).")
    if "shortcut" in weights and not hasattr(model, "decode_cnn_map"):
        raise ValueError(f"losses.shortcut needs GigaTok's direct CNN decode (x~); a "
                         f"{type(model).__name__} has none: set losses.shortcut=0.")
    warmup = terms_lib.warmup_terms(weights)
    # the unweighted parts of the shortcut term (`shortcut_terms`)
    shortcut_parts = [k for k in ("l2", "l1", "perceptual") if k in weights] + (
        ["gan"] if gan is not None else [])
    to_model, to_unit = images_lib.range_converters(model.pixel_range)

    def shortcut_terms(params, cnn_map, ctx, gan_state, collections, active, rng, x_hat):
        """GigaTok's early-phase direct reconstruction x~: (weighted loss, unweighted parts,
        x~, collections)."""
        k_perc, k_disc = jax.random.split(rng)
        pixels = model.apply({"params": params}, cnn_map, method=model.decode_cnn_map)
        parts = {k: losses.RECONSTRUCTION_TERMS[k](pixels, ctx.x) for k in shortcut_parts
                 if k in losses.RECONSTRUCTION_TERMS}
        if "perceptual" in shortcut_parts:
            parts["perceptual"] = terms_lib.perceptual_value(ctx, pixels, "shortcut", k_perc)
        loss = losses.weighted_sum(weights, parts)
        if gan is not None:  # only called in an overlap step, after D(x_hat) (official order)
            def gan_on():
                fake = pixels if gan.direct_fake == "shortcut" else x_hat
                return gan.g_term(gan_state.params, collections, fake, k_disc, ctx.draws,
                                  "g/direct")

            parts["gan"], collections = losses.gated(
                active > 0, gan_on, lambda: (jnp.zeros((), jnp.float32), collections))
            if losses.static_flag(active) is not False:
                loss = loss + gan_weight * active * parts["gan"]
        return loss, parts, pixels, collections

    def loss_fn(params, images, frozen, gan_state, collections, active, aux_on, rng,
                draws=None, quantizer_state=None):
        rng, disc_rng = jax.random.split(rng)
        rec_rng, short_rng = jax.random.split(jax.random.fold_in(rng, 1))
        x = to_model(images)
        if quantizer_state is None:
            out, aux = model.apply({"params": params}, x, train=True, rngs={"sample": rng})
        else:  # a quantizer with training state (clustering VQ): its updates go to `outputs`
            (out, aux), updates = model.apply(
                {"params": params, quantizers.STATE: quantizer_state}, x, train=True,
                rngs={"sample": rng}, mutable=[quantizers.STATE, quantizers.UPDATES])
        ctx = terms_lib.Context(out=out, aux=aux, x=x, images=images, frozen=frozen, nets=nets,
                                draws=draws, rng=rec_rng, to_unit=to_unit)
        # a step compiled after the warm-up (aux_on a Python 0) computes no warm-up term
        skipped = warmup if losses.static_flag(aux_on) is False else set()
        terms = {k: (jnp.zeros((), jnp.float32) if k in skipped else terms_lib.TERMS[k].fn(ctx))
                 for k in weights if not terms_lib.TERMS[k].stateful}
        scale = {k: w * aux_on if k in warmup else w for k, w in weights.items()}
        if gan is not None:
            terms["gan"], collections = gan.g_term(gan_state.params, collections, out, disc_rng,
                                                   draws, "g/rec", active)
        outputs, extras = {"pixels": out}, {}
        if "shortcut" in weights:
            def shortcut_on():
                return shortcut_terms(params, aux.features["cnn_map"], ctx, gan_state,
                                      collections, active, short_rng, out)

            def shortcut_off():  # x~ decodes to the reconstruction's shape and dtype
                zero = jnp.zeros((), jnp.float32)
                return zero, {k: zero for k in shortcut_parts}, jnp.zeros_like(out), collections

            terms["shortcut"], parts, outputs["shortcut_pixels"], collections = losses.gated(
                aux_on > 0, shortcut_on, shortcut_off)
            extras.update({f"shortcut_{k}": v for k, v in parts.items()})
        total = losses.weighted_sum(scale, {k: v for k, v in terms.items() if k != "gan"})
        if gan is not None and losses.static_flag(active) is not False:  # traced: logged off
            total = total + gan_weight * active * terms["gan"]
        extras.update({f"quantizer_{part}": aux.losses[part]
                       for part, term in QUANTIZER_PARTS.items()
                       if term in weights and part in aux.losses})
        if aux.codes is not None:
            outputs["codes"] = aux.codes
        if quantizer_state is not None:
            outputs.update(quantizer_state=updates[quantizers.STATE],
                           param_updates=updates.get(quantizers.UPDATES, {}))
        return total, (terms, extras, outputs, collections)

    loss_fn.warmup_terms = warmup
    return loss_fn
