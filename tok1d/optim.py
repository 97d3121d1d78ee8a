"""Optimizers and learning-rate schedules built from `config.optim`."""

from __future__ import annotations

from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                  end_lr: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `lr`, then cosine / linear decay to `end_lr` (or constant)."""
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0)
    elif schedule == "linear":
        after = optax.linear_schedule(lr, end_lr, decay_steps)
    elif schedule == "constant":
        after = optax.constant_schedule(lr)
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; expected cosine, linear or constant.")
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after],
                                [warmup_steps])


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and conv kernels only; not on norms, biases, embeddings, codebooks."""
    flat = traverse_util.flatten_dict(params)
    def decays(path, value) -> bool:
        name = path[-1]
        return getattr(value, "ndim", 0) >= 2 and name == "kernel"  # MaskedNode: frozen
    return traverse_util.unflatten_dict({k: decays(k, v) for k, v in flat.items()})


def make_optimizer(optim_cfg, total_steps: int, param_shapes: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clipping) with the configured schedule. Returns (tx, schedule).

    With `optim_cfg.freeze`, `param_shapes` (the param tree or its shapes) is needed to label
    the frozen groups."""
    schedule = make_schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_steps,
                             optim_cfg.schedule, optim_cfg.end_lr)
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask,
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
