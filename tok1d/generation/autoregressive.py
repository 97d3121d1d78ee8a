"""Autoregressive sampling of a LlamaGen-style GPT with a static KV cache and CFG.

Reproduces `autoregressive/models/generate.py` of SilentView/GigaTok (c2i):

* classifier-free guidance is on iff cfg_scale > 1: the batch is doubled as [labels; null];
* prefill: the class token alone (position 0) -> logits of code 0, combined as
  u + (c - u) * cfg_scale with the raw cfg_scale;
* decode step i = 0 .. N-2 feeds code i (position i + 1, both halves get the same code) and
  combines with the scheduled scale s_i = `cfg_scale_at(schedule, cfg_scale, i, N - 1)`;
  when s_i <= 1, or once i > cfg_interval (cfg_interval > -1), the conditional half's logits
  are used unguided;
* each next code: logits / max(temperature, 1e-5), top-k then top-p filtering (-inf), softmax,
  then a multinomial draw, or the argmax (`greedy`, upstream `sample_logits=False`).

The whole loop is one jitted program: prefill, then `lax.scan` over the decode steps with the
cache in the carry, the layer stack unrolled (`gpt.unrolled`) so every layer's cache is
updated in place, and the weights cast to the compute dtype once (`gpt.compute_params`).
Random draws use `jax.random.categorical` with one key per position (split from the given
key), so the streams are not PyTorch's.

Deviations from upstream, all where upstream fails: `cfg_schedule="cosine"` is implemented
(1 + (s - 1) * (1 + cos(pi * ratio)) / 2; upstream raises NameError, `math` is not imported);
"sigmoid" (accepted but not implemented upstream) raises ValueError; a scheduled scale <= 1
under CFG uses the conditional logits (upstream then feeds a half-size batch into the doubled
cache and crashes); with cfg_scale <= 1 no CFG is done and the schedule is ignored (as upstream
for "constant"; other schedules crash there). Upstream never passes schedule kwargs to
"triangular" (peak is always 0.5); here `cfg_kwargs` reach every schedule.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.models.generators.gpt import GPT, compute_params, init_cache, unrolled

SCHEDULES = ("constant", "linear", "linear_re", "triangular", "rectangular", "step", "cosine")


def cfg_scale_at(schedule: str, scale: float, step: int, total: int, **kw: Any) -> float:
    """Guidance scale of decode step `step` (0-based) out of `total` (= codes - 1), computed in
    Python floats like upstream, with ratio = (step + 1) / total:

      constant     s
      linear       1 + (s - 1) * ratio + 1e-4
      linear_re    1 + (s - 1) * (1 - ratio) + 1e-4
      triangular   up to `peak` (0.5): 1 + (s - 1) * ratio / peak + 1e-4, then
                   1 + (s - 1) * (1 - ratio) / (1 - peak) + 1e-4
      rectangular  s inside [window_start (0.05), window_end (1.0)], else 1 + 1e-4
      step         s if ratio >= window_start (required; the README uses 0.18), else 1 + 1e-4
                   (s itself when s == 1)
      cosine       1 + (s - 1) * (1 + cos(pi * ratio)) / 2
    """
    ratio = (step + 1) / total
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * ratio + 1e-4
    if schedule == "linear_re":
        return 1.0 + (scale - 1.0) * (1.0 - ratio) + 1e-4
    if schedule == "triangular":
        peak = kw.get("peak", 0.5)
        if ratio < peak:
            return 1.0 + (scale - 1.0) * (ratio / peak) + 1e-4
        return 1.0 + (scale - 1.0) * ((1.0 - ratio) / (1.0 - peak)) + 1e-4
    if schedule == "rectangular":
        start, end = kw.get("window_start", 0.05), kw.get("window_end", 1.0)
        return scale if start <= ratio <= end else 1.0 + 1e-4
    if schedule == "step":
        if "window_start" not in kw:
            raise ValueError("cfg schedule 'step' needs cfg_kwargs={'window_start': ...} "
                             "(GigaTok's evaluation uses 0.18).")
        if scale == 1.0:
            return scale
        return scale if kw["window_start"] <= ratio else 1.0 + 1e-4
    if schedule == "cosine":
        return 1.0 + (scale - 1.0) * (0.5 * (1.0 + math.cos(math.pi * ratio)))
    if schedule == "sigmoid":
        raise ValueError("cfg schedule 'sigmoid' is listed but not implemented upstream.")
    raise ValueError(f"Unknown cfg schedule {schedule!r}; known: {SCHEDULES}.")


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Sets logits below the k-th largest to -inf (ties with it are kept); k <= 0: no-op."""
    if top_k <= 0:
        return logits
    k = min(top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering: keeps the most probable codes, in descending order, up to and
    including the first whose cumulative probability exceeds `top_p` (the smallest set with
    mass >= top_p, up to ties at exactly top_p); the rest -> -inf. top_p >= 1: no-op."""
    if top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cumulative > top_p
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def next_code(logits: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, greedy: bool = False) -> jax.Array:
    """Upstream `sample`: temperature, top-k, top-p, then a draw (or argmax) -> (B,) int32."""
    logits = logits.astype(jnp.float32) / max(temperature, 1e-5)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    if greedy:
        return jnp.argmax(jax.nn.softmax(logits, axis=-1), axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def guidance_plan(num_tokens: int, cfg_scale: float, cfg_schedule: str = "constant",
                  cfg_kwargs: Optional[dict] = None, cfg_interval: int = -1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per decode step (num_tokens - 1 of them): the float32 scale and whether to guide."""
    steps = num_tokens - 1
    kw = dict(cfg_kwargs or {})
    scales = [cfg_scale_at(cfg_schedule, cfg_scale, i, steps, **kw) for i in range(steps)]
    guide = [s > 1.0 and (cfg_interval < 0 or i <= cfg_interval) for i, s in enumerate(scales)]
    return np.asarray(scales, np.float32), np.asarray(guide, np.bool_)


def _check(cfg_schedule: str, temperature: float, top_k: int, top_p: float) -> None:
    if cfg_schedule not in SCHEDULES:
        cfg_scale_at(cfg_schedule, 2.0, 0, 1)  # raises the informative error
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")


def make_sampler(model: GPT, *, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
                 cfg_kwargs: Optional[dict] = None, cfg_interval: int = -1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """Jitted `fn(params, labels (B,) int, rng) -> codes (B, model.num_tokens) int32`."""
    _check(cfg_schedule, temperature, top_k, top_p)
    cfg = cfg_scale > 1.0
    num_tokens = model.num_tokens
    if cfg:
        scales, guide = guidance_plan(num_tokens, cfg_scale, cfg_schedule, cfg_kwargs,
                                      cfg_interval)
    else:
        scales, guide = np.ones(num_tokens - 1, np.float32), np.zeros(num_tokens - 1, np.bool_)
    pick = functools.partial(next_code, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy)

    def combine(logits, scale, use):
        if not cfg:
            return logits
        cond, uncond = jnp.split(logits, 2, axis=0)
        return jnp.where(use, uncond + (cond - uncond) * scale, cond)

    def fn(params, labels, rng):
        # Decode with the layer stack unrolled: each layer's KV cache is then updated in place
        # (the scanned stack copies the whole cache at every token; 2.8x slower on CPU). The
        # weights enter the token loop already in the compute dtype: cast once, and the barrier
        # keeps XLA from sinking the casts back into the loop body (once per token).
        params = jax.lax.optimization_barrier(compute_params(model, params))
        net, params = unrolled(model, params)
        labels = jnp.asarray(labels, jnp.int32)
        if cfg:
            labels = jnp.concatenate([labels, jnp.full_like(labels, model.null_label)])
        keys = jax.random.split(rng, num_tokens)
        cache = init_cache(net, params, labels.shape[0])
        logits, state = net.apply({"params": params, "cache": cache}, labels,
                                  method=GPT.prefill, mutable=["cache"])
        first = pick(combine(logits, jnp.float32(cfg_scale), True), keys[0])

        def step(carry, xs):
            cache, code = carry
            key, scale, use = xs
            inputs = jnp.concatenate([code, code]) if cfg else code
            logits, state = net.apply({"params": params, "cache": cache}, inputs,
                                      method=GPT.decode, mutable=["cache"])
            code = pick(combine(logits, scale, use), key)
            return (state["cache"], code), code

        _, rest = jax.lax.scan(step, (state["cache"], first),
                               (keys[1:], jnp.asarray(scales), jnp.asarray(guide)))
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def _cached_sampler(model: GPT, settings: tuple) -> Callable:
    kw = dict(settings)
    kw["cfg_kwargs"] = dict(kw["cfg_kwargs"])
    return make_sampler(model, **kw)


def sample(model: GPT, params: Any, labels: jax.Array, rng: jax.Array, *,
           cfg_scale: float = 1.0, cfg_schedule: str = "constant",
           cfg_kwargs: Optional[dict] = None, cfg_interval: int = -1,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           greedy: bool = False) -> jax.Array:
    """Samples codes (B, num_tokens) int32 for `labels` (B,); see `make_sampler` (compiled
    samplers are cached per model and settings)."""
    settings = (("cfg_scale", float(cfg_scale)), ("cfg_schedule", cfg_schedule),
                ("cfg_kwargs", tuple(sorted((cfg_kwargs or {}).items()))),
                ("cfg_interval", int(cfg_interval)), ("temperature", float(temperature)),
                ("top_k", int(top_k)), ("top_p", float(top_p)), ("greedy", bool(greedy)))
    return _cached_sampler(model, settings)(params, labels, rng)
