"""GAN losses and regularisers for tokenizer training: pure, jit-safe, float32 functions.

Discriminator losses (lower is better for D), following the official TiTok / MaskBit
(`modeling/modules/losses.py`) and LlamaGen / GigaTok (`vq_loss.py`) definitions:

  hinge_d_loss           1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))   TiTok, GigaTok
  vanilla_d_loss         1/2 (mean softplus(-D(x)) + mean softplus(D(x_hat)))
  non_saturating_d_loss  the same as vanilla: 1/2 (BCE(D(x), 1) + BCE(D(x_hat), 0))

Generator losses:

  hinge_g_loss           -mean D(x_hat)                                         TiTok, GigaTok
  non_saturating_g_loss  mean softplus(-D(x_hat)) = BCE(D(x_hat), 1)

Every mean is over all logits of the batch (any logits shape). The released TiTok and GigaTok
recipes both use hinge for D and G. (LlamaGen's / GigaTok's `non-saturating` options call
`binary_cross_entropy_with_logits(ones_like(logits), logits)` with the arguments swapped, which
makes their D loss constant in the fake logits and their G loss equal to hinge plus a constant;
the functions here are the intended textbook ones.)

How the official recipes weight the terms (a trainer's business, recorded here):
  * TiTok: G term `discriminator_weight (0.01) * -mean D(x_hat)`; D loss
    `hinge_d_loss + 0.001 * lecam_loss`; both only from `discriminator_start` on (neither the G
    term nor the D update runs before it).
  * GigaTok: G term `0.5 * hinge_g_loss`; D loss `0.5 * hinge_d_loss` (the D loss is scaled by
    `disc_weight` too); both from step 20k; no LeCam.

LeCam (Tseng et al. 2021), TiTok's formula exactly: with EMAs of the batch-mean logits,
`relu(mean D(x) - ema_fake)^2 + relu(ema_real - mean D(x_hat))^2`, computed with the EMAs from
*before* this step; then each EMA becomes `ema * decay + mean * (1 - decay)` (decay 0.999,
EMAs start at 0, updated only on steps that train D). `lecam_loss(..., per_logit=True)` gives
the original lecam-gan / GigaTok form `mean relu(D(x) - ema_fake)^2 + mean relu(ema_real -
D(x_hat))^2` (per logit, not of the batch mean). GigaTok's LeCam (`LECAM_FORMS` "gigatok",
lecam-gan's own code as GigaTok's vq_loss.py copies it) also updates the EMAs *before* the loss
reads them, in every call of its hinge D loss (twice in a warm-up + GAN overlap step: the
reconstruction's logits, then the shortcut decoder's), with decay 0 until D's start + 1000
steps (`gigatok_lecam_decay`; so its initial 1000 never shows) and its `decay` (0.99) after,
and adds the term only from the step after D's start. In official TiTok the EMA is of
DDP-rank-0's local batch means (buffers are broadcast from rank 0); in GigaTok each rank keeps
its own; here it is of the global batch means.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

LeCamState = dict  # {"ema_real_logits_mean": f32 scalar, "ema_fake_logits_mean": f32 scalar}

# LeCam forms (discriminator.lecam_form): TiTok's and GigaTok's (see the module docstring).
LECAM_FORMS = ("titok", "gigatok")
# GigaTok's EMAs use decay 0 until D's start + this many steps (`ema_losses(start_itr=...)`).
GIGATOK_LECAM_DELAY = 1000


def _mean(x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.asarray(x, jnp.float32))


# --------------------------------------------------------------------------- D losses

def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    real = jnp.asarray(real_logits, jnp.float32)
    fake = jnp.asarray(fake_logits, jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def vanilla_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    real = jnp.asarray(real_logits, jnp.float32)
    fake = jnp.asarray(fake_logits, jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


def non_saturating_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Binary cross-entropy with targets 1 (real) and 0 (fake); equal to `vanilla_d_loss`."""
    return vanilla_d_loss(real_logits, fake_logits)


# --------------------------------------------------------------------------- G losses

def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    return -_mean(fake_logits)


def non_saturating_g_loss(fake_logits: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.softplus(-jnp.asarray(fake_logits, jnp.float32)))


D_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
    "non_saturating": non_saturating_d_loss,
}
G_LOSSES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "hinge": hinge_g_loss,
    "non_saturating": non_saturating_g_loss,
}


def d_loss_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in D_LOSSES:
        raise ValueError(f"Unknown discriminator loss {name!r}; "
                         f"expected one of {sorted(D_LOSSES)}.")
    return D_LOSSES[name]


def g_loss_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in G_LOSSES:
        raise ValueError(f"Unknown generator GAN loss {name!r}; "
                         f"expected one of {sorted(G_LOSSES)}.")
    return G_LOSSES[name]


# --------------------------------------------------------------------------- LeCam

def lecam_init(ema_real: float = 0.0, ema_fake: float = 0.0) -> LeCamState:
    """EMA state of the mean real / fake logits (TiTok starts both at 0; pass the official
    `ema_real_logits_mean` / `ema_fake_logits_mean` buffers to resume)."""
    return {"ema_real_logits_mean": jnp.asarray(ema_real, jnp.float32).reshape(()),
            "ema_fake_logits_mean": jnp.asarray(ema_fake, jnp.float32).reshape(())}


def lecam_update(state: LeCamState, real_logits: jax.Array, fake_logits: jax.Array,
                 decay: float | jax.Array = 0.999, rest: Optional[jax.Array] = None
                 ) -> LeCamState:
    """`ema * decay + mean(logits) * rest` for real and fake (no gradient flows); `rest`
    defaults to `1 - decay`.

    A Python-float `decay` has `1 - decay` formed in double precision, as in the official code
    (float32 `1 - 0.999` is off by 1.3e-5 relative); a traced `decay` works too."""
    if rest is None and isinstance(decay, (int, float)):
        rest = jnp.float32(1.0 - decay)
    elif rest is None:
        rest = 1.0 - jnp.asarray(decay, jnp.float32)
    decay = jnp.asarray(decay, jnp.float32)
    real = jax.lax.stop_gradient(_mean(real_logits))
    fake = jax.lax.stop_gradient(_mean(fake_logits))
    return {
        "ema_real_logits_mean": state["ema_real_logits_mean"] * decay + real * rest,
        "ema_fake_logits_mean": state["ema_fake_logits_mean"] * decay + fake * rest,
    }


def gigatok_lecam_decay(step: jax.Array, start_step: int, decay: float = 0.99
                        ) -> tuple[jax.Array, jax.Array]:
    """(decay, 1 - decay) of GigaTok's LeCam EMAs at `step`: (0, 1) until `start_step` +
    GIGATOK_LECAM_DELAY, then `decay` with its complement formed in double precision as
    upstream's Python floats."""
    late = jnp.asarray(step) >= start_step + GIGATOK_LECAM_DELAY
    return (jnp.where(late, jnp.float32(decay), jnp.float32(0.0)),
            jnp.where(late, jnp.float32(1.0 - decay), jnp.float32(1.0)))


def lecam_loss(real_logits: jax.Array, fake_logits: jax.Array, state: LeCamState,
               per_logit: bool = False) -> jax.Array:
    """Unweighted LeCam regulariser (TiTok multiplies it by 0.001). Use the state from before
    this step's `lecam_update` (TiTok's order). Gradients flow into the logits only."""
    ema_real = jax.lax.stop_gradient(jnp.asarray(state["ema_real_logits_mean"], jnp.float32))
    ema_fake = jax.lax.stop_gradient(jnp.asarray(state["ema_fake_logits_mean"], jnp.float32))
    real = jnp.asarray(real_logits, jnp.float32)
    fake = jnp.asarray(fake_logits, jnp.float32)
    if not per_logit:
        real, fake = jnp.mean(real), jnp.mean(fake)
    return (jnp.mean(jnp.square(jax.nn.relu(real - ema_fake)))
            + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake))))


# --------------------------------------------------------------------------- schedule

def gan_active(step: int | jax.Array, start_step: int | jax.Array) -> jax.Array:
    """1.0 from `start_step` on (`step >= start_step`, as in TiTok and GigaTok), else 0.0; a
    float32 scalar usable inside jit to gate the G term and the D update."""
    return (jnp.asarray(step) >= jnp.asarray(start_step)).astype(jnp.float32)


def discriminator_metrics(real_logits: jax.Array, fake_logits: jax.Array
                          ) -> Mapping[str, jax.Array]:
    """The official logging values: mean real / fake logits."""
    return {"logits_real": _mean(real_logits), "logits_fake": _mean(fake_logits)}
