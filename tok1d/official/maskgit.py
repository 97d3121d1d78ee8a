"""bytedance/1d-tokenizer's MaskGIT generator training -> a tok1d config.

    import yaml
    from tok1d.official import maskgit
    config = maskgit.config_from_official(yaml.safe_load(open("maskgit.yaml")))
    config.generator.tokens = "gs://BUCKET/tokens_titok_b64"   # python -m tok1d.tokenize

`config_from_official` reads an official generator config (`configs/training/generator/*.yaml`
of `scripts/train_maskgit.py`, after any command-line overrides, as a plain dict) and returns
the config of tok1d's generator trainer that runs the same training step: the ImageBert /
UViTBert generator (`tok1d.convert.maskgit.kwargs_from_official`), `MLMLoss`'s label smoothing
and unmasked-token weight, the class-label dropout, the arccos masking of
`masking_input_tokens`, and `utils/train_utils.py`'s optimizer, LR schedule, clipping and EMA
(`train_utils_optim`, semantics in `tok1d.recipes.titok_train_utils`). The train-step parity
test (tests/test_train_parity_maskgit.py) builds its model and optimizer through it from the
`meta.config` of every `train_maskgit*.npz` fixture.

Not reproduced (deliberate; everything else is):
  * the BERT generator's attention-probability dropout (`attn_drop`): tok1d's attention has no
    dropout (0 in the fixtures; the released YAML uses 0.1 -- a regulariser, not a numeric
    difference of the step);
  * accelerate's multi-process mechanics: the global batch is `per_gpu_batch_size x
    num_processes x gradient_accumulation_steps` with `optim.grad_accum_steps` microbatches
    (the official scheduler horizon is multiplied by num_processes and accelerate steps it
    num_processes times per update, i.e. one schedule step per update, as here).

The official loss terms are logged under other names by tok1d: `LOG_NAMES`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from tok1d import config_lib, recipes
from tok1d.convert import maskgit as convert_maskgit
from tok1d.convert.common import ConversionError

# Official log name (what `train_one_epoch_generator` passes to accelerator.log) -> the
# generator train step's scalar.
LOG_NAMES = {"train/loss": "loss", "train/correct_tokens": "masked_accuracy"}

# accelerate `mixed_precision` -> tok1d compute dtype (params and optimizer state stay float32
# in both).
PRECISIONS = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The EMA decay `create_model_and_loss_module` gives `EMAModel` (not a config field upstream).
EMA_DECAY = 0.999

SCHEDULERS = ("cosine", "constant")


def _get(d: Mapping[str, Any], path: str, default: Any = None) -> Any:
    for key in path.split("."):
        if not isinstance(d, Mapping) or key not in d:
            return default
        d = d[key]
    return d


def _require(official: Mapping[str, Any], paths: tuple[str, ...]) -> None:
    missing = [p for p in paths if _get(official, p) is None]
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
    _require(official, ("optimizer.params.learning_rate", "optimizer.params.beta1",
                        "optimizer.params.beta2", "optimizer.params.weight_decay",
                        "lr_scheduler.params.warmup_steps", "training.max_train_steps",
                        "training.per_gpu_batch_size"))
    name = _get(official, "optimizer.name", "adamw")
    if name != "adamw":
        raise config_lib.ConfigError(f"optimizer.name={name!r}: the official code only "
                                     "supports adamw")
    scheduler = _get(official, "lr_scheduler.scheduler", "cosine")
    if scheduler not in SCHEDULERS:
        raise config_lib.ConfigError(f"lr_scheduler.scheduler={scheduler!r} is not one of "
                                     f"{SCHEDULERS}")
    recipes.titok_train_utils(config)
    opt = _get(official, "optimizer.params")
    lr = float(opt["learning_rate"])
    base_lr = float(_get(official, "lr_scheduler.params.learning_rate", lr))
    end_lr = float(_get(official, "lr_scheduler.params.end_lr", 0.0))
    o = config.optim
    o.lr, o.b1, o.b2 = lr, float(opt["beta1"]), float(opt["beta2"])
    o.weight_decay = float(opt["weight_decay"])
    o.schedule = scheduler
    o.warmup_steps = int(_get(official, "lr_scheduler.params.warmup_steps"))
    o.end_lr = end_lr * lr / base_lr if base_lr else 0.0
    clip = _get(official, "training.max_grad_norm")
    o.grad_clip = float(clip) if clip is not None else 0.0
    accum = int(_get(official, "training.gradient_accumulation_steps", 1))
    o.grad_accum_steps = accum
    config.total_steps = int(_get(official, "training.max_train_steps"))
    config.batch_size = int(_get(official, "training.per_gpu_batch_size")) * num_processes * accum
    config.ema_decay = EMA_DECAY if _get(official, "training.use_ema", False) else 0.0
    precision = _get(official, "training.mixed_precision", "no")
    if precision not in PRECISIONS:
        raise config_lib.ConfigError(f"training.mixed_precision={precision!r} is not one of "
                                     f"{sorted(PRECISIONS)}")
    config.precision = PRECISIONS[precision]
    config.seed = int(_get(official, "training.seed", config.seed))


def config_from_official(official: Mapping[str, Any], num_processes: int = 1
                         ) -> ml_collections.ConfigDict:
    """The tok1d generator config of an official MaskGIT training config (a dict of the YAML,
    overrides applied). `num_processes`: the number of accelerate processes (GPUs) the official
    run used (the global batch is per_gpu_batch_size x num_processes x accumulation).

    Raises ConfigError for settings the official code itself does not support."""
    _require(official, ("model.generator", "model.vq_model", "losses.label_smoothing",
                        "losses.loss_weight_unmasked_token"))
    config = recipes.generator_base(1, 1)
    train_utils_optim(config, official, num_processes)
    gen = _get(official, "model.generator")
    try:
        model = convert_maskgit.kwargs_from_official(official)
    except ConversionError as e:
        raise config_lib.ConfigError(str(e)) from e
    config.model = dict(name="maskgit", **model)
    g = config.generator
    g.label_dropout = float(gen.get("class_label_dropout", 0.1))
    g.mask_schedule = "arccos"  # hard-coded in `masking_input_tokens`
    g.label_smoothing = float(_get(official, "losses.label_smoothing"))
    g.unmasked_weight = float(_get(official, "losses.loss_weight_unmasked_token"))
    g.num_sample_classes = min(g.num_sample_classes, model["num_classes"])
    config.sampling = ml_collections.ConfigDict(
        convert_maskgit.sampling_kwargs_from_official(official))
    return config
