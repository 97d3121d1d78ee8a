"""bytedance/1d-tokenizer plumbing shared by the TiTok and MaskGIT mappings: reading its YAML
configs (dotted lookups, OmegaConf interpolations) and its `utils/train_utils.py` optimizer,
LR scheduler, clipping and EMA (`train_utils_optim`)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections

from tok1d import recipes
from tok1d.train import config_lib

# accelerate `mixed_precision` -> tok1d compute dtype (params and optimizer state stay float32
# in both).
PRECISIONS = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The EMA decay `create_model_and_loss_module` gives `EMAModel` (not a config field upstream).
EMA_DECAY = 0.999

SCHEDULERS = ("cosine", "constant")


def get(d: Mapping[str, Any], path: str, default: Any = None) -> Any:
    for key in path.split("."):
        if not isinstance(d, Mapping) or key not in d:
            return default
        d = d[key]
    return d


def require(official: Mapping[str, Any], paths: tuple[str, ...]) -> None:
    missing = [p for p in paths if get(official, p) is None]
    if missing:
        raise config_lib.ConfigError("The official config lacks " + ", ".join(missing))


def train_utils_optim(config: ml_collections.ConfigDict, official: Mapping[str, Any],
                      num_processes: int = 1) -> None:
    """Sets `config`'s optimizer, schedule, clipping, EMA, batch and steps from an official
    1d-tokenizer config's `optimizer`, `lr_scheduler` and `training` sections, with the
    semantics of its `utils/train_utils.py` (`recipes.titok_train_utils`).

    The `LambdaLR` scales the optimizer's LR (`optimizer.params.learning_rate`) by
    (end_lr + (base_lr - end_lr)·cos-ratio) / base_lr with base_lr =
    `lr_scheduler.params.learning_rate`; both are the same in the official YAMLs (an
    interpolation), and a different base_lr is folded into `end_lr` here."""
    require(official, ("optimizer.params.learning_rate", "optimizer.params.beta1",
                        "optimizer.params.beta2", "optimizer.params.weight_decay",
                        "lr_scheduler.params.warmup_steps", "training.max_train_steps",
                        "training.per_gpu_batch_size"))
    name = get(official, "optimizer.name", "adamw")
    if name != "adamw":
        raise config_lib.ConfigError(f"optimizer.name={name!r}: the official code only "
                                     "supports adamw")
    scheduler = get(official, "lr_scheduler.scheduler", "cosine")
    if scheduler not in SCHEDULERS:
        raise config_lib.ConfigError(f"lr_scheduler.scheduler={scheduler!r} is not one of "
                                     f"{SCHEDULERS}")
    recipes.titok_train_utils(config)
    opt = get(official, "optimizer.params")
    lr = float(opt["learning_rate"])
    base_lr = float(get(official, "lr_scheduler.params.learning_rate", lr))
    end_lr = float(get(official, "lr_scheduler.params.end_lr", 0.0))
    o = config.optim
    o.lr, o.b1, o.b2 = lr, float(opt["beta1"]), float(opt["beta2"])
    o.weight_decay = float(opt["weight_decay"])
    o.schedule = scheduler
    o.warmup_steps = int(get(official, "lr_scheduler.params.warmup_steps"))
    o.end_lr = end_lr * lr / base_lr if base_lr else 0.0
    clip = get(official, "training.max_grad_norm")
    o.grad_clip = float(clip) if clip is not None else 0.0
    accum = int(get(official, "training.gradient_accumulation_steps", 1))
    o.grad_accum_steps = accum
    config.total_steps = int(get(official, "training.max_train_steps"))
    config.batch_size = int(get(official, "training.per_gpu_batch_size")) * num_processes * accum
    config.ema_decay = EMA_DECAY if get(official, "training.use_ema", False) else 0.0
    precision = get(official, "training.mixed_precision", "no")
    if precision not in PRECISIONS:
        raise config_lib.ConfigError(f"training.mixed_precision={precision!r} is not one of "
                                     f"{sorted(PRECISIONS)}")
    config.precision = PRECISIONS[precision]
    config.seed = int(get(official, "training.seed", config.seed))


def resolve_interpolations(official: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an official config with OmegaConf's absolute interpolations resolved: a value
    "${a.b.c}" becomes the value at a.b.c (the YAMLs' `lr_scheduler.params.learning_rate:
    ${optimizer.params.learning_rate}`, read without OmegaConf)."""
    def resolve(value: Any, depth: int = 0) -> Any:
        if isinstance(value, Mapping):
            return {k: resolve(v, depth) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, depth) for v in value]
        if isinstance(value, str):
            m = re.fullmatch(r"\$\{([A-Za-z0-9_.]+)\}", value.strip())
            if m:
                target = get(official, m.group(1))
                if target is None or depth > 8:
                    raise config_lib.ConfigError(f"cannot resolve {value!r} in the official "
                                                 "config")
                return resolve(target, depth + 1)
        return value
    return resolve(official)
