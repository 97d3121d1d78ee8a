"""bytedance/1d-tokenizer's RAR training -> a tok1d config.

    import yaml
    from tok1d.official import rar
    config = rar.config_from_official(yaml.safe_load(open("rar.yaml")), num_processes=32)
    config.generator.tokens = "/gcs/BUCKET/tokens_maskgit_vqgan"   # tok1d tokenize

`config_from_official` reads an official RAR config (`configs/training/generator/rar.yaml` of
`scripts/train_rar.py`, after any command-line overrides, as a plain dict) and returns the
config of tok1d's generator trainer that runs the same training step: the RAR generator
(`model.generator` sizes, dropout, attention dropout, `use_checkpoint` as remat "full"), the
class-label dropout, the randomness annealing (`randomness_anneal_start` / `_end`, steps),
`ARLoss`'s plain cross-entropy, and `utils/train_utils.py`'s optimizer, LR schedule, clipping
and EMA (`train_utils_optim` with RAR's weight-decay rule, `recipes.rar_train_utils`); the
sampling settings of the generator section (`guidance_scale`, `guidance_scale_pow`,
`randomize_temperature`) become `config.sampling`. The train-step parity test
(tests/test_train_parity_rar.py) builds its model and optimizer through it from the
`meta.config` of every `train_rar*.npz` fixture.

Not reproduced (deliberate): accelerate's multi-process mechanics, as in
`tok1d.official.maskgit` (the global batch is per_gpu_batch_size x num_processes x
accumulation; one schedule step per update).

The official loss terms are logged under other names by tok1d: `LOG_NAMES`.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from tok1d import recipes
from tok1d.official.train_utils import (get, require, resolve_interpolations,
                                        train_utils_optim)

# Official log name (what `train_one_epoch_generator` passes to accelerator.log) -> the
# generator train step's scalar.
LOG_NAMES = {"train/loss": "loss", "train/correct_tokens": "accuracy"}


def model_kwargs(official: Mapping[str, Any]) -> dict[str, Any]:
    """`RAR` arguments of an official config's `model.generator` and `model.vq_model`: the MLP
    width as `int(hidden_size * (intermediate_size / hidden_size))` like upstream."""
    gen, vq = get(official, "model.generator"), get(official, "model.vq_model")
    width, inter = int(gen["hidden_size"]), int(gen["intermediate_size"])
    return dict(vocab_size=int(vq["codebook_size"]), num_tokens=int(gen["image_seq_len"]),
                num_classes=int(gen["condition_num_classes"]), width=width,
                depth=int(gen["num_hidden_layers"]), num_heads=int(gen["num_attention_heads"]),
                mlp_dim=int(width * (inter / width)), dropout_rate=float(gen["dropout"]),
                attention_dropout=float(gen["attn_drop"]),
                remat="full" if gen.get("use_checkpoint", False) else "none")


def sampling_kwargs(official: Mapping[str, Any]) -> dict[str, Any]:
    """`tok1d.generation.autoregressive.make_rar_sampler` options of the generator section
    (what `sample_imagenet_rar.py` passes to `generate`)."""
    gen = get(official, "model.generator")
    return dict(guidance_scale=float(gen["guidance_scale"]),
                guidance_scale_pow=float(gen["guidance_scale_pow"]),
                randomize_temperature=float(gen["randomize_temperature"]))


def config_from_official(official: Mapping[str, Any], num_processes: int = 1
                         ) -> ml_collections.ConfigDict:
    """The tok1d generator config of an official RAR training config (a dict of the YAML,
    overrides applied). `num_processes`: the number of accelerate processes (GPUs) the official
    run used (the released runs: 32, i.e. batch 64 x 32 = 2048).

    Raises ConfigError for settings the official code itself does not support."""
    official = resolve_interpolations(official)
    require(official, tuple(f"model.generator.{k}" for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "dropout", "attn_drop", "class_label_dropout", "image_seq_len", "condition_num_classes",
        "randomness_anneal_start", "randomness_anneal_end", "guidance_scale",
        "guidance_scale_pow", "randomize_temperature")) + ("model.vq_model.codebook_size",))
    config = recipes.generator_base(total_steps=1, batch_size=1)
    train_utils_optim(config, official, num_processes)
    recipes.rar_train_utils(config)
    config.model = dict(name="rar", **model_kwargs(official))
    gen = get(official, "model.generator")
    g = config.generator
    g.label_dropout = float(gen["class_label_dropout"])
    g.randomness_anneal_start = int(gen["randomness_anneal_start"])
    g.randomness_anneal_end = int(gen["randomness_anneal_end"])
    g.num_sample_classes = min(g.num_sample_classes, config.model.num_classes)
    config.sampling = ml_collections.ConfigDict(sampling_kwargs(official))
    config.sampling_precision = "float32"  # sample_imagenet_rar.py's fp32
    return config
