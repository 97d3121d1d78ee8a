"""Autoregressive sampling with a static KV cache and CFG: LlamaGen-style GPT (objective
"next_token", `make_sampler`) and RAR (objective "permuted_next_token", `make_rar_sampler`),
both through one cached decoding loop (`decode`).

GPT: reproduces `autoregressive/models/generate.py` of SilentView/GigaTok (c2i):

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
cache in the carry, the layer stack unrolled (`transformer.unrolled`) so every layer's cache
is updated in place, and the weights cast to the compute dtype once (`transformer.cast_params`).
The steps run in chunks (`cache_chunks`, `cache_chunk` positions each) whose cache is only as
long as the chunk's last position, so attention reads the filled part of the cache, not all of
it: for 256 tokens in chunks of 32, 56% of the keys and values the single loop reads.
Random draws are `jax.random.categorical`'s Gumbel-max with one key per position (split from
the given key), so the streams are not PyTorch's; parity tests replay the official draws
(`next_code`).

Deviations from upstream, all where upstream fails: `cfg_schedule="cosine"` is implemented
(1 + (s - 1) * (1 + cos(pi * ratio)) / 2; upstream raises NameError, `math` is not imported);
"sigmoid" (accepted but not implemented upstream) raises ValueError; a scheduled scale <= 1
under CFG uses the conditional logits (upstream then feeds a half-size batch into the doubled
cache and crashes); with cfg_scale <= 1 no CFG is done and the schedule is ignored (as upstream
for "constant"; other schedules crash there). Upstream never passes schedule kwargs to
"triangular" (peak is always 0.5); here `cfg_kwargs` reach every schedule.

RAR: reproduces `RAR.generate` of bytedance/1d-tokenizer (`modeling/rar.py`) with its KV
cache: raster order, the prefill feeds the cls and class tokens; with guidance_scale != 0 every
code is guided as u + (c - u)·s_t with the power-cosine scale of step t = 0 .. N-1
(`rar_guidance_plan`), then divided by `randomize_temperature` and sampled (tok1d's top-k /
top-p are extra, off by default).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tok1d.generation import guidance
from tok1d.layers import transformer
from tok1d.models.generators.gpt import GPT
from tok1d.objectives import draws as draws_lib
from tok1d.objectives.draws import Draw, fresh

SCHEDULES = ("constant", "linear", "linear_re", "triangular", "rectangular", "step", "cosine")

# Decode steps run in chunks whose attention reads the cache only up to the next multiple of
# this many positions (`cache_chunks`); 0 reads the whole cache at every step.
CACHE_CHUNK = 32


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
              top_p: float = 1.0, greedy: bool = False, draw: Draw = fresh) -> jax.Array:
    """Upstream `sample`: temperature, top-k, top-p, then a draw (or argmax) -> (B,) int32.

    The draw is the Gumbel-max trick, argmax(logits + g) (`jax.random.categorical`'s own rule,
    bitwise), with the noise taken through `draw` (`tok1d.objectives.draws`): "gumbel" (B, V)
    float32 Gumbel(0, 1) noise, or "uniform" (B,) float32 u in [0, 1), which picks by the
    inverse CDF instead: the first code whose cumulative probability exceeds u (the rule of a
    multinomial draw from one uniform). Parity tests replay the official draws this way."""
    logits = logits.astype(jnp.float32) / max(temperature, 1e-5)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    if greedy:
        return jnp.argmax(jax.nn.softmax(logits, axis=-1), axis=-1).astype(jnp.int32)
    u = draw("uniform", lambda: None)
    if u is not None:
        cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
        index = jnp.sum(cdf <= (u * cdf[..., -1])[..., None], axis=-1)
        return jnp.minimum(index, logits.shape[-1] - 1).astype(jnp.int32)
    gumbel = draw("gumbel", lambda: jax.random.gumbel(rng, logits.shape, jnp.float32))
    return jnp.argmax(logits + gumbel, axis=-1).astype(jnp.int32)


def guidance_plan(num_tokens: int, cfg_scale: float, cfg_schedule: str = "constant",
                  cfg_kwargs: Optional[dict] = None, cfg_interval: int = -1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per decode step (num_tokens - 1 of them): the float32 scale and whether to guide."""
    steps = num_tokens - 1
    kw = dict(cfg_kwargs or {})
    scales = [cfg_scale_at(cfg_schedule, cfg_scale, i, steps, **kw) for i in range(steps)]
    guide = [s > 1.0 and (cfg_interval < 0 or i <= cfg_interval) for i, s in enumerate(scales)]
    return np.asarray(scales, np.float32), np.asarray(guide, np.bool_)


def _check(temperature: float, top_k: int, top_p: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}")


# --------------------------------------------------------------------------- the decoding loop


def decode(model: Any, params: Any, labels: jax.Array, rng: jax.Array, scales: np.ndarray,
           guide: np.ndarray, cfg: bool, pick: Callable[..., jax.Array],
           draws: Optional[dict[str, jax.Array]] = None, cache_chunk: int = CACHE_CHUNK
           ) -> jax.Array:
    """Cached decoding of `model` (a generator with `prefill(labels)`, `decode(codes)` and
    `init_cache`, see `tok1d.layers.transformer.init_cache`): the class token(s) first, then one
    code per step; returns codes (B, num_tokens) int32. For code t (t = 0 .. N-1), with `cfg`
    the batch is doubled as [labels; null] and the logits are combined as
    u + (c - u) * scales[t] where guide[t] (else the conditional half is used); then
    `pick(logits, key_t, draw=...)` chooses the code. Code t draws from key t of
    `jax.random.split(rng, N)`, or replays `draws` (name -> array with a leading N axis).

    The loop is `lax.scan` over the decode steps with the cache in the carry, the layer stack
    unrolled (`transformer.unrolled`: each layer's cache updated in place; the scanned stack
    copies the whole cache at every token) and the weights cast to the compute dtype once
    (`transformer.cast_params` of the model's `compute_leaves`; an optimisation barrier keeps
    XLA from sinking the casts back into the loop).

    `cache_chunk` > 0: the steps run as one scan per chunk of `cache_chunks`, each on a cache
    resized (`transformer.resize_cache`) to the next multiple of `cache_chunk` positions, so a
    step's attention reads about what is filled instead of the whole cache (decoding is bound
    by reading the cache: GPT-B at batch 64 with CFG holds 1.2 GB of keys and values). The
    codes are the same as with `cache_chunk=0` (one scan on the whole cache): the positions
    cut off are the masked ones."""
    num_tokens = model.num_tokens
    params = jax.lax.optimization_barrier(
        transformer.cast_params(params, model.dtype, model.compute_leaves))
    net, params = transformer.unrolled(model, params)
    labels = jnp.asarray(labels, jnp.int32)
    if cfg:
        labels = jnp.concatenate([labels, jnp.full_like(labels, model.null_label)])
    steps = {"key": jax.random.split(rng, num_tokens), "scale": jnp.asarray(scales),
             "guide": jnp.asarray(guide), **{f"draw/{k}": v for k, v in (draws or {}).items()}}

    def choose(logits, s):
        if cfg:
            cond, uncond = jnp.split(logits, 2, axis=0)
            logits = jnp.where(s["guide"], uncond + (cond - uncond) * s["scale"], cond)
        replayed = {k[5:]: v for k, v in s.items() if k.startswith("draw/")}
        return pick(logits, s["key"], draw=draws_lib.drawer(replayed))

    cache = transformer.init_cache(net, params, labels.shape[0])
    full = transformer.cache_length(cache)
    chunks = cache_chunks(full - (num_tokens - 1), num_tokens - 1, cache_chunk)
    cache = transformer.resize_cache(cache, chunks[0][2] if chunks else full)
    logits, state = net.apply({"params": params, "cache": cache}, labels,
                              method=type(net).prefill, mutable=["cache"])
    first = choose(logits, jax.tree.map(lambda x: x[0], steps))

    def step(carry, s):
        cache, code = carry
        inputs = jnp.concatenate([code, code]) if cfg else code
        logits, state = net.apply({"params": params, "cache": cache}, inputs,
                                  method=type(net).decode, mutable=["cache"])
        code = choose(logits, s)
        return (state["cache"], code), code

    carry, codes = (state["cache"], first), [first[:, None]]
    for start, stop, length in chunks:
        carry = (transformer.resize_cache(carry[0], length), carry[1])
        carry, rest = jax.lax.scan(step, carry,
                                   jax.tree.map(lambda x: x[1 + start:1 + stop], steps))
        codes.append(rest.T)
    return jnp.concatenate(codes, axis=1)


def cache_chunks(prefix: int, steps: int, chunk: int) -> list[tuple[int, int, int]]:
    """How `decode` splits its `steps` decode steps, after a prefill of `prefix` positions:
    (first step, stop step, cache length) per chunk. The cache lengths are the multiples of
    `chunk` below prefix + steps, except one within chunk / 2 of it (each chunk is a loop XLA
    compiles: RAR's 257 positions would end with a loop of one step), then prefix + steps
    (every position); step s writes position prefix + s, so a chunk holds the steps whose
    position falls below its length. chunk <= 0: one chunk, the whole cache."""
    full = prefix + steps
    lengths = [m for m in range(chunk, full, chunk) if 2 * (full - m) >= chunk] if chunk > 0 else []
    out, start = [], 0
    for length in lengths + [full]:
        stop = length - prefix
        if stop > start:
            out.append((start, stop, length))
            start = stop
    return out


def _jit_sampler(model, scales, guide, cfg, pick, cache_chunk) -> Callable:
    def fn(params, labels, rng, draws=None):
        return decode(model, params, labels, rng, scales, guide, cfg, pick, draws, cache_chunk)
    return jax.jit(fn)


# --------------------------------------------------------------------------- GPT (LlamaGen)


def make_sampler(model: GPT, *, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
                 cfg_kwargs: Optional[dict] = None, cfg_interval: int = -1,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, cache_chunk: int = CACHE_CHUNK
                 ) -> Callable[..., jax.Array]:
    """Jitted `fn(params, labels (B,) int, rng[, draws]) -> codes (B, model.num_tokens)
    int32` of a GPT (see the module docstring; `draws` and `cache_chunk`: see `decode`)."""
    if cfg_schedule not in SCHEDULES:
        cfg_scale_at(cfg_schedule, 2.0, 0, 1)  # raises the informative error
    _check(temperature, top_k, top_p)
    cfg = cfg_scale > 1.0
    num_tokens = model.num_tokens
    if cfg:
        scales, guide = guidance_plan(num_tokens, cfg_scale, cfg_schedule, cfg_kwargs,
                                      cfg_interval)
    else:
        scales, guide = np.ones(num_tokens - 1, np.float32), np.zeros(num_tokens - 1, np.bool_)
    # Code 0 (after the prefill) is guided with the raw cfg_scale.
    scales = np.concatenate([np.float32([cfg_scale]), scales])
    guide = np.concatenate([[cfg], guide])
    pick = functools.partial(next_code, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy)
    return _jit_sampler(model, scales, guide, cfg, pick, cache_chunk)


@functools.lru_cache(maxsize=16)
def _cached_sampler(model: Any, settings: tuple) -> Callable:
    kw = dict(settings)
    if "cfg_kwargs" in kw:
        kw["cfg_kwargs"] = dict(kw["cfg_kwargs"])
    return SAMPLER_OF[model.objective](model, **kw)


def sample(model: GPT, params: Any, labels: jax.Array, rng: jax.Array, *,
           cfg_scale: float = 1.0, cfg_schedule: str = "constant",
           cfg_kwargs: Optional[dict] = None, cfg_interval: int = -1,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           greedy: bool = False, cache_chunk: int = CACHE_CHUNK) -> jax.Array:
    """Samples codes (B, num_tokens) int32 for `labels` (B,); see `make_sampler` (compiled
    samplers are cached per model and settings)."""
    settings = (("cfg_scale", float(cfg_scale)), ("cfg_schedule", cfg_schedule),
                ("cfg_kwargs", tuple(sorted((cfg_kwargs or {}).items()))),
                ("cfg_interval", int(cfg_interval)), ("temperature", float(temperature)),
                ("top_k", int(top_k)), ("top_p", float(top_p)), ("greedy", bool(greedy)),
                ("cache_chunk", int(cache_chunk)))
    return _cached_sampler(model, settings)(params, labels, rng)


# --------------------------------------------------------------------------- RAR


def rar_guidance_plan(num_tokens: int, guidance_scale: float, guidance_scale_pow: float
                      ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(scales (N,) float32, guide (N,), cfg) of RAR's `generate`: classifier-free guidance at
    every step iff guidance_scale != 0, with the power-cosine scale of code t = 0 .. N-1
    (`guidance.power_cosine`: 1 at code 0 unless pow = 0, the constant g for pow = 0)."""
    cfg = guidance_scale != 0
    scales = guidance.power_cosine(num_tokens, guidance_scale, guidance_scale_pow)
    return scales, np.full(num_tokens, cfg), cfg


def make_rar_sampler(model: Any, *, guidance_scale: float = 0.0,
                     guidance_scale_pow: float = 0.0, randomize_temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                     cache_chunk: int = CACHE_CHUNK) -> Callable[..., jax.Array]:
    """Jitted `fn(params, labels (B,) int, rng[, draws]) -> codes (B, model.num_tokens) int32`
    of a RAR (`tok1d.models.generators.rar`), upstream `RAR.generate` with `kv_cache=True`:
    raster order; with guidance_scale != 0 every step runs the doubled batch [labels; null] and
    uses u + (c - u)·s_t with the power-cosine s_t (`rar_guidance_plan`); the logits are
    divided by `randomize_temperature` (upstream's name: a plain temperature) and sampled
    (upstream: torch.multinomial of the softmax; here `next_code`, which adds tok1d's top-k /
    top-p filters (off by default) and `greedy`); `cache_chunk`: see `decode`."""
    _check(randomize_temperature, top_k, top_p)
    if not 0 <= guidance_scale_pow < math.inf:  # (a negative power divides by 0 at code 0)
        raise ValueError(f"sampling.guidance_scale_pow must be a finite number >= 0, got "
                         f"{guidance_scale_pow}.")
    scales, guide, cfg = rar_guidance_plan(model.num_tokens, guidance_scale, guidance_scale_pow)
    pick = functools.partial(next_code, temperature=randomize_temperature, top_k=top_k,
                             top_p=top_p, greedy=greedy)
    return _jit_sampler(model, scales, guide, cfg, pick, cache_chunk)


def sample_rar(model: Any, params: Any, labels: jax.Array, rng: jax.Array, *,
               guidance_scale: float = 0.0, guidance_scale_pow: float = 0.0,
               randomize_temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               greedy: bool = False, cache_chunk: int = CACHE_CHUNK) -> jax.Array:
    """Samples codes (B, num_tokens) int32 of a RAR for `labels` (B,); see `make_rar_sampler`
    (compiled samplers are cached per model and settings)."""
    settings = (("guidance_scale", float(guidance_scale)),
                ("guidance_scale_pow", float(guidance_scale_pow)),
                ("randomize_temperature", float(randomize_temperature)), ("top_k", int(top_k)),
                ("top_p", float(top_p)), ("greedy", bool(greedy)),
                ("cache_chunk", int(cache_chunk)))
    return _cached_sampler(model, settings)(params, labels, rng)


# objective -> the sampler maker of the generators this module decodes
SAMPLER_OF: dict[str, Callable[..., Callable]] = {"next_token": make_sampler,
                                                  "permuted_next_token": make_rar_sampler}
