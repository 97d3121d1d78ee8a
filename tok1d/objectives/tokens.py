"""The generators' training objectives on tokenizer codes, chosen by `model.objective`
(`tok1d.models.interfaces.Generator`):

  masked      MaskGIT (bytedance/1d-tokenizer `ImageBert.masking_input_tokens` + `MLMLoss`): a
              schedule-drawn fraction of every sequence is replaced by [MASK]; label-smoothed
              cross-entropy, unmasked positions down-weighted (`masked_token_loss`)
  next_token  LlamaGen (train_c2i.py): teacher-forced cross-entropy (`next_token_loss`)
  permuted_next_token
              RAR (bytedance/1d-tokenizer `RAR.forward` + `ARLoss`): each training sequence is
              read in a random order with probability `random_ratio(step)` (annealed from 1 to
              0, `random_orders`), else in raster order; next-token cross-entropy in that order

All drop class labels to the null class for classifier-free guidance (`drop_labels`).

    loss_fn = make_loss_fn(model, gcfg)      # gcfg: config.generator
    loss, metrics = loss_fn(params, batch, rng, train, step)   # step: the 0-based train step

Replayable draws (`tok1d.objectives.draws`), each with a leading batch axis: "drop_labels" /
"drop_rand_u" (`drop_labels`, training only); for "masked", "mask_timesteps_u" /
"mask_rand_u" (`random_mask`); for "permuted_next_token", "orders" / "order_rand_u" /
"order_perms" (`random_orders`, training only).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tok1d.objectives import draws as draws_lib
from tok1d.objectives.draws import Draw, fresh

# --------------------------------------------------------------------------- labels


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float, null_label: int,
                draw: Draw = fresh) -> jax.Array:
    """Replaces each label by `null_label` with probability `prob` (classifier-free guidance
    training: the same network learns the conditional and the unconditional model).

    As upstream (TiTok's `ImageBert.forward`, LlamaGen's `LabelEmbedder.token_drop`), label b
    is dropped iff u_b < prob for a float32 uniform u_b. Random draws, by name (see `Draw`):
      "drop_labels"  (B,) bool / 0-1 ints: which labels are dropped (the outcome itself; when
                     given it is used even with prob 0, like upstream's `force_drop_ids`)
      "drop_rand_u"  (B,) float32 uniform in [0, 1): the u_b (read when "drop_labels" is not)
    """
    def from_uniform() -> jax.Array:
        if prob <= 0.0:
            return jnp.zeros(labels.shape, bool)
        u = draw("drop_rand_u", lambda: jax.random.uniform(rng, labels.shape, jnp.float32))
        return u < prob

    drop = draw("drop_labels", from_uniform).astype(bool)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


# --------------------------------------------------------------------------- masked (MaskGIT)


def _xp(r: Any):
    return jnp if isinstance(r, jax.Array) else np


def mask_ratio(schedule: str, r: Any) -> Any:
    """Fraction of tokens that are masked at progress r in [0, 1] (1 at r = 0, 0 at r = 1), for
    the training masks and MaskGIT's decoding (`tok1d.generation.maskgit`).

    arccos  arccos(r) / (pi/2)   the official TiTok schedule (training and sampling)
    cosine  cos(pi/2 * r)        MaskGIT's default
    linear  1 - r
    square  1 - r^2              (MaskGIT "pow" with exponent 2)
    cubic   1 - r^3
    sqrt    1 - sqrt(r)

    Works on NumPy values / Python floats (float64) and on JAX arrays.
    """
    xp = _xp(r)
    if schedule == "arccos":
        return xp.arccos(r) / (math.pi * 0.5)
    if schedule == "cosine":
        return xp.cos(math.pi * 0.5 * r)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "square":
        return 1.0 - r ** 2
    if schedule == "cubic":
        return 1.0 - r ** 3
    if schedule == "sqrt":
        return 1.0 - xp.sqrt(r)
    raise ValueError(f"Unknown mask schedule {schedule!r}; expected one of "
                     "arccos, cosine, linear, square, cubic, sqrt.")


def random_mask(rng: jax.Array, codes: jax.Array, mask_id: int, schedule: str = "arccos",
                min_ratio: float = 1e-6, *, draw: Draw = fresh
                ) -> tuple[jax.Array, jax.Array]:
    """Official training masks (`ImageBert.masking_input_tokens`): per sample a float32
    t ~ U(0, 1), ratio = schedule(t) clamped to [min_ratio, 1], n = round(N * ratio) (half to
    even, at least 1); then rank = argsort(u) of a (B, N) uniform u and position j is masked iff
    rank[j] < n -- the argsort *output* is compared with n (a uniformly random set of n
    positions, not "the n smallest u"). Returns (tokens with masked positions = `mask_id`,
    boolean mask (B, N)).

    Random draws, by name (see `Draw`): "mask_timesteps_u" (B,) float32 t, "mask_rand_u"
    (B, N) float32 u."""
    b, n = codes.shape
    k_t, k_perm = jax.random.split(rng)
    t = draw("mask_timesteps_u", lambda: jax.random.uniform(k_t, (b,), jnp.float32))
    u = draw("mask_rand_u", lambda: jax.random.uniform(k_perm, (b, n), jnp.float32))
    ratio = jnp.clip(mask_ratio(schedule, t.astype(jnp.float32)), min_ratio, 1.0)
    num = jnp.maximum(jnp.round(n * ratio), 1.0)
    rank = jnp.argsort(u, axis=-1)
    masked = rank < num[:, None]
    return jnp.where(masked, jnp.asarray(mask_id, codes.dtype), codes), masked


def masked_token_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array,
                      label_smoothing: float = 0.1, unmasked_weight: float = 0.1
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Official `MLMLoss`: cross-entropy with label smoothing (PyTorch convention: the target
    distribution is (1 - eps) one-hot + eps / K uniform) on all N positions, weighted 1 on masked
    and `unmasked_weight` on unmasked positions, normalised by the sum of the weights.

    metrics: `loss` and `masked_accuracy` (argmax accuracy over the masked positions, averaged
    per sample, then over the batch, as the official `correct_tokens`)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    m = masked.astype(jnp.float32)
    w = (1.0 - m) * unmasked_weight + m
    loss = jnp.sum(ce * w) / (jnp.sum(w) + 1e-8)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * m
    acc = jnp.mean(jnp.sum(correct, axis=1) / (jnp.sum(m, axis=1) + 1e-8))
    return loss, {"loss": loss, "masked_accuracy": acc}


# --------------------------------------------------------------------------- next token (GPT)


def next_token_loss(logits: jax.Array, codes: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Mean cross-entropy of teacher-forced logits (B, N, V) against the codes (B, N)
    (LlamaGen: plain CE, mean over all positions), and the top-1 accuracy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), codes)
    acc = jnp.mean((jnp.argmax(logits, -1) == codes).astype(jnp.float32))
    return jnp.mean(ce), dict(accuracy=acc)


# --------------------------------------------------------------------------- permuted (RAR)


def random_ratio(step: Any, start: int, end: int) -> Any:
    """RAR's randomness annealing (`get_rar_random_ratio`): the probability that a training
    sequence is permuted at (0-based) step `step`: 1 before `start`, 1 - (step - start) /
    (end - start) from `start` to `end`, 0 after `end` (for end <= start: 1 before `start`,
    0 from it). Works on Python numbers (float64) and on JAX arrays (float32)."""
    if end <= start:
        return _xp(step).where(step < start, 1.0, 0.0)
    xp = _xp(step)
    # (end - step) / (end - start): one rounding of the exact fraction, also near `end` in
    # float32 (1 - (step - start) / (end - start) there loses the last digits: 1.5974e-5 for
    # upstream's 1.6e-5 one step before the end of RAR's schedule)
    remaining = end - xp.asarray(step, xp.float32 if xp is jnp else xp.float64)
    return xp.clip(remaining / (end - start), 0.0, 1.0)


def random_orders(rng: jax.Array, batch: int, length: int, ratio: Any, *,
                  draw: Draw = fresh) -> jax.Array:
    """Official `RAR.sample_orders`: per sequence, with probability `ratio` a uniformly random
    permutation of the `length` positions, else the raster order -> orders (B, N) int32.

    Random draws, by name (see `Draw`):
      "orders"        (B, N) ints: the orders themselves (the outcome; used as given)
      "order_rand_u"  (B,) float32 uniform in [0, 1): sequence b is permuted iff u_b < ratio
                      (upstream's `random.random()`)
      "order_perms"   (B, N) ints: the permutation a permuted sequence uses (upstream's
                      `torch.randperm`; ignored for the raster sequences)
    (the last two are read when "orders" is not)."""
    def drawn() -> jax.Array:
        k_u, k_perm = jax.random.split(rng)
        u = draw("order_rand_u", lambda: jax.random.uniform(k_u, (batch,), jnp.float32))
        perms = draw("order_perms", lambda: jnp.argsort(
            jax.random.uniform(k_perm, (batch, length), jnp.float32), axis=-1))
        raster = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return jnp.where((u < ratio)[:, None], jnp.asarray(perms, jnp.int32), raster)

    return jnp.asarray(draw("orders", drawn), jnp.int32)


# --------------------------------------------------------------------------- the loss function


def make_loss_fn(model: nn.Module, gcfg) -> Callable[..., tuple[jax.Array, dict[str, Any]]]:
    """(params, batch, rng, train, step=0) -> (loss, metrics) of `model.objective`, with the
    options of `gcfg` (config.generator: label_dropout; for "masked" mask_schedule,
    label_smoothing, unmasked_weight; for "permuted_next_token" randomness_anneal_start /
    _end, read at `step`, the 0-based train step). Training drops labels to the null class with
    probability `label_dropout` (and permutes RAR's sequences); evaluation (train=False) keeps
    them, reads raster order and uses no dropout.

    `batch`: "codes" (B, N) ints, "label" (B,) ints and optionally "draws", the official random
    draws to replay instead of drawing (see the module docstring)."""
    objective = model.objective

    def loss_fn(params, batch, rng, train: bool, step: Any = 0):
        codes = batch["codes"].astype(jnp.int32)
        labels = batch["label"].astype(jnp.int32)
        draw = draws_lib.drawer(draws_lib.of_batch(batch))
        k_label, k_mask, k_dropout = jax.random.split(rng, 3)
        if train:
            labels = drop_labels(k_label, labels, gcfg.label_dropout, model.null_label,
                                 draw=draw)
        rngs = {"dropout": k_dropout}
        if objective == "masked":
            tokens, masked = random_mask(k_mask, codes, model.mask_id, gcfg.mask_schedule,
                                         draw=draw)
            logits = model.apply({"params": params}, tokens, labels, train=train, rngs=rngs)
            return masked_token_loss(logits, codes, masked, gcfg.label_smoothing,
                                     gcfg.unmasked_weight)
        if objective == "permuted_next_token":
            ratio = random_ratio(jnp.asarray(step), gcfg.randomness_anneal_start,
                                 gcfg.randomness_anneal_end)
            orders = None
            if train:
                orders = random_orders(k_mask, *codes.shape, ratio, draw=draw)
            logits = model.apply({"params": params}, codes, labels, train=train, rngs=rngs,
                                 orders=orders)
            targets = codes if orders is None else jnp.take_along_axis(codes, orders, axis=1)
            loss, metrics = next_token_loss(logits, targets)
            return loss, ({**metrics, "random_ratio": ratio} if train else metrics)
        logits = model.apply({"params": params}, codes, labels, train=train, rngs=rngs)
        return next_token_loss(logits, codes)

    return loss_fn
