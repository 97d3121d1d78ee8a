"""Shared building blocks of the recipe families in configs/ (titok.py, gigatok.py,
maskgit_titok.py, gpt_gigatok.py, rar.py) and of the official-config mappings in
tok1d.official.

Each block sets one named piece of a recipe on a config: the ImageNet data (`imagenet`,
`imagenet_adm`), the pod-scale run settings (`pod_run`), the generator trainer's defaults
(`generator_base`), and the official training steps' semantics as tok1d options
(`titok_train_utils`, `rar_train_utils`, `titok_disc_optim`, `gigatok_vq_train` with
`gigatok_step`, `llamagen_train_c2i`), which the train-step parity tests check against the
official code. The numbers of each variant (sizes, steps, batch, loss weights, learning rates)
are written in its family file.
"""

from __future__ import annotations

import ml_collections

from tok1d.train import config_lib
from tok1d.train import optim


def unknown_variant(family: str, arg: str, variants) -> ValueError:
    """The error of `get_config(arg)` in `configs/<family>` for an arg that names no variant."""
    what = f"unknown variant {arg!r}" if arg else "no variant given"
    return ValueError(f"configs/{family}: {what}; use --config=configs/{family}:ARG with ARG one "
                      f"of {', '.join(variants)}")


def imagenet(config: ml_collections.ConfigDict) -> None:
    """TFDS imagenet2012 (array_record), TiTok's augmentation: shorter side 256 + random crop
    + flip with torchvision's rounding; 10k validation images for the periodic eval."""
    config.data.name = "tfds:imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 256
    config.data.augment = "random_crop"
    config.data.resize_rule = "torchvision"  # Resize(256) + RandomCrop / CenterCrop
    config.data.num_workers = -1  # one grain worker per core but one (at most 16)
    config.data.resize_on = "device"  # the host decodes, the accelerator resizes
    config.data.eval_examples = 10_000


def imagenet_adm(config: ml_collections.ConfigDict) -> None:
    """`imagenet` with LlamaGen / GigaTok's augmentation: ADM's `random_crop_arr` (shorter
    side drawn from 256..320 = 256 / 0.8, a random 256 crop, flip) and `center_crop_arr` for
    evaluation, with ADM's rounding. Their BOX halving of large images is not reproduced: the
    reduced-size JPEG decode plays that part."""
    imagenet(config)
    config.data.augment = "adm_random_crop"
    config.data.resize_rule = "adm"
    config.data.min_scale = 0.8


def adm_evaluation(config: ml_collections.ConfigDict) -> None:
    """The Inception Score of ADM's evaluator (guided-diffusion's evaluations/evaluator.py,
    which TiTok's and GigaTok's papers report): consecutive parts of 5,000 images."""
    config.evaluation.is_split_size = 5_000


def pod_run(config: ml_collections.ConfigDict) -> None:
    """FSDP over all devices, logs every 100 steps, eval every 50k, checkpoints every 5k."""
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.log_every_steps = 100
    config.eval_every_steps = 50_000
    config.checkpoint.every_steps = 5_000
    config.checkpoint.keep = 3


def generator_base(*, total_steps: int, batch_size: int) -> ml_collections.ConfigDict:
    """Generator trainer defaults: token dataset in `generator.tokens`, ImageNet's 1000
    classes, bf16 compute, FSDP over all devices, an eval every 25k steps on 10k validation
    images with an 80-image sample grid of classes 0..9."""
    config = config_lib.base_config("generator")
    config.total_steps = total_steps
    config.batch_size = batch_size
    config.eval_batch_size = 256
    config.precision = "bfloat16"
    config.data.train_split, config.data.eval_split = "train", "validation"
    config.data.eval_examples = 10_000
    config.generator.num_sample_classes = 10
    config.num_grid_images = 80
    adm_evaluation(config)
    pod_run(config)
    config.eval_every_steps = 25_000
    return config


# --------------------------------------------------------------------------- official semantics


def titok_train_utils(config: ml_collections.ConfigDict) -> None:
    """The training-step semantics of bytedance/1d-tokenizer's `utils/train_utils.py` on
    `config.optim` and the EMA (the train-step parity tests check them against the official
    step):

    * `create_optimizer`: no weight decay for 1-D tensors and names containing any of
      `optim.TITOK_NO_DECAY_NAMES` (decay_mask "kernels" + no_decay_names); torch AdamW's
      eps 1e-8 (the YAML's `epsilon` is never passed);
    * `create_lr_scheduler`: a `LambdaLR` stepped after `optimizer.step()` (schedule_step
      "before": with a warm-up from 0 the first update runs at LR 0);
    * accelerate's `clip_grad_norm_` (torch's rule: scale max / (norm + 1e-6));
    * `EMAModel` (decay 0.999 when used) with its warm-up min(decay, (1 + s) / (10 + s))
      (ema_warmup "titok")."""
    o = config.optim
    o.decay_mask, o.no_decay_names = "kernels", optim.TITOK_NO_DECAY_NAMES
    o.eps, o.clip_eps, o.schedule_step, o.warmup_init = 1e-8, 1e-6, "before", 0.0
    config.ema_warmup = "titok"


def rar_train_utils(config: ml_collections.ConfigDict) -> None:
    """The training-step semantics of bytedance/1d-tokenizer's RAR (`scripts/train_rar.py`
    through `utils/train_utils.py`; tests/test_train_parity_rar.py checks them against the
    official step): `titok_train_utils`, with the weight-decay mask "matrices": the official
    rule decays every tensor of >= 2 dims whose name contains none of
    `optim.TITOK_NO_DECAY_NAMES`, which includes RAR's `cls_token` (a (1, 1, W) tensor, not a
    kernel) and excludes the head's `adaln_before_head.adaLN_modulation` ("ln" in "adaln") but
    not the blocks' `adaLN_modulation`; tok1d's RAR keeps the official names, so the same
    substrings select the same tensors."""
    titok_train_utils(config)
    config.optim.decay_mask = "matrices"


def llamagen_train_c2i(config: ml_collections.ConfigDict) -> None:
    """The training-step semantics of LlamaGen / GigaTok `autoregressive/train/train_c2i.py` on
    `config.optim` and the EMA (checked by the train-step parity tests):

    * `creat_optimizer`: weight decay on every tensor with ndim >= 2, embeddings included
      (decay_mask "matrices"), none on RMSNorm weights; torch AdamW eps 1e-8;
    * the LR scheduler is a function called after `optimizer.step()` that sets the next step's
      LR, nothing sets it before the first step (schedule_step "after_call": update 1 at the
      base LR); its warm-up starts at lr / 100 (`_warmup_lr`'s init_div_factor: warmup_init
      0.01);
    * `clip_grad_norm_` (torch's rule, clip_eps 1e-6);
    * `update_ema(decay=0.9999)` after every step, no warm-up (ema_warmup "none"; with --ema)."""
    o = config.optim
    o.decay_mask, o.no_decay_names = "matrices", ""
    o.eps, o.clip_eps, o.schedule_step, o.warmup_init = 1e-8, 1e-6, "after_call", 0.01
    config.ema_warmup = "none"


def titok_disc_optim(config: ml_collections.ConfigDict, *, lr: float, base_lr: float,
                     end_lr: float, num_processes: int = 1) -> None:
    """TiTok's discriminator optimizer (bytedance/1d-tokenizer `utils/train_utils.py`), from
    the generator's `config.optim` (set it first):

    * `create_optimizer` gives D the generator's AdamW (betas, weight decay with the same
      name-based split, torch eps, clipping at `max_grad_norm`) at D's own `lr`;
    * `create_lr_scheduler` gives D the generator's scheduler: its warm-up and a cosine built
      with the *generator's* base / end LR (`base_lr`, `end_lr`) multiplying D's LR, i.e. a
      cosine from `lr` to lr * end_lr / base_lr; stepped only on D steps (D's update k uses
      step k - 1: schedule_step "before" on D's own count), with a horizon of
      max_train_steps * P - discriminator_start scheduler steps, P = `num_processes` (the
      official run's GPUs; accelerate steps it P times per update):
      `discriminator.schedule_processes`."""
    g, d = config.optim, config.disc_optim
    for key in ("b1", "b2", "eps", "weight_decay", "decay_mask", "no_decay_names", "schedule",
                "schedule_step", "warmup_steps", "warmup_init", "grad_clip", "clip_eps",
                "mu_dtype"):
        d[key] = g[key]
    d.lr = lr
    d.end_lr = lr * end_lr / base_lr if base_lr else 0.0
    config.discriminator.global_schedule = False
    config.discriminator.schedule_processes = num_processes


def gigatok_step(official: int) -> int:
    """vq_train.py compares its thresholds (`aux_loss_end`, `disc_start`) with the 1-based
    `global_step = train_steps + 1` (`global_step < aux_loss_end`, `>= disc_start`); tok1d's
    `aux_loss_end_step` / `discriminator.start_step` compare the 0-based step: official - 1."""
    return max(int(official) - 1, 0)


def gigatok_vq_train(config: ml_collections.ConfigDict) -> None:
    """The training-step semantics of GigaTok's `tokenizer/tokenizer_image/vq/vq_train.py` +
    `vq_loss.VQLoss` (checked by tests/test_train_parity_gigatok.py against the official step):

    * LPIPS in train mode: its linear layers' Dropout(0.5) is active (perceptual.lpips_dropout);
    * `cosine_schedule_with_warmup_v2` / `const_lr` / `wsd_lr` are functions called after
      `optimizer.step()` that set the next step's LR (schedule_step "after_call": step 1 at the
      base LR), warm-up from lr / 100 (warmup_init 0.01); the D scheduler is called only on D
      steps but with the global step (global_schedule: D's first step at the construction LR);
    * torch AdamW (eps 1e-8) over all parameters in one group (decay_mask "all"; the FSDP
      trainer's "no_norm" is kept where a recipe sets it) and `clip_grad_norm_` with the same
      threshold for G and D (torch's rule, clip_eps 1e-6);
    * the PatchGAN's BatchNorm in train mode with its running statistics kept (in the train
      state's disc_state), D called on the real batch first (call_order "real_fake"; the DINO
      discriminator's step calls it on the fake batch first);
    * in a warm-up + GAN overlap step the "direct" G term and D's third fake call see the
      shortcut reconstruction x~ with PatchGAN, but the reconstruction x_hat again with the DINO
      discriminator (VQLoss's dinodisc branch; `discriminator.direct_fake`), each D call with
      fresh DiffAugment draws (tests/test_train_parity_gigatok_dino.py);
    * `update_ema` without warm-up (ema_warmup "none", when ema_decay > 0)."""
    for o in (config.optim, config.disc_optim):
        o.schedule_step, o.warmup_init, o.eps, o.clip_eps = "after_call", 0.01, 1e-8, 1e-6
        if o.decay_mask not in ("all", "no_norm"):
            o.decay_mask = "all"
        o.no_decay_names = ""
    config.disc_optim.grad_clip = config.optim.grad_clip
    config.perceptual.lpips_dropout = 0.5
    config.ema_warmup = "none"
    d = config.discriminator
    d.global_schedule = True  # scheduler_disc(train_steps)
    if d.name == "patchgan":
        d.call_order = "real_fake"
        d.model.track_running_stats = True
        d.direct_fake = "shortcut"
    else:
        d.call_order = "fake_real"
        d.direct_fake = "reconstruction"
