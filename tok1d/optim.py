"""Optimizers and learning-rate schedules built from `config.optim`."""

from __future__ import annotations

import functools
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax


SCHEDULES = ("cosine", "linear", "constant", "wsd")


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
    return optax.join_schedules([optax.linear_schedule(warmup_init * lr, lr, warmup_steps), after],
                                [warmup_steps])


DECAY_MASKS = ("kernels", "all", "no_norm", "matrices")


def decay_mask(params: Any, which: str = "kernels") -> Any:
    """Which params get weight decay: "kernels" (matrices and conv kernels; not norms, biases,
    embeddings, codebooks), "all" (torch AdamW on every parameter, as GigaTok's DDP trainer) or
    "no_norm" (all but params under a module whose name contains "norm", GigaTok's FSDP
    trainer) or "matrices" (every parameter with >= 2 dims incl. embedding tables, as
    LlamaGen's GPT optimizer). Frozen leaves (optax MaskedNode) are never decayed."""
    if which not in DECAY_MASKS:
        raise ValueError(f"Unknown weight-decay mask {which!r}; expected one of {DECAY_MASKS}.")
    flat = traverse_util.flatten_dict(params)

    def decays(path, value) -> bool:
        if not hasattr(value, "ndim"):  # MaskedNode: frozen
            return False
        if which == "all":
            return True
        if which == "no_norm":
            return not any("norm" in str(p) for p in path)
        if which == "matrices":
            return value.ndim >= 2
        return value.ndim >= 2 and path[-1] == "kernel"
    return traverse_util.unflatten_dict({k: decays(k, v) for k, v in flat.items()})


def make_optimizer(optim_cfg, total_steps: int, param_shapes: Any = None, step_offset: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping) with the configured schedule. Returns (tx, schedule).

    With `optim_cfg.freeze`, `param_shapes` (the param tree or its shapes) is needed to label
    the frozen groups. `step_offset`: the schedule is evaluated at update count + offset (a
    discriminator that starts at step s but follows the global schedule, as GigaTok's)."""
    schedule = make_schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_steps,
                             optim_cfg.schedule, optim_cfg.end_lr,
                             optim_cfg.get("warmup_init", 0.0),
                             optim_cfg.get("decay_fraction", 0.2))
    if step_offset:
        base = schedule
        schedule = lambda count: base(count + step_offset)  # noqa: E731
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay,
                             mask=functools.partial(decay_mask,
                                                    which=optim_cfg.get("decay_mask", "kernels")),
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


def freeze_labels(params: Any, frozen: tuple[str, ...]) -> Any:
    """"frozen" / "train" label per leaf by top-level group; unknown group names fail."""
    unknown = sorted(set(frozen) - set(params))
    if unknown:
        raise ValueError(f"optim.freeze names unknown parameter groups {unknown}; the model "
                         f"has {sorted(params)}.")
    return {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v)
            for k, v in params.items()}


def global_norm(tree: Any) -> jax.Array:
    return optax.global_norm(tree)
