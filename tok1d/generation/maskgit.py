"""MaskGIT iterative parallel decoding (TiTok's generators).

Reproduces bytedance/1d-tokenizer `ImageBert.generate` as one jitted program (a
`lax.fori_loop` over the decoding steps); the training masks and loss are in
`tok1d.objectives.tokens` (objective "masked"), with the mask schedules (`mask_ratio`).

Models are "masked" generators (`tok1d.models.interfaces.MaskedGenerator`):
`model.apply({"params": p}, tokens, labels) -> (B, N, K) logits`, `model.mask_id` (= K),
`model.null_label` (the unconditional label).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.generation import guidance
from tok1d.objectives.tokens import mask_ratio

# --------------------------------------------------------------------------- sampling

GUIDANCE_SCHEDULES = ("constant", "linear", "power-cosine")


def gumbel_noise(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """-log(-log(u)) with the official clamps (log(max(x, 1e-20)))."""
    u = jax.random.uniform(rng, shape, jnp.float32)
    log = lambda x: jnp.log(jnp.maximum(x, 1e-20))  # noqa: E731
    return -log(-log(u))


def step_tables(num_tokens: int, num_steps: int, guidance_scale: float, guidance_schedule: str,
                guidance_pow: float, randomize_temperature: float, softmax_annealing: bool,
                mask_schedule: str) -> dict[str, np.ndarray]:
    """Per-step constants of the official `generate`, computed as it does (float64 / Python
    floats, the power-cosine scale in float32 as torch does), step i = 0..T-1, r = (i+1)/T:

    guidance    constant: g; linear: (i/T)·g (0 at step 0 = conditional pass only);
                power-cosine: 1 + (g-1)·(1 - cos(pi·(i/T)^pow))/2
    gumbel_temp randomize_temperature·(1 - r)
    softmax_temp  0.5 + 0.8·(1 - r) with annealing, else 1
    mask_len    floor(N·mask_ratio(r)) (clamped later by the number of masked positions)
    """
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"Unknown guidance schedule {guidance_schedule!r}; expected one of "
                         f"{GUIDANCE_SCHEDULES}.")
    if guidance_schedule == "power-cosine" and not 0 <= guidance_pow < np.inf:
        raise ValueError(f"sampling.guidance_pow must be a finite number >= 0, got "
                         f"{guidance_pow}.")  # (a negative power divides by 0 at step 0)
    steps = np.arange(num_steps)
    ratio = (steps + 1) / num_steps
    if guidance_schedule == "constant":
        scale = np.full(num_steps, guidance_scale, np.float64)
    elif guidance_schedule == "linear":
        scale = steps / num_steps * guidance_scale
    else:
        scale = guidance.power_cosine(num_steps, guidance_scale, guidance_pow)
    mask_len = np.floor(num_tokens * np.asarray(mask_ratio(mask_schedule, ratio), np.float64))
    soft = 0.5 + 0.8 * (1.0 - ratio) if softmax_annealing else np.ones(num_steps)
    return dict(guidance=scale.astype(np.float32),
                gumbel_temp=(randomize_temperature * (1.0 - ratio)).astype(np.float32),
                softmax_temp=soft.astype(np.float32), mask_len=mask_len.astype(np.int32))


def guided_logits(model: Any, params: Any, ids: jax.Array, labels: jax.Array, scale: jax.Array,
                  schedule: str) -> jax.Array:
    """One forward over the doubled batch [labels; null] and the official combination:
    constant/linear c + s(c - u), power-cosine u + s(c - u)."""
    b = ids.shape[0]
    null = jnp.full_like(labels, model.null_label)
    both = model.apply({"params": params}, jnp.concatenate([ids, ids]),
                       jnp.concatenate([labels, null]))
    cond, uncond = both[:b], both[b:]
    if schedule == "power-cosine":
        return uncond + (cond - uncond) * scale
    return cond + (cond - uncond) * scale


def decode_step(ids: jax.Array, logits: jax.Array, rng: jax.Array, gumbel_temp: jax.Array,
                mask_len: jax.Array, mask_id: int, last: jax.Array) -> jax.Array:
    """One official re-masking step on (already guided and annealed) logits: sample ids with
    Gumbel noise of temperature `gumbel_temp`, keep already-decoded ids (confidence +inf),
    re-mask the `mask_len` least confident positions (confidence + fresh Gumbel noise; the count
    is clamped to [1, #masked of batch element 0 - 1]; ties at the cut-off are re-masked too),
    keep everything at the `last` step."""
    k_ids, k_conf = jax.random.split(rng)
    is_mask = ids == mask_id
    noisy = logits + gumbel_temp * gumbel_noise(k_ids, logits.shape)
    sampled = jnp.argmax(noisy, axis=-1).astype(ids.dtype)
    sampled_logits = jnp.take_along_axis(logits, sampled[..., None], axis=-1)[..., 0]
    sampled = jnp.where(is_mask, sampled, ids)
    sampled_logits = jnp.where(is_mask, sampled_logits, jnp.inf)
    n_masked0 = jnp.sum(is_mask[0]).astype(jnp.int32)
    n = jnp.maximum(1, jnp.minimum(n_masked0 - 1, mask_len))
    confidence = sampled_logits + gumbel_temp * gumbel_noise(k_conf, sampled_logits.shape)
    cut_off = jnp.sort(confidence, axis=-1)[:, n - 1]
    remask = (confidence <= cut_off[:, None]) & ~last
    return jnp.where(remask, jnp.asarray(mask_id, ids.dtype), sampled)


def _sample(model: Any, params: Any, labels: jax.Array, rng: jax.Array, *, num_steps: int,
            guidance_scale: float, guidance_schedule: str, guidance_pow: float,
            randomize_temperature: float, softmax_annealing: bool, mask_schedule: str
            ) -> jax.Array:
    tables = step_tables(model.num_tokens, num_steps, guidance_scale, guidance_schedule,
                         guidance_pow, randomize_temperature, softmax_annealing, mask_schedule)
    t = {k: jnp.asarray(v) for k, v in tables.items()}
    any_guidance = bool(np.any(tables["guidance"] != 0))
    labels = labels.astype(jnp.int32)
    ids0 = jnp.full((labels.shape[0], model.num_tokens), model.mask_id, jnp.int32)

    def cond_only(ids):
        return model.apply({"params": params}, ids, labels)

    def body(i, ids):
        scale = t["guidance"][i]
        if any_guidance:
            logits = jax.lax.cond(
                scale != 0,
                lambda x: guided_logits(model, params, x, labels, scale, guidance_schedule),
                cond_only, ids)
        else:
            logits = cond_only(ids)
        logits = logits / t["softmax_temp"][i]
        return decode_step(ids, logits, jax.random.fold_in(rng, i), t["gumbel_temp"][i],
                           t["mask_len"][i], model.mask_id, i == num_steps - 1)

    return jax.lax.fori_loop(0, num_steps, body, ids0)


_STATIC = ("model", "num_steps", "guidance_scale", "guidance_schedule", "guidance_pow",
           "randomize_temperature", "softmax_annealing", "mask_schedule")
_sample_jit = jax.jit(_sample, static_argnames=_STATIC)


def sample(model: Any, params: Any, labels: jax.Array, rng: jax.Array, *, num_steps: int = 8,
           guidance_scale: float = 0.0, guidance_schedule: str = "constant",
           guidance_pow: float = 3.0, randomize_temperature: float = 0.0,
           softmax_annealing: bool = False, mask_schedule: str = "arccos") -> jax.Array:
    """Official MaskGIT iterative parallel decoding (`ImageBert.generate`) -> ids (B, N) int32
    in [0, K). Starts from all [MASK]; step i = 0..T-1 with r = (i+1)/T:

    1. guidance scale s from `guidance_schedule` (see `step_tables`); s != 0: conditional and
       unconditional logits from one forward over [labels; null labels], combined as
       c + s(c - u) (constant, linear) or u + s(c - u) (power-cosine); s = 0: conditional only;
    2. `softmax_annealing`: logits /= 0.5 + 0.8(1 - r);
    3. `decode_step` with Gumbel temperature randomize_temperature·(1 - r) and
       floor(N·mask_ratio(mask_schedule, r)) positions to re-mask.

    Step i draws its noise from `fold_in(rng, i)` (split into the id-sampling and the
    confidence noise). All settings are static (one compilation per setting).
    """
    return _sample_jit(model, params, labels, rng, num_steps=num_steps,
                       guidance_scale=float(guidance_scale), guidance_schedule=guidance_schedule,
                       guidance_pow=float(guidance_pow),
                       randomize_temperature=float(randomize_temperature),
                       softmax_annealing=bool(softmax_annealing), mask_schedule=mask_schedule)


# The settings of `make_sampler` (keyword arguments of `sample`) and their defaults.
SAMPLER_DEFAULTS = dict(num_steps=8, guidance_scale=0.0, guidance_schedule="constant",
                        guidance_pow=3.0, randomize_temperature=0.0, softmax_annealing=False,
                        mask_schedule="arccos")


def make_sampler(model: Any, **kwargs: Any):
    """A jitted `fn(params, labels, rng) -> ids` with the `sample` settings (keyword arguments
    of `sample`, `SAMPLER_DEFAULTS`) fixed."""
    settings = dict(SAMPLER_DEFAULTS)
    unknown = set(kwargs) - set(settings)
    if unknown:
        raise ValueError(f"Unknown sampler argument(s) {sorted(unknown)}; valid: "
                         f"{sorted(settings)}.")
    settings.update(kwargs)
    step_tables(model.num_tokens, **settings)  # validates the settings now, not at first call
    return jax.jit(functools.partial(_sample, model, **settings))
