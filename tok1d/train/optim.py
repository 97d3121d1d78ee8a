"""Optimizers and learning-rate schedules built from `config.optim`."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax

from tok1d.weights.convert.gigatok import TRANSFORMER_LAYER as GIGATOK_LAYER_NAMES


SCHEDULES = ("cosine", "linear", "constant", "wsd")

# When the learning-rate schedule is read, relative to the optimizer update it drives:
#   "before"      update k (1-based) uses schedule(k - 1): optax's convention, and what a torch
#                 `LambdaLR` stepped after `optimizer.step()` gives (TiTok / MaskGIT: with a
#                 warm-up from 0 the first update runs at LR 0 and only fills Adam's moments).
#   "after_call"  update 1 uses the base LR, update k >= 2 uses schedule(k - 2): a scheduler
#                 *function* called after `optimizer.step()` that sets the next step's LR, with
#                 nothing set before the first step (GigaTok's vq_train.py, LlamaGen's
#                 train_c2i.py: `cosine_schedule_with_warmup_v2`).
SCHEDULE_STEPS = ("before", "after_call")


def wsd_schedule(lr: float, total_steps: int, decay_fraction: float) -> optax.Schedule:
    """LlamaGen's warmup-stable-decay after the warm-up: constant `lr`, then over the last
    `decay_fraction` of the run lr * (1 - sqrt(progress)) down to 0."""
    decay_steps = max(int(total_steps * decay_fraction), 1)
    stable = total_steps - decay_steps

    def schedule(count):
        progress = jnp.clip((count - stable) / decay_steps, 0.0, 1.0)
        return lr * (1.0 - jnp.sqrt(progress))
    return schedule


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                  end_lr: float = 0.0, warmup_init: float = 0.0, decay_fraction: float = 0.2
                  ) -> optax.Schedule:
    """Linear warm-up from `warmup_init * lr` to `lr`, then cosine / linear decay to `end_lr`,
    constant, or "wsd" (constant, then 1 - sqrt decay to 0 over the last `decay_fraction` of
    all steps, as LlamaGen's GPT recipe). GigaTok's `cosine_v2` is cosine with warmup_init 0.01
    (warm-up from lr/100)."""
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "wsd":  # its decay phase is placed on the global step count
        base = wsd_schedule(lr, total_steps, decay_fraction)
        after = lambda count: base(count + warmup_steps)  # noqa: E731
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0)
    elif schedule == "linear":
        after = optax.linear_schedule(lr, end_lr, decay_steps)
    elif schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
    if warmup_steps == 0:
        return after

    def warmup(count):  # lr·(s/w + (1 - s/w)·warmup_init), the official form: exact at s = 0
        frac = jnp.clip(jnp.asarray(count, jnp.float32) / warmup_steps, 0.0, 1.0)
        return lr * (frac + (1.0 - frac) * warmup_init)
    return optax.join_schedules([warmup, after], [warmup_steps])


DECAY_MASKS = ("kernels", "all", "no_norm", "matrices")


def names_list(names: Any) -> tuple[str, ...]:
    """"a,b,c" (or a sequence) -> ("a", "b", "c")."""
    if isinstance(names, str):
        names = names.split(",")
    return tuple(n.strip() for n in names if n.strip())


# The official TiTok / MaskGIT `create_optimizer` rule: no weight decay for a parameter whose
# name contains any of these (besides every 1-D tensor). Applied to tok1d's parameter paths
# with decay_mask="kernels" it selects the same tensors (tests/test_train_parity_* check it
# against the official parameter groups through the converters).
TITOK_NO_DECAY_NAMES = "ln,bias,latent_tokens,mask_token,embedding,norm,gamma,embed"


def decay_mask(params: Any, which: str = "kernels", exclude: tuple[str, ...] = ()) -> Any:
    """Which params get weight decay: "kernels" (matrices and conv kernels; not norms, biases,
    embeddings, codebooks), "all" (torch AdamW on every parameter, as GigaTok's DDP trainer) or
    "no_norm" (all but params whose official name contains "norm", GigaTok's FSDP trainer:
    under a module named norm1 / norm_out / ..., not tok1d's own inner "norm") or "matrices"
    (what LlamaGen's GPT optimizer selects with torch's `ndim >= 2`: every matrix and embedding
    table; not norm scales and biases, whatever their tok1d shape).
    `exclude`: substrings of the '/'-joined parameter path that exclude a parameter from decay
    (`optim.no_decay_names`, e.g. `TITOK_NO_DECAY_NAMES`). Frozen leaves (optax MaskedNode) are
    never decayed."""
    if which not in DECAY_MASKS:
        raise ValueError(f"Unknown weight-decay mask {which!r}; expected one of {DECAY_MASKS}.")
    flat = traverse_util.flatten_dict(params)

    def decays(path, value) -> bool:
        if not hasattr(value, "ndim"):  # MaskedNode: frozen
            return False
        joined = "/".join(str(p) for p in path)
        if any(name in joined for name in exclude):
            return False
        if which == "all":
            return True
        if which == "no_norm":  # on the official names: tok1d's LayerNorm wrapper adds an
            # inner module "norm" they lack (official `ln_pre` is tok1d's ln_pre/norm), and the
            # 2D layers' ln_1 / ln_2 are their norm1 / norm2
            official = [GIGATOK_LAYER_NAMES.get(str(p), str(p)) for p in path if p != "norm"]
            return not any("norm" in p for p in official)
        if which == "matrices":  # torch's ndim >= 2: not norm scales / biases, whose tok1d
            # leaves can be 2-D (stacked by a scanned layer stack, per-head attention biases)
            return value.ndim >= 2 and path[-1] not in ("scale", "bias")
        return value.ndim >= 2 and path[-1] == "kernel"
    return traverse_util.unflatten_dict({k: decays(k, v) for k, v in flat.items()})


def decay_mask_of(optim_cfg, params: Any) -> Any:
    """The weight-decay mask `make_optimizer` applies for `optim_cfg` (`decay_mask`,
    `no_decay_names`)."""
    return decay_mask(params, optim_cfg.get("decay_mask", "kernels"),
                      names_list(optim_cfg.get("no_decay_names", "")))


def stepped_schedule(schedule: optax.Schedule, lr: float, step: str = "before",
                     offset: int = 0) -> optax.Schedule:
    """`schedule` as read by the optimizer's update count `c` (0-based), per `SCHEDULE_STEPS`:
    "before" -> schedule(c + offset); "after_call" -> lr at c = 0, then schedule(c - 1 + offset).

    `offset` places a late-starting optimizer on the global schedule: a discriminator whose
    first update is global (0-based) step s uses offset s. With "after_call" its first update
    still runs at the construction LR (GigaTok's D: its scheduler is only called on D steps)."""
    if step not in SCHEDULE_STEPS:
        raise ValueError(f"Unknown schedule_step {step!r}; expected one of {SCHEDULE_STEPS}.")
    if step == "before":
        return (lambda count: schedule(count + offset)) if offset else schedule
    return lambda count: jnp.where(count == 0, jnp.asarray(lr, jnp.float32),
                                   schedule(jnp.maximum(count - 1, 0) + offset))


def clip_by_global_norm(max_norm: float, eps: float = 0.0) -> optax.GradientTransformation:
    """Global-norm clipping. eps = 0: optax's rule (scale max_norm / norm when norm > max_norm);
    eps > 0: torch's `clip_grad_norm_` (scale max_norm / (norm + eps) whenever that is < 1;
    torch uses eps = 1e-6)."""
    if eps <= 0:
        return optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.minimum(max_norm / (norm + eps), 1.0)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg, total_steps: int, param_shapes: Any = None, step_offset: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping) with the configured schedule. Returns (tx, schedule):
    `schedule(count)` is the LR of the update with 0-based index `count`.

    With `optim_cfg.freeze`, `param_shapes` (the param tree or its shapes) is needed to label
    the frozen groups. `step_offset`: the global step of the optimizer's first update (a
    discriminator that starts at step s but follows the global schedule, as GigaTok's); see
    `stepped_schedule` for `optim.schedule_step`."""
    base = make_schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_steps,
                         optim_cfg.schedule, optim_cfg.end_lr,
                         optim_cfg.get("warmup_init", 0.0),
                         optim_cfg.get("decay_fraction", 0.2))
    schedule = stepped_schedule(base, optim_cfg.lr, optim_cfg.get("schedule_step", "before"),
                                step_offset)
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(clip_by_global_norm(optim_cfg.grad_clip, optim_cfg.get("clip_eps", 0.0)))
    mask = functools.partial(decay_mask_of, optim_cfg)
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=mask,
                             mu_dtype=jnp.dtype(optim_cfg.mu_dtype)))
    tx = optax.chain(*parts)
    frozen = frozen_groups(optim_cfg)
    if frozen:
        if param_shapes is None:
            raise ValueError("optim.freeze needs the parameter tree (param_shapes).")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   freeze_labels(param_shapes, frozen))
    return tx, schedule


def frozen_groups(optim_cfg) -> tuple[str, ...]:
    return tuple(s.strip() for s in str(optim_cfg.get("freeze", "")).split(",") if s.strip())


def frozen_as_constants(loss_fn: Callable[..., Any], optim_cfg) -> Callable[..., Any]:
    """`loss_fn(params, *args)` with `optim.freeze`'s groups of `params` as autodiff constants
    (`stop_gradient`): their gradients are zeros, so the logged norm is the trained groups'
    (torch's `clip_grad_norm_` over the params that have gradients) and their backward pass is
    not computed at all (a model may stop them itself, as TiTok's `finetune_decoder`)."""
    frozen = frozen_groups(optim_cfg)
    if not frozen:
        return loss_fn

    def constant_frozen(params, *args, **kwargs):
        params = {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in params.items()}
        return loss_fn(params, *args, **kwargs)

    return constant_frozen


def freeze_labels(params: Any, frozen: tuple[str, ...]) -> Any:
    """"frozen" / "train" label per leaf by top-level group; unknown group names fail."""
    unknown = sorted(set(frozen) - set(params))
    if unknown:
        raise ValueError(f"optim.freeze names unknown parameter groups {unknown}; the model "
                         f"has {sorted(params)}.")
    return {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v)
            for k, v in params.items()}


def global_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree)


EMA_WARMUPS = ("none", "titok")


def ema_decay_at(step: jax.Array, decay: float, warmup: str = "none") -> jax.Array:
    """The EMA decay used by the update after optimizer step `step` (1-based).

    "none": `decay` at every step (GigaTok / LlamaGen `update_ema`; the EMA starts as a copy).
    "titok": the official TiTok / MaskGIT `EMAModel` (diffusers-style, no `use_ema_warmup`):
    s = step - 1, decay_s = 0 for s <= 0 else min(decay, (1 + s) / (10 + s)), i.e. the EMA
    equals the params after step 1, then decays 2/11, 3/12, ... up to `decay`."""
    if warmup not in EMA_WARMUPS:
        raise ValueError(f"Unknown ema_warmup {warmup!r}; expected one of {EMA_WARMUPS}.")
    if warmup == "none":
        return jnp.asarray(decay, jnp.float32)
    s = jnp.asarray(step, jnp.float32) - 1.0
    return jnp.where(s <= 0, 0.0, jnp.minimum(decay, (1.0 + s) / (10.0 + s)))
