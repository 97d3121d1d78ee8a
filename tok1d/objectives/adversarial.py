"""The GAN objective of tokenizer training: one object that owns the discriminator, its
optimizer, its sub-state (params, optimizer state, LeCam EMAs, other variable collections) and
its update.

The tokenizer trainer sees three things: `g_term` (the generator's adversarial term on the
reconstruction), `d_loss_and_grads` (the discriminator's loss on the detached outputs) and
`update` (the discriminator's optimizer step, LeCam EMAs, gated by `start_step`). The sub-state
lives in `TrainState.extras["gan"]` as a `GANState` (the objective is the train state's
`SubStateSpec` for it).

Discriminator calls of a tokenizer step, in the official order (GigaTok VQLoss), by the names
of their replayable DiffAugment draws (`DISC_CALLS`): the generator's D(x_hat) ("g/rec") and,
in a warm-up + GAN overlap step, its direct-term call ("g/direct"); the D step's fake, real and,
in an overlap step, direct-fake calls ("d/fake", "d/real", "d/direct"; fake / real in
`call_order`). The direct calls' input is `direct_fake`: the shortcut reconstruction
("shortcut", PatchGAN) or the reconstruction again ("reconstruction", the official dinodisc
branch).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from tok1d import images as images_lib
from tok1d import parallel
from tok1d.models.interfaces import Discriminator
from tok1d.objectives import augment, gan, losses
from tok1d.objectives import draws as draws_lib

DISC_CALLS = ("g/rec", "g/direct", "d/fake", "d/real", "d/direct")
DIRECT_FAKES = ("shortcut", "reconstruction")
CALL_ORDERS = {"fake_real": ("fake", "real"), "real_fake": ("real", "fake")}


@flax.struct.dataclass
class GANState:
    params: Any               # the discriminator's params
    opt_state: Any            # its optimizer state
    lecam: Any                # LeCam EMAs (`gan.lecam_init`)
    collections: Any = None   # its other variable collections (BatchNorm stats, spectral
                              # vectors), advanced by every call; None when it has none


def init_variables(disc: nn.Module, sample_images: jax.Array, rng: jax.Array
                   ) -> tuple[Any, Any]:
    """The discriminator's initial variables: (boxed params, its other collections or None)."""
    variables = dict(disc.init({"params": rng, "crop": rng}, sample_images))
    return variables.pop("params"), (variables or None)


def abstract_variables(disc: nn.Module, sample_images: jax.Array) -> tuple[Any, Any]:
    """`init_variables` as shapes (one trace of the discriminator's init)."""
    return jax.eval_shape(lambda r: init_variables(disc, sample_images, r), jax.random.key(0))


class GANObjective:
    """A discriminator trained against the tokenizer (hinge / non-saturating losses, optional
    LeCam and DiffAugment), with the official recipes' options:

    disc           the discriminator (`tok1d.models.interfaces.Discriminator`: TiTok NLayer,
                   PatchGAN, DINO), always applied with train=True as the official trainers do
    tx, schedule   its optimizer and LR schedule (`tok1d.train.optim.make_optimizer`)
    sample_images  (B, H, W, 3) zeros its variables are initialised with
    model_range    the tokenizer's pixel range (images are converted from it to the
                   discriminator's `pixel_range` where the two differ)
    loss           "hinge" | "non_saturating" (`gan.D_LOSSES` / `gan.G_LOSSES`)
    weight         the generator term's weight (`losses.gan`)
    d_weight       the discriminator loss's weight (GigaTok 0.5)
    start_step     neither the G term nor the D update runs before it
    lecam, lecam_decay   LeCam weight and EMA decay (TiTok 1e-3, 0.999; GigaTok 1e-3, 0.99)
    lecam_form     `gan.LECAM_FORMS`: "titok" (batch-mean logits, EMAs updated after the loss)
                   or "gigatok" (per logit, EMAs updated first in every D loss call, decay 0
                   until start_step + 1000, the term from the step after start_step)
    call_order     "fake_real" | "real_fake": the order of the D step's calls
    direct_fake    "shortcut" | "reconstruction" (see the module docstring)
    diffaug_prob, diffaug_cutout   DiffAugment before every call (0: off)
    abstract       `abstract_variables(disc, sample_images)`, where the caller has it already
    """

    def __init__(self, disc: Discriminator, *, tx: optax.GradientTransformation,
                 schedule: Callable[[Any], Any], sample_images: jax.Array,
                 model_range: tuple[float, float], loss: str = "hinge", weight: float = 1.0,
                 d_weight: float = 1.0, start_step: int = 0, lecam: float = 0.0,
                 lecam_decay: float = 0.999, lecam_form: str = "titok",
                 call_order: str = "fake_real",
                 direct_fake: str = "shortcut", diffaug_prob: float = 0.0,
                 diffaug_cutout: float = 0.0, abstract: Optional[tuple[Any, Any]] = None):
        if call_order not in CALL_ORDERS:
            raise ValueError(f"discriminator.call_order={call_order!r}; expected one of "
                             f"{sorted(CALL_ORDERS)}.")
        if lecam_form not in gan.LECAM_FORMS:
            raise ValueError(f"discriminator.lecam_form={lecam_form!r}; expected one of "
                             f"{gan.LECAM_FORMS}.")
        if direct_fake not in DIRECT_FAKES:
            raise ValueError(f"discriminator.direct_fake={direct_fake!r}; expected one of "
                             f"{DIRECT_FAKES}.")
        self.disc, self.tx, self.schedule = disc, tx, schedule
        self.sample_images, self.abstract = sample_images, abstract
        self.d_loss_fn, self.g_loss_fn = gan.d_loss_fn(loss), gan.g_loss_fn(loss)
        self.weight, self.d_weight, self.start_step = weight, d_weight, start_step
        self.lecam, self.lecam_decay, self.lecam_form = lecam, lecam_decay, lecam_form
        self.call_order, self.direct_fake = CALL_ORDERS[call_order], direct_fake
        self.diffaug_prob, self.diffaug_cutout = diffaug_prob, diffaug_cutout
        self.convert = tuple(disc.pixel_range) != tuple(model_range)
        self.to_disc = images_lib.range_converters(disc.pixel_range)[0]
        self.model_to_unit = images_lib.range_converters(model_range)[1]

    # ------------------------------------------------------------------ the sub-state

    def _variables(self, rng):
        return init_variables(self.disc, self.sample_images, rng)

    def abstract_and_shardings(self, mesh, rules) -> tuple[GANState, GANState]:
        boxed, collections = (self.abstract if self.abstract is not None
                              else abstract_variables(self.disc, self.sample_images))
        params, param_sh, opt_state, opt_sh = parallel.params_and_optimizer(
            lambda r: self._variables(r)[0], self.tx.init, mesh, rules, boxed=boxed)
        replicated = NamedSharding(mesh, P())
        collections = nn.unbox(collections)
        lecam = jax.eval_shape(gan.lecam_init)
        abstract = GANState(params=params, opt_state=opt_state, lecam=lecam,
                            collections=collections)
        shardings = GANState(
            params=param_sh,
            opt_state=opt_sh,
            lecam=jax.tree.map(lambda _: replicated, lecam),
            collections=jax.tree.map(lambda _: replicated, collections))
        return abstract, shardings

    def init(self, rng: jax.Array) -> GANState:
        params, collections = nn.unbox(self._variables(rng))
        return GANState(params=params, opt_state=self.tx.init(params), lecam=gan.lecam_init(),
                        collections=collections)

    def active(self, step: jax.Array) -> jax.Array:
        """1.0 from `start_step` on, else 0.0 (gates the G term and the D update)."""
        return gan.gan_active(step, self.start_step)

    # ------------------------------------------------------------------ calls

    def apply(self, params, collections, images, rng, draws=None, call=""):
        """(logits, new collections): one discriminator call in training mode on images in the
        tokenizer's range, DiffAugment first when `diffaug_prob` > 0. DiffAugment's uniforms
        are the step's replayable draws of the call named `call` (`DISC_CALLS`):
        "diffaug/<call>/flags" (3,) and "diffaug/<call>/rand01" (7, B), the official
        `torch.rand(3)` / `torch.rand(7, B, 1, 1)` of that call (`augment.draw_uniforms` from
        `rng` otherwise)."""
        if self.convert:
            images = self.to_disc(self.model_to_unit(images))
        k_aug, k_crop = jax.random.split(rng)
        if self.diffaug_prob > 0:
            fresh = augment.draw_uniforms(k_aug, images.shape[0])  # dead code when replayed
            flags = draws_lib.replay(draws, f"diffaug/{call}/flags", lambda: fresh[0])
            rand01 = draws_lib.replay(draws, f"diffaug/{call}/rand01", lambda: fresh[1])
            images = augment.diff_augment_with_uniforms(
                images, jnp.asarray(flags, jnp.float32), jnp.asarray(rand01, jnp.float32),
                prob=self.diffaug_prob, cutout=self.diffaug_cutout)
        if collections is None:
            return self.disc.apply({"params": params}, images, rngs={"crop": k_crop},
                                   train=True), None
        logits, new = self.disc.apply({"params": params, **collections}, images,
                                      rngs={"crop": k_crop}, mutable=list(collections),
                                      train=True)
        return logits, dict(new)

    def g_term(self, params, collections, fake, rng, draws=None, call="g/rec", active=None):
        """(unweighted generator loss of D(fake), new collections). In a step compiled before
        D's start (`active` a Python 0) D is not called: 0 (what upstream logs), the
        collections unchanged."""
        if losses.static_flag(active) is False:
            return jnp.zeros((), jnp.float32), collections
        logits, collections = self.apply(params, collections, fake, rng, draws, call)
        return self.g_loss_fn(logits), collections

    def d_loss(self, params, collections, lecam_state, real, fake, rng, direct=None,
               direct_on=0.0, draws=None, step=None):
        """The discriminator's loss on `real` and the detached `fake` (model range), called in
        `call_order`; in a warm-up + GAN overlap step (`direct_on` > 0) also on the detached
        `direct` fake with the same real logits (official VQLoss). `step`: the train step (the
        "gigatok" LeCam reads it). Returns (loss, (means, new collections)); means:
        logits_real, logits_fake, adv_loss, [shortcut_adv_loss, direct_logits_fake], [lecam]."""
        k_fake, k_real = jax.random.split(rng)
        inputs = {"fake": (fake, k_fake), "real": (real, k_real)}
        logits = {}
        for which in self.call_order:
            logits[which], collections = self.apply(params, collections, *inputs[which],
                                                    draws, f"d/{which}")
        real_logits, fake_logits = logits["real"], logits["fake"]
        loss = self.d_weight * self.d_loss_fn(real_logits, fake_logits)
        means = dict(logits_real=jnp.mean(real_logits), logits_fake=jnp.mean(fake_logits),
                     adv_loss=loss)
        if direct is not None:
            def direct_d_loss():
                lg, new = self.apply(params, collections, direct, jax.random.fold_in(rng, 2),
                                     draws, "d/direct")
                return (self.d_loss_fn(real_logits, lg), jnp.mean(lg)), new

            zero = jnp.zeros((), jnp.float32)
            (means["shortcut_adv_loss"], means["direct_logits_fake"]), collections = (
                losses.gated(direct_on > 0, direct_d_loss, lambda: ((zero, zero), collections)))
            means["shortcut_adv_loss"] = self.d_weight * means["shortcut_adv_loss"]
            loss = loss + means["shortcut_adv_loss"]
        if self.lecam and self.lecam_form == "gigatok":  # the EMAs this call advances first
            emas = self.advance_lecam(lecam_state, means, step, direct_on)
            means["lecam"] = (gan.lecam_loss(real_logits, fake_logits, emas, per_logit=True)
                              * (jnp.asarray(step) > self.start_step))
            loss = loss + self.lecam * means["lecam"]
        elif self.lecam:
            means["lecam"] = gan.lecam_loss(real_logits, fake_logits, lecam_state)
            loss = loss + self.lecam * means["lecam"]
        return loss, (means, collections)

    def d_loss_and_grads(self, state: GANState, collections, real, fake, rng, direct=None,
                         direct_on=0.0, draws=None, active=None, step=None):
        """`d_loss` and its gradients with respect to the discriminator's params:
        ((loss, (means, collections)), grads). In a step compiled before D's start (`active`
        a Python 0) D is not called, as upstream skips its step: zeros of the same structure
        and the collections unchanged."""
        def run():
            return jax.value_and_grad(self.d_loss, has_aux=True)(
                state.params, collections, state.lecam, real, fake, rng, direct, direct_on,
                draws, step)

        if losses.static_flag(active) is not False:
            return run()
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run))
        (loss, (means, _)), grads = zeros
        return (loss, (means, collections)), grads

    def advance_lecam(self, lecam, means, step=None, direct_on=0.0):
        """The LeCam EMAs after one D loss's mean logits (`means` of `d_loss`). The "gigatok"
        form's decay follows `step`, and in an overlap step (`direct_on` > 0) the EMAs advance
        again by the shortcut decoder's fake logits, as upstream's second D loss call does."""
        if self.lecam_form != "gigatok":
            return gan.lecam_update(lecam, means["logits_real"], means["logits_fake"],
                                    self.lecam_decay)
        if step is None:
            raise ValueError("the gigatok LeCam form needs the train step")
        decay, rest = gan.gigatok_lecam_decay(step, self.start_step, self.lecam_decay)
        lecam = gan.lecam_update(lecam, means["logits_real"], means["logits_fake"], decay, rest)
        if "direct_logits_fake" in means:
            again = gan.lecam_update(lecam, means["logits_real"], means["direct_logits_fake"],
                                     decay, rest)
            lecam = jax.tree.map(lambda a, b: jnp.where(direct_on > 0, a, b), again, lecam)
        return lecam

    def update(self, state: GANState, grads, means, collections, active, lecam
               ) -> tuple[GANState, dict[str, jax.Array]]:
        """The discriminator's optimizer step and LeCam EMA update, kept only when `active`
        (before `start_step` D is not trained: its optimizer count stays 0; `active` a traced
        0/1 float, or a Python number in a step compiled for one phase). `lecam`: the EMAs
        advanced microbatch by microbatch (`advance_lecam`). Returns (new state, scalars:
        d_grad_norm (before clipping), d_lr (the LR of this update; 0 when D is not
        trained))."""
        scalars = dict(d_grad_norm=optax.tree.norm(grads),
                       d_lr=active * self.schedule(schedule_count(state.opt_state)))
        static = losses.static_flag(active)
        if static is False:  # a step compiled before D's start
            return state, scalars
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = GANState(params=params, opt_state=opt_state, lecam=lecam, collections=collections)
        if static is None:
            on = active > 0
            new = jax.tree.map(lambda n, o: jnp.where(on, n, o), new, state)
        return new, scalars


def schedule_count(opt_state: Any) -> jax.Array:
    """The update count that an optimizer's LR schedule reads (its `ScaleByScheduleState`): the
    index of the optimizer's next update, whatever steps it skipped."""
    counts = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
              if any(getattr(k, "tuple_name", None) == "ScaleByScheduleState" for k in path)]
    if not counts:
        raise ValueError("the optimizer state holds no LR schedule count")
    return counts[0]
