"""bytedance/1d-tokenizer's TiTok tokenizer training (two-stage recipe) -> a tok1d config.

    import yaml
    from tok1d.official import titok
    config = titok.config_from_official(yaml.safe_load(open("titok_l32.yaml")), num_processes=8)

`config_from_official` reads an official TiTok training config
(`configs/training/TiTok/stage{1,2}/*.yaml` of `scripts/train_titok.py`, after any command-line
overrides, as a plain dict) and returns the config of tok1d's tokenizer trainer that runs the
same training step:

  stage 1 (`finetune_decoder` false): `TiTok` with the legacy 1024-way proxy-code head
      (`tok1d.weights.convert.titok.kwargs_from_official`), `ReconstructionLoss_Stage1` (proxy-code CE +
      `quantizer_weight` x VQ losses) against the frozen MaskGIT-VQGAN teacher
      (`teacher.weights` = `pretrained_tokenizer_weight`; the train step takes its codes as the
      replayable draw "proxy_codes", see `tok1d.objectives.tokenizer_loss`);
  stage 2 (`finetune_decoder` true): encoder / latent tokens / codebook frozen, decoder +
      pixel codebook + MaskGIT-VQGAN pixel decoder trained with `ReconstructionLoss_Stage2`:
      `reconstruction_weight` x L2 (or L1) + `perceptual_weight` x `perceptual_loss` (ConvNeXt-S
      logits of 224-px resizes) + `discriminator_weight` x `discriminator_factor` x hinge G
      term from `discriminator_start` (0-based global step, `d_weight` fixed: no adaptive
      weight); the `NLayerDiscriminator` trained after the G update on the same detached
      reconstruction with `discriminator_factor` x hinge + `lecam_regularization_weight` x
      LeCam (EMAs of the mean logits from before their update, decay `lecam_ema_decay`);

and `utils/train_utils.py`'s optimizers, LR schedules, clipping and EMA for both
(`tok1d.official.train_utils.train_utils_optim`; semantics in `tok1d.recipes.titok_train_utils`),
including the discriminator scheduler's quirks (`tok1d.recipes.titok_disc_optim`).

Released-size stand-ins: the official code hard-codes the stage-2 pixel decoder (the released
MaskGIT-VQGAN) and the `NLayerDiscriminator` defaults; `pixel_decoder` / `discriminator` give
other sizes (the golden fixtures' `meta.pixel_decoder_config` / `meta.discriminator_ctor`).

Not reproduced (deliberate; everything else is):
  * accelerate's multi-process mechanics beyond the schedules: the global batch is
    `per_gpu_batch_size x num_processes x gradient_accumulation_steps` (`optim.grad_accum_steps`
    microbatches); BatchNorm-free models, so only the LeCam EMAs (rank 0's local means
    upstream, the global batch means here) see the difference;
  * the data pipeline: webdataset shards become `data.name`; `resize_shorter_edge` is taken
    as `crop_size` (equal in the released configs) before the random / center crop;
  * fp16 autocast with a gradient scaler (`mixed_precision: fp16`) runs as float16 compute
    without loss scaling (use bfloat16 on TPUs); `no` is float32, as the parity fixtures.

The official loss log names are derived from the train step's scalars by `log_values`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import ml_collections

from tok1d import recipes
from tok1d.train import config_lib
from tok1d.weights.convert import titok as convert_titok
from tok1d.weights.convert.common import ConversionError
from tok1d.official.train_utils import get, require, resolve_interpolations, train_utils_optim

# `NLayerDiscriminator`'s BLUR_KERNEL_MAP (blur_kernel_size -> 1-D kernel).
BLUR_KERNELS = {3: (1, 2, 1), 4: (1, 3, 3, 1), 5: (1, 4, 6, 4, 1)}
# `NLayerDiscriminator.__init__` defaults (the official loss module passes no arguments).
DISCRIMINATOR_DEFAULTS = dict(num_channels=3, hidden_channels=128, num_stages=3,
                              blur_resample=True, blur_kernel_size=4)
# `PerceptualLoss` resizes to 224 px whatever the image size.
PERCEPTUAL_SIZE = 224
FROZEN_STAGE2 = "encoder,latent_tokens,quantize"


def _model_kwargs(official: Mapping[str, Any], size_tables, pixel_decoder) -> dict[str, Any]:
    config = dict(official)
    if pixel_decoder:
        config["pixel_decoder"] = dict(pixel_decoder)
        if "pixel_codebook" in pixel_decoder:
            config["pixel_quantize"] = list(pixel_decoder["pixel_codebook"])
    try:
        return convert_titok.kwargs_from_official(config, size_tables=size_tables)
    except ConversionError as e:
        raise config_lib.ConfigError(str(e)) from e


def discriminator_kwargs(ctor: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """`NLayerDiscriminator(**ctor)` arguments -> `TiTokDiscriminator` arguments."""
    c = dict(DISCRIMINATOR_DEFAULTS, **(ctor or {}))
    if int(c["num_channels"]) != 3:
        raise config_lib.ConfigError(f"NLayerDiscriminator num_channels={c['num_channels']}: "
                                     "tok1d's discriminator takes RGB images")
    blur = None
    if c["blur_resample"]:
        size = int(c["blur_kernel_size"])
        if size not in BLUR_KERNELS:
            raise config_lib.ConfigError(f"blur_kernel_size={size} is not one of "
                                         f"{sorted(BLUR_KERNELS)} (the official map)")
        blur = BLUR_KERNELS[size]
    return dict(hidden_channels=int(c["hidden_channels"]), num_stages=int(c["num_stages"]),
                blur_kernel=blur)


def config_from_official(official: Mapping[str, Any], num_processes: int = 1, *,
                         size_tables: Optional[Mapping[str, Mapping[str, int]]] = None,
                         pixel_decoder: Optional[Mapping[str, Any]] = None,
                         discriminator: Optional[Mapping[str, Any]] = None
                         ) -> ml_collections.ConfigDict:
    """The tok1d tokenizer config of an official TiTok stage-1 or stage-2 training config (a
    dict of the YAML, overrides applied).

    `num_processes`: accelerate processes (GPUs) of the official run (global batch, and the
    discriminator schedule's horizon, see `recipes.titok_disc_optim`). `size_tables`: ViT size
    names beyond small / base / large ({name: {width, num_layers, num_heads}}). `pixel_decoder`:
    the stage-2 MaskGIT-VQGAN decoder's {hidden_channels, channel_mult, num_res_blocks,
    z_channels, pixel_codebook: [codes, dim]} (default: the released one). `discriminator`:
    `NLayerDiscriminator` constructor arguments (default: the official defaults).

    Weights are not part of the mapping: stage 1 reads the teacher from `teacher.weights`
    (set to `pretrained_tokenizer_weight`, an official .bin is read directly); stage 2 starts
    from converted weights (`init.checkpoint`: the stage-1 run, `init.pixel_decoder`: the
    converted MaskGIT-VQGAN) and `perceptual.weights` (the converted ConvNeXt-S). Raises
    ConfigError for settings the official code does not support."""
    official = resolve_interpolations(official)
    require(official, ("model.vq_model", "dataset.preprocessing.crop_size", "losses"))
    vq = get(official, "model.vq_model")
    if not vq.get("is_legacy", True):
        raise config_lib.ConfigError(
            "model.vq_model.is_legacy=False: the official two-stage losses need the legacy "
            "proxy-code head; single-stage TiTok has no official training config (use "
            "configs/titok.py:bl64 and the other single-stage variants)")
    stage2 = bool(vq.get("finetune_decoder", False))
    config = config_lib.base_config("tokenizer")
    train_utils_optim(config, official, num_processes)
    config.eval_batch_size = config.batch_size  # the eval loader's per-GPU batch is the same
    kwargs = _model_kwargs(official, size_tables, pixel_decoder if stage2 else None)
    config.data.image_size = int(kwargs.pop("image_size"))
    pre = get(official, "dataset.preprocessing")
    # resize_shorter_edge is taken as crop_size (equal in the released configs).
    config.data.augment = "random_crop" if pre.get("random_crop", True) else "center_crop"
    config.data.flip = bool(pre.get("random_flip", True))
    config.data.resize_rule = "torchvision"  # the webdataset loader's Resize + Random/CenterCrop
    config.model = dict(name="titok", **kwargs)
    config.losses.update({k: 0.0 for k in config.losses})
    losses = get(official, "losses")
    config.losses.quantizer = float(losses.get("quantizer_weight", 1.0))
    if not stage2:
        config.losses.proxy_ce = 1.0
        config.teacher.name = "maskgit_vqgan"
        config.teacher.weights = str(vq.get("pretrained_tokenizer_weight", ""))
        return config

    config.optim.freeze = FROZEN_STAGE2
    rec = losses.get("reconstruction_loss", "l2")
    if rec not in ("l1", "l2"):
        raise config_lib.ConfigError(f"losses.reconstruction_loss={rec!r} is not l1 or l2")
    config.losses[rec] = float(losses.get("reconstruction_weight", 1.0))
    config.losses.perceptual = float(losses.get("perceptual_weight", 0.0))
    config.perceptual.kind = str(losses.get("perceptual_loss", "convnext_s"))
    config.perceptual.image_size = PERCEPTUAL_SIZE
    factor = float(losses.get("discriminator_factor", 1.0))
    config.losses.gan = float(losses.get("discriminator_weight", 0.0)) * factor
    d = config.discriminator
    d.name, d.loss = "titok", "hinge"
    d.start_step = int(losses.get("discriminator_start", 0))
    d.d_weight = factor
    d.lecam = float(losses.get("lecam_regularization_weight", 0.0))
    d.lecam_decay = float(losses.get("lecam_ema_decay", 0.999))
    d.model = ml_collections.ConfigDict(discriminator_kwargs(discriminator))
    d_lr = get(official, "optimizer.params.discriminator_learning_rate")
    if d_lr is None:
        raise config_lib.ConfigError("The official config lacks "
                                     "optimizer.params.discriminator_learning_rate")
    base_lr = float(get(official, "lr_scheduler.params.learning_rate",
                         get(official, "optimizer.params.learning_rate")))
    recipes.titok_disc_optim(config, lr=float(d_lr), base_lr=base_lr,
                             end_lr=float(get(official, "lr_scheduler.params.end_lr", 0.0)),
                             num_processes=num_processes)
    return config


def log_values(scalars: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The official `train/<name>` log values (`ReconstructionLoss_Stage1` / `_Stage2` loss
    dicts, weighted as upstream logs them) from the scalars of one tok1d train step of a
    `config_from_official` config. D-step entries only when the config has a GAN term (their
    values are meaningful on steps with `gan_active`)."""
    losses = config.losses
    get = lambda name: scalars.get(name, 0.0)  # noqa: E731  (a term of weight 0 is not run)
    out = {"total_loss": scalars["loss"],
           "quantizer_loss": losses.quantizer * get("loss_quantizer"),
           "commitment_loss": get("quantizer_commitment"),
           "codebook_loss": get("quantizer_codebook")}
    if losses.proxy_ce:
        out["reconstruction_loss"] = get("loss_proxy_ce")
        return out
    rec = "l1" if losses.l1 else "l2"
    out["reconstruction_loss"] = losses[rec] * get(f"loss_{rec}")
    out["perceptual_loss"] = losses.perceptual * get("loss_perceptual")
    if losses.gan:
        d = config.discriminator
        on = scalars["gan_active"]
        out.update(gan_loss=get("loss_gan") * on,
                   weighted_gan_loss=losses.gan * on * get("loss_gan"),
                   discriminator_factor=d.d_weight * on,
                   d_weight=losses.gan / d.d_weight if d.d_weight else losses.gan,
                   discriminator_loss=scalars["d_loss"], logits_real=scalars["d_logits_real"],
                   logits_fake=scalars["d_logits_fake"],
                   lecam_loss=d.lecam * get("d_lecam"))
    return out
