"""The tokenizer's loss terms, as a registry: each term is registered once with what it needs
and whether it is a warm-up term; the config's `losses` table weighs them (weight 0: the term
is never computed). Config validation (`problems`) and the tokenizer objective
(`tok1d.objectives.tokenizer_loss`) both read this registry.

Adding a term is one registered function plus one config weight:

    @terms.register("tv", needs=("pixels",))
    def total_variation(ctx: terms.Context) -> jax.Array:
        return jnp.mean(jnp.abs(jnp.diff(ctx.out, axis=1)))

    config.losses.tv = 0.1

Needs (checked at start-up and when the objective is built):
  pixels         the tokenizer outputs pixels (not TiTok stage 1's proxy-code logits)
  teacher:NAME   the frozen teacher `teacher.name` = NAME (its module and params in the context)
  perceptual     the perceptual network (`perceptual.kind`)
  discriminator  the GAN objective (`tok1d.objectives.adversarial`)
  model          the tokenizer computes the term itself (`aux.losses[name]`)
  shortcut       the tokenizer has a shortcut decoder (GigaTok's CNN decoder on the CNN map)
Warm-up terms apply while step < `aux_loss_end_step`.

Terms with `stateful=True` ("gan", "shortcut") call the discriminator, whose collections the
objective threads through the calls in the official order; their computation lives in the
tokenizer objective, their declaration here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax

from tok1d.models.frozen.dinov2 import preprocess_gigatok
from tok1d.models.interfaces import TokenizerAux
from tok1d.objectives import draws as draws_lib
from tok1d.objectives import losses
from tok1d.objectives import perceptual as perceptual_lib


@dataclasses.dataclass
class Context:
    """What a term reads, built once per forward inside the traced loss.

    out      the tokenizer's output: pixels in its range, or proxy-code logits
    aux      its TokenizerAux (codes, the losses it computes itself, named features)
    x        the input in the tokenizer's range; images: the input in [0, 1]
    frozen   the frozen networks' params {"teacher": ..., "perceptual": ...}
    nets     the frozen networks' modules (`FrozenNets`)
    draws    the batch's recorded random draws (or None)
    rng      the key for the reconstruction terms' randomness (LPIPS dropout)
    to_unit  the tokenizer's range -> [0, 1]
    """
    out: jax.Array
    aux: TokenizerAux
    x: jax.Array
    images: jax.Array
    frozen: Mapping[str, Any]
    nets: "FrozenNets"
    draws: Optional[Mapping[str, Any]]
    rng: jax.Array
    to_unit: Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FrozenNets:
    """The frozen networks' modules (their params travel separately, as `frozen`)."""
    teacher: Any = None     # an nn.Module: MaskGIT-VQGAN (proxy codes) or DINOv2 (semantic)
    teacher_name: str = ""
    perceptual: Optional[perceptual_lib.PerceptualLoss] = None


@dataclasses.dataclass(frozen=True)
class Term:
    name: str
    fn: Optional[Callable[[Context], jax.Array]]  # None for the stateful terms
    needs: tuple[str, ...]
    warmup: bool
    stateful: bool
    doc: str


TERMS: dict[str, Term] = {}


# What a term may need: the model's pixel outputs, the model itself (its own auxiliary loss),
# the discriminator, the perceptual network, GigaTok's shortcut decode; or "teacher:NAME".
NEEDS = ("pixels", "model", "discriminator", "perceptual", "shortcut")


def register(name: str, *, needs: tuple[str, ...] = (), warmup: bool = False,
             stateful: bool = False):
    """Decorator: registers `fn(ctx) -> unweighted scalar` as the loss term `name`; `needs`
    among NEEDS (a misspelt one skipped its check: "pixel" for "pixels")."""
    unknown = [n for n in needs if n not in NEEDS and not n.startswith("teacher:")]
    if unknown:
        raise ValueError(f"loss term {name!r}: needs {unknown} unknown (known: "
                         f"{', '.join(NEEDS)}, teacher:NAME)")

    def deco(fn):
        if name in TERMS:
            raise ValueError(f"loss term {name!r} is registered twice (a notebook cell run "
                             f"again: `del tok1d.objectives.terms.TERMS[{name!r}]` first)")
        TERMS[name] = Term(name, None if stateful else fn, tuple(needs), warmup, stateful,
                           (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


def enabled(weights: Mapping[str, float]) -> dict[str, float]:
    """The nonzero weights of `config.losses`, in order."""
    return {k: float(v) for k, v in weights.items() if v}


def warmup_terms(weights: Mapping[str, float]) -> set[str]:
    """The enabled registered warm-up terms of `config.losses` (applied while step <
    `aux_loss_end_step`)."""
    return {k for k in enabled(weights) if k in TERMS and TERMS[k].warmup}


def problems(weights: Mapping[str, float], teacher_name: str, aux_loss_end_step: int
             ) -> list[str]:
    """Start-up checks of a `losses` table against the registry (one line per problem)."""
    out = []
    for name, w in enabled(weights).items():
        term = TERMS.get(name)
        if term is None:
            out.append(f"losses.{name}={w} is not a registered loss term ({sorted(TERMS)})")
            continue
        for need in term.needs:
            if need.startswith("teacher:") and teacher_name != need[8:]:
                out.append(f"losses.{name}={w} needs teacher.name={need[8:]!r} "
                           f"(got {teacher_name!r})")
        if term.warmup and aux_loss_end_step <= 0:
            out.append(f"losses.{name}={w} is a warm-up term but aux_loss_end_step="
                       f"{aux_loss_end_step}: it would never apply (set losses.{name}=0 or "
                       "aux_loss_end_step > 0)")
    return out


def perceptual_value(ctx: Context, pixels: jax.Array, call: str, rng: jax.Array) -> jax.Array:
    """The perceptual loss of `pixels` (the tokenizer's range) against the input; with LPIPS
    dropout its keep masks are the draws "lpips_keep/<call>/lin<k>" (`call`: "rec" for the
    reconstruction, "shortcut" for GigaTok's shortcut reconstruction)."""
    net = ctx.nets.perceptual
    keep = None
    if net.lpips_dropout:
        default = perceptual_lib.bernoulli_keep(rng, net.lpips_dropout)
        keep = lambda k, shape: draws_lib.replay(  # noqa: E731
            ctx.draws, f"lpips_keep/{call}/lin{k}", lambda: default(k, shape))
    return net.apply(ctx.frozen["perceptual"], ctx.to_unit(pixels), ctx.images, keep)


# ------------------------------------------------------------------------- pixel terms

@register("l2", needs=("pixels",))
def l2(ctx: Context) -> jax.Array:
    """Mean squared error of the reconstruction, in the tokenizer's range."""
    return losses.l2_loss(ctx.out, ctx.x)


@register("l1", needs=("pixels",))
def l1(ctx: Context) -> jax.Array:
    """Mean absolute error of the reconstruction, in the tokenizer's range."""
    return losses.l1_loss(ctx.out, ctx.x)


@register("perceptual", needs=("pixels", "perceptual"))
def perceptual(ctx: Context) -> jax.Array:
    """`perceptual.kind` network loss (LPIPS and/or ConvNeXt-S logits) on [0, 1] images."""
    return perceptual_value(ctx, ctx.out, "rec", ctx.rng)


# ------------------------------------------------------------------------- teacher terms

def teacher_codes(ctx: Context) -> jax.Array:
    """TiTok stage 1's targets: the frozen MaskGIT-VQGAN's (B, h, w) codes."""
    teacher = ctx.nets.teacher
    if teacher is None:
        raise ValueError("losses.proxy_ce needs the teacher (teacher.name='maskgit_vqgan') or "
                         "the draw 'proxy_codes' in the batch.")
    codes = teacher.apply({"params": ctx.frozen["teacher"]}, ctx.images, method=teacher.encode)
    return jax.lax.stop_gradient(codes)


@register("proxy_ce", needs=("teacher:maskgit_vqgan",))
def proxy_ce(ctx: Context) -> jax.Array:
    """TiTok stage 1: cross-entropy of the decoder's logits against the teacher's codes (the
    replayable draw "proxy_codes" when the batch carries it)."""
    codes = draws_lib.replay(ctx.draws, "proxy_codes", lambda: teacher_codes(ctx))
    return losses.proxy_code_ce(ctx.out, codes)


@register("semantic", needs=("teacher:dinov2",))
def semantic(ctx: Context) -> jax.Array:
    """GigaTok: mean -cos(decoder features, DINOv2 patch tokens on a sqrt(N) x sqrt(N) grid,
    224 px for N = 256, GigaTok's preprocessing)."""
    if "semantic_features" not in ctx.aux.features:
        raise ValueError("losses.semantic needs a tokenizer with a semantic head (gigatok with "
                         "distill_depth > 0).")
    feats = ctx.aux.features["semantic_features"]
    teacher = ctx.nets.teacher
    grid = int(round(feats.shape[1] ** 0.5))
    pixels = preprocess_gigatok(ctx.images * 2.0 - 1.0, size=grid * teacher.patch_size)
    target = teacher.apply({"params": ctx.frozen["teacher"]}, pixels)["patch_tokens"]
    return losses.semantic_cosine(feats, jax.lax.stop_gradient(target))


# ------------------------------------------------------------------------- model terms

def _model_term(name: str, doc: str, warmup: bool = False):
    def fn(ctx: Context) -> jax.Array:
        if name not in ctx.aux.losses:
            raise ValueError(f"losses.{name} is not computed by this tokenizer (it provides "
                             f"{sorted(ctx.aux.losses)}).")
        return ctx.aux.losses[name]
    fn.__doc__ = doc
    register(name, needs=("model",), warmup=warmup)(fn)


_model_term("quantizer", "VQ codebook + commitment loss (the quantizer's).")
_model_term("entropy", "Code-usage entropy loss (GigaTok).")
_model_term("kl", "VAE KL divergence (TiTok VAE).")
_model_term("fea_rec", "GigaTok warm-up: MSE(transformer-decoder grid, sg(CNN-encoder map)).",
            warmup=True)


# ------------------------------------------------------------------------- stateful terms

@register("gan", needs=("pixels", "discriminator"), stateful=True)
def _gan(ctx: Context) -> jax.Array:
    """Generator term of the GAN objective on the reconstruction (from its start step)."""


@register("shortcut", needs=("pixels", "shortcut"), warmup=True, stateful=True)
def _shortcut(ctx: Context) -> jax.Array:
    """GigaTok warm-up: the CNN decoder on the CNN-encoder map, l2 + perceptual (+ the direct
    GAN term where the warm-up and the GAN overlap)."""

