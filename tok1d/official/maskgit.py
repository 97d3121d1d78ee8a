"""bytedance/1d-tokenizer's MaskGIT generator training -> a tok1d config.

    import yaml
    from tok1d.official import maskgit
    config = maskgit.config_from_official(yaml.safe_load(open("maskgit.yaml")))
    config.generator.tokens = "/gcs/BUCKET/tokens_titok_b64"   # python -m tok1d.cli.tokenize

`config_from_official` reads an official generator config (`configs/training/generator/*.yaml`
of `scripts/train_maskgit.py`, after any command-line overrides, as a plain dict) and returns
the config of tok1d's generator trainer that runs the same training step: the ImageBert /
UViTBert generator (`tok1d.weights.convert.maskgit.kwargs_from_official`), `MLMLoss`'s label smoothing
and unmasked-token weight, the class-label dropout, the arccos masking of
`masking_input_tokens`, and `utils/train_utils.py`'s optimizer, LR schedule, clipping and EMA
(`train_utils_optim`, semantics in `tok1d.recipes.titok_train_utils`). The train-step parity
test (tests/test_train_parity_maskgit.py) builds its model and optimizer through it from the
`meta.config` of every `train_maskgit*.npz` fixture.

Not reproduced (deliberate; everything else is, the BERT generator's attention-probability
dropout `attn_drop` included):
  * accelerate's multi-process mechanics: the global batch is `per_gpu_batch_size x
    num_processes x gradient_accumulation_steps` with `optim.grad_accum_steps` microbatches
    (the official scheduler horizon is multiplied by num_processes and accelerate steps it
    num_processes times per update, i.e. one schedule step per update, as here).

The official loss terms are logged under other names by tok1d: `LOG_NAMES`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from tok1d import recipes
from tok1d.train import config_lib
from tok1d.weights.convert import maskgit as convert_maskgit
from tok1d.weights.convert.common import ConversionError
from tok1d.official.train_utils import (get, require, resolve_interpolations,
                                        train_utils_optim)

# Official log name (what `train_one_epoch_generator` passes to accelerator.log) -> the
# generator train step's scalar.
LOG_NAMES = {"train/loss": "loss", "train/correct_tokens": "masked_accuracy"}

def config_from_official(official: Mapping[str, Any], num_processes: int = 1
                         ) -> ml_collections.ConfigDict:
    """The tok1d generator config of an official MaskGIT training config (a dict of the YAML,
    overrides applied). `num_processes`: the number of accelerate processes (GPUs) the official
    run used (the global batch is per_gpu_batch_size x num_processes x accumulation).

    Raises ConfigError for settings the official code itself does not support."""
    official = resolve_interpolations(official)
    require(official, ("model.generator", "model.vq_model", "losses.label_smoothing",
                        "losses.loss_weight_unmasked_token"))
    config = recipes.generator_base(total_steps=1, batch_size=1)
    train_utils_optim(config, official, num_processes)
    gen = get(official, "model.generator")
    try:
        model = convert_maskgit.kwargs_from_official(official)
    except ConversionError as e:
        raise config_lib.ConfigError(str(e)) from e
    config.model = dict(name="maskgit", **model)
    g = config.generator
    g.label_dropout = float(gen.get("class_label_dropout", 0.1))
    g.mask_schedule = "arccos"  # hard-coded in `masking_input_tokens`
    g.label_smoothing = float(get(official, "losses.label_smoothing"))
    g.unmasked_weight = float(get(official, "losses.loss_weight_unmasked_token"))
    g.num_sample_classes = min(g.num_sample_classes, model["num_classes"])
    config.sampling = ml_collections.ConfigDict(
        convert_maskgit.sampling_kwargs_from_official(official))
    config.sampling_precision = "float32"  # sample_imagenet_titok.py's fp32
    return config
