"""LlamaGen / GigaTok class-conditional GPT training (`autoregressive/train/train_c2i.py`) ->
a tok1d config.

    from tok1d.official import gpt
    config = gpt.config_from_official(
        model_args=dict(dim=768, n_layer=12, n_head=12, vocab_size=16384, block_size=256),
        train_args=dict(lr=1e-4, lr_scheduler="wsd", warmup=5000, iterations=1_500_000))
    config.generator.tokenizer = "gigatok_b_l/"   # encodes the images (--dataset imagenet)

`model_args`: the fields of the `ModelArgs` the script builds (`dataclasses.asdict` of it, or
just the fields that differ from the defaults: `GPT_models[--gpt-model]`'s sizes plus the
keyword arguments train_c2i passes). `train_args`: train_c2i.py's argparse values under their
`dest` names (lr, weight_decay, beta1, beta2, max_grad_norm, global_batch_size, iterations,
warmup, lr_scheduler, end_lr, fract_decay, ema, mixed_precision, global_seed, gpt_2d, dataset,
image_size); missing ones take train_c2i's defaults (`TRAIN_DEFAULTS`). The result is the generator trainer config
that runs the same training step: the `gpt_1d.Transformer` (c2i) as `tok1d.models.generators.gpt.GPT`,
the class dropout to the null class, `creat_optimizer`'s decay split, the scheduler function
called after the step, clipping and `update_ema` (semantics in
`tok1d.recipes.llamagen_train_c2i`), and the data: `--dataset imagenet` (the default)
encodes an ADM random crop + flip of each image with the frozen `generator.tokenizer` in every
step (generator.token_source "images"), `imagenet_code` reads a token dataset
(`generator.tokens`, written by `tok1d tokenize`, e.g. `--crop=ten_crop` as
extract_codes_c2i.py's ten crops). The train-step parity test
(tests/test_train_parity_gpt.py) builds its model and optimizer through it from the `meta` of
every `train_gpt*.npz` fixture.

Refused (ConfigError, listing every one): options tok1d's GPT does not implement -- stochastic
depth (drop_path_rate > 0), attention-probability dropout, a residual dropout different from
the FFN dropout, grouped KV heads, QK-norm, adaLN, more than one class token, text
conditioning (t2i), and gpt_1d's 1D RoPE (tok1d's `rope` is the 2D RoPE of `--gpt-2d`).
Not reproduced: `--gradient-accumulation-steps` (parsed but unused by train_c2i) and
`--early-stop-iter` (stop the tok1d run by hand: `total_steps` is the schedule's horizon).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import ml_collections

from tok1d import recipes
from tok1d.train import config_lib
from tok1d.models.generators.gpt import find_multiple

# train_c2i.py's argparse defaults of the arguments this mapping reads.
TRAIN_DEFAULTS: dict[str, Any] = dict(
    lr=1e-4, weight_decay=5e-2, beta1=0.9, beta2=0.95, max_grad_norm=1.0,
    global_batch_size=256, iterations=1_500_000, warmup=0, lr_scheduler="const", end_lr=1e-5,
    fract_decay=0.2, ema=False, mixed_precision="bf16", global_seed=0, gpt_2d=False,
    dataset="imagenet", image_size=256)

# --dataset -> generator.token_source: "imagenet" encodes an ADM random crop + flip of each
# image in every step (the frozen tokenizer's `encode` under no_grad), "imagenet_code" reads
# codes extracted beforehand (extract_codes_c2i.py; tok1d: `tok1d tokenize`).
DATASETS = {"imagenet": "images", "imagenet_code": "dataset"}
IMAGE_SIZES = (256, 384, 448, 512)

# gpt_1d.ModelArgs defaults of the fields this mapping reads.
MODEL_DEFAULTS: dict[str, Any] = dict(
    dim=4096, n_layer=32, n_head=32, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None,
    norm_eps=1e-5, token_dropout_p=0.1, attn_dropout_p=0.0, resid_dropout_p=0.1,
    ffn_dropout_p=0.1, drop_path_rate=0.0, rope=False, use_qk_norm=False, use_adaLN=False,
    use_simple_adaLN=False, num_classes=1000, class_dropout_prob=0.1, model_type="c2i",
    vocab_size=16384, cls_token_num=1, block_size=256)

PRECISIONS = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}

# `update_ema`'s decay as train_c2i calls it (not an argument upstream).
EMA_DECAY = 0.9999

# The log name of the loss in the fixtures / train_c2i -> the generator train step's scalar.
LOG_NAMES = {"loss": "loss"}


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """gpt_1d `FeedForward`'s SwiGLU hidden width."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


def model_kwargs(model_args: Mapping[str, Any], gpt_2d: bool = False) -> dict[str, Any]:
    """`tok1d.models.generators.gpt.GPT` keyword arguments of a `ModelArgs` (ConfigError for options
    tok1d's GPT does not implement)."""
    m = {**MODEL_DEFAULTS, **model_args}
    problems = []
    if m["model_type"] != "c2i":
        problems.append(f"model_type={m['model_type']!r} (only class-conditional 'c2i')")
    if m["cls_token_num"] != 1:
        problems.append(f"cls_token_num={m['cls_token_num']} (one class token)")
    if m["n_kv_head"] not in (None, m["n_head"]):
        problems.append(f"n_kv_head={m['n_kv_head']} != n_head={m['n_head']} (grouped KV)")
    for flag in ("use_qk_norm", "use_adaLN", "use_simple_adaLN"):
        if m[flag]:
            problems.append(f"{flag}=True")
    if m["drop_path_rate"]:
        problems.append(f"drop_path_rate={m['drop_path_rate']} (stochastic depth)")
    if m["attn_dropout_p"]:
        problems.append(f"attn_dropout_p={m['attn_dropout_p']} (attention dropout)")
    if m["resid_dropout_p"] != m["ffn_dropout_p"]:
        problems.append(f"resid_dropout_p={m['resid_dropout_p']} != ffn_dropout_p="
                        f"{m['ffn_dropout_p']} (one residual dropout rate)")
    if m["rope"] and not gpt_2d:
        problems.append("rope=True in gpt_1d (its 1D RoPE; tok1d's rope is the 2D RoPE of "
                        "--gpt-2d)")
    if problems:
        raise config_lib.ConfigError("The official GPT uses options tok1d does not implement:"
                                     "\n  - " + "\n  - ".join(problems))
    return dict(vocab_size=int(m["vocab_size"]), num_tokens=int(m["block_size"]),
                num_classes=int(m["num_classes"]), width=int(m["dim"]),
                depth=int(m["n_layer"]), num_heads=int(m["n_head"]),
                mlp_dim=ffn_hidden(int(m["dim"]), int(m["multiple_of"]),
                                   m["ffn_dim_multiplier"]),
                token_dropout=float(m["token_dropout_p"]),
                dropout_rate=float(m["resid_dropout_p"]), rope=bool(gpt_2d),
                norm_eps=float(m["norm_eps"]))


def config_from_official(model_args: Mapping[str, Any], train_args: Mapping[str, Any]
                         ) -> ml_collections.ConfigDict:
    """The tok1d generator config of a train_c2i.py run (see the module docstring)."""
    t = {**TRAIN_DEFAULTS, **dict(train_args)}
    unknown = sorted(set(t) - set(TRAIN_DEFAULTS))
    if unknown:
        raise config_lib.ConfigError(f"Unknown train_c2i arguments {unknown}; this mapping "
                                     f"reads {sorted(TRAIN_DEFAULTS)}.")
    if t["mixed_precision"] not in PRECISIONS:
        raise config_lib.ConfigError(f"mixed_precision={t['mixed_precision']!r} is not one of "
                                     f"{sorted(PRECISIONS)}")
    model = model_kwargs(model_args, gpt_2d=bool(t["gpt_2d"]))
    config = recipes.generator_base(total_steps=int(t["iterations"]),
                                    batch_size=int(t["global_batch_size"]))
    config.precision = PRECISIONS[t["mixed_precision"]]
    config.seed = int(t["global_seed"])
    config.model = dict(name="gpt", **model)
    m = {**MODEL_DEFAULTS, **model_args}
    config.generator.label_dropout = float(m["class_dropout_prob"])
    config.generator.num_sample_classes = min(config.generator.num_sample_classes,
                                              model["num_classes"])
    recipes.llamagen_train_c2i(config)
    o = config.optim
    o.lr, o.end_lr = float(t["lr"]), float(t["end_lr"])
    o.b1, o.b2, o.weight_decay = float(t["beta1"]), float(t["beta2"]), float(t["weight_decay"])
    o.grad_clip = float(t["max_grad_norm"])  # 0: train_c2i skips clip_grad_norm_
    scheduler = t["lr_scheduler"]
    if scheduler == "const":  # the scheduler is never called: the base LR throughout
        o.schedule, o.warmup_steps = "constant", 0
    elif scheduler == "cosine":  # cosine_schedule_with_warmup_v2
        o.schedule, o.warmup_steps = "cosine", int(t["warmup"])
    elif scheduler == "wsd":  # wsd_lr (sqrt decay to 0 over the last fract_decay)
        o.schedule, o.warmup_steps = "wsd", int(t["warmup"])
        o.decay_fraction = float(t["fract_decay"])
    else:
        raise config_lib.ConfigError(f"lr_scheduler={scheduler!r} is not one of const, "
                                     "cosine, wsd")
    config.ema_decay = EMA_DECAY if t["ema"] else 0.0
    if t["dataset"] not in DATASETS:
        raise config_lib.ConfigError(f"dataset={t['dataset']!r} is not one of "
                                     f"{', '.join(DATASETS)}")
    if int(t["image_size"]) not in IMAGE_SIZES:
        raise config_lib.ConfigError(f"image_size={t['image_size']} is not one of "
                                     f"{IMAGE_SIZES} (train_c2i's --image-size choices)")
    config.generator.token_source = DATASETS[t["dataset"]]
    recipes.imagenet_adm(config)  # random_crop_arr + flip; center_crop_arr for the val loss
    config.data.image_size = int(t["image_size"])
    return config
