"""Building blocks of the paper-recipe config files in configs/ (TiTok and GigaTok on
ImageNet-1k).

Numbers are those of the official training configs: bytedance/1d-tokenizer
(configs/training/TiTok/stage{1,2}/*.yaml and the maintainers' description of the single-stage
recipe) and SilentView/GigaTok (configs/vq/VQ_*.yaml with its trainer defaults); each config
file's docstring gives the command, compute and target numbers.
"""

from __future__ import annotations

import ml_collections

from tok1d.train import config_lib
from tok1d.train import optim

# name: (encoder size, decoder size, latent tokens)
TWO_STAGE = {"l32": ("large", "large", 32), "b64": ("base", "base", 64),
             "s128": ("small", "small", 128)}
# name: (encoder, decoder, tokens, quantizer)  (VQ-8k: 8192 x 64 codes; VAE: 16 channels)
SINGLE_STAGE = {
    "bl64": ("base", "large", 64, "vq"), "bl128": ("base", "large", 128, "vq"),
    "sl256": ("small", "large", 256, "vq"), "ll32_vae": ("large", "large", 32, "vae"),
    "bl64_vae": ("base", "large", 64, "vae"), "bl128_vae": ("base", "large", 128, "vae"),
}
# Paper / README reconstruction FID of the released weights (ImageNet 256, 50k val images).
TARGET_RFID = {"l32": 2.21, "b64": 1.70, "s128": 1.71, "bl64": 2.06, "bl128": 1.49,
               "sl256": 1.03, "ll32_vae": 1.61, "bl64_vae": 1.25, "bl128_vae": 0.84}


def imagenet(config: ml_collections.ConfigDict) -> None:
    """TFDS imagenet2012 (array_record), TiTok's augmentation: shorter side 256 + random crop
    + flip; 10k validation images for the periodic eval."""
    config.data.name = "tfds:imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 256
    config.data.augment = "random_crop"
    config.data.num_workers = 16
    config.data.eval_examples = 10_000


def base(total_steps: int, warmup: int, b2: float) -> ml_collections.ConfigDict:
    """Batch 256, AdamW lr 1e-4 (wd 1e-4, eps 1e-8), warm-up then cosine to 1e-5, clip 1.0,
    EMA 0.999, with the official step's semantics (`titok_train_utils`: weight-decay split by
    name, LR schedule stepped after the update, torch clipping, EMA warm-up), bf16 compute,
    FSDP over all devices. The TiTok models rematerialise their
    blocks with the "dots" policy (matmul outputs kept, the rest recomputed): at batch 64 per
    device TiTok-L-32 stage 1 saves 18 GiB of activations for its backward pass (83 GiB with
    no remat, 4.8 GiB with "full") and needs 16% fewer FLOPs than "full" (`tok1d.cli.bench
    --compile_only`, benchmarks/RESULTS.md)."""
    config = config_lib.base_config()
    config.total_steps = total_steps
    config.batch_size = 256
    config.eval_batch_size = 256
    config.precision = "bfloat16"
    config.ema_decay = 0.999
    imagenet(config)
    titok_train_utils(config)
    o = config.optim
    o.lr, o.end_lr, o.warmup_steps, o.schedule = 1e-4, 1e-5, warmup, "cosine"
    o.b1, o.b2, o.weight_decay, o.grad_clip = 0.9, b2, 1e-4, 1.0
    pod_run(config)
    return config


def pod_run(config: ml_collections.ConfigDict) -> None:
    """FSDP over all devices, logs every 100 steps, eval every 50k, checkpoints every 5k."""
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.log_every_steps = 100
    config.eval_every_steps = 50_000
    config.checkpoint.every_steps = 5_000
    config.checkpoint.keep = 3


def two_stage_model(variant: str, stage: int) -> dict:
    """TiTok-{L-32, B-64, S-128}: 4096 x 12 l2-normalised codebook, 1024-way proxy-code head
    (stage 1); stage 2 adds the MaskGIT-VQGAN pixel decoder and freezes the encoder side."""
    if variant not in TWO_STAGE:
        raise ValueError(f"Unknown two-stage TiTok {variant!r}; choose from {sorted(TWO_STAGE)}.")
    enc, dec, tokens = TWO_STAGE[variant]
    model = dict(name="titok", patch_size=16, num_latent_tokens=tokens, encoder_size=enc,
                 decoder_size=dec, codebook_size=4096, token_dim=12, l2_norm=True,
                 decoder_head="logits", num_proxy_codes=1024, remat="dots")
    if stage == 2:
        # cnn_remat="full" rematerialises the pixel decoder's blocks, for batch 64 per 80 GB
        # device: the step's saved activations are 77 GiB at 64 without it, 32 GiB with it
        # (tok1d.cli.bench --compile_only; 39 / 17 GiB at 32) for 4% more FLOPs.
        model.update(pixel_decoder=True, finetune_decoder=True, cnn_remat="none")
    return model


def single_stage_model(variant: str) -> dict:
    if variant not in SINGLE_STAGE:
        raise ValueError(f"Unknown single-stage TiTok {variant!r}; choose from "
                         f"{sorted(SINGLE_STAGE)}.")
    enc, dec, tokens, quantizer = SINGLE_STAGE[variant]
    model = dict(name="titok", patch_size=16, num_latent_tokens=tokens, encoder_size=enc,
                 decoder_size=dec, quantizer=quantizer, decoder_head="pixels", remat="dots")
    if quantizer == "vq":
        model.update(codebook_size=8192, token_dim=64, l2_norm=False)
    else:
        model.update(token_dim=16)
    return model


def titok_stage1(variant: str) -> ml_collections.ConfigDict:
    """Stage 1: predict the frozen MaskGIT-VQGAN's codes (CE) + VQ losses; 1M steps x 256."""
    config = base(total_steps=1_000_000, warmup=10_000, b2=0.99)
    config.model = two_stage_model(variant, stage=1)
    config.teacher.name = "maskgit_vqgan"
    config.losses.update(l2=0.0, l1=0.0, quantizer=1.0, entropy=0.0, proxy_ce=1.0)
    return config


def titok_stage2(variant: str) -> ml_collections.ConfigDict:
    """Stage 2: decoder + pixel decoder fine-tuned on pixels (L2 + 0.1 ConvNeXt-S logit loss +
    0.01 hinge GAN from step 20k with LeCam 0.001); encoder, latent tokens and codebook frozen."""
    config = base(total_steps=500_000, warmup=5_000, b2=0.999)
    config.model = two_stage_model(variant, stage=2)
    config.optim.freeze = "encoder,latent_tokens,quantize"
    config.losses.update(l2=1.0, quantizer=0.0, perceptual=0.1, gan=0.01)
    config.perceptual.kind = "convnext_s"
    gan_recipe(config, start_step=20_000, num_processes=8)  # README_TiTok: 8 GPUs
    return config


def titok_single_stage(variant: str) -> ml_collections.ConfigDict:
    """L2 + perceptual (LPIPS + 0.1 ConvNeXt-S) + 0.1 hinge GAN from step 200k, VQ losses or
    KL 1e-6; 1M steps x 256 (the maintainers' ImageNet answer, issue #67)."""
    config = base(total_steps=1_000_000, warmup=10_000, b2=0.999)
    config.model = single_stage_model(variant)
    vae = config.model["quantizer"] == "vae"
    config.losses.update(l2=1.0, quantizer=0.0 if vae else 1.0, kl=1e-6 if vae else 0.0,
                         perceptual=1.1, gan=0.1)
    config.perceptual.kind = "lpips+convnext_s"
    gan_recipe(config, start_step=200_000)
    return config


def gan_recipe(config: ml_collections.ConfigDict, start_step: int,
               num_processes: int = 1) -> None:
    """TiTok's discriminator (NLayer + BlurPool), hinge loss, LeCam 0.001 (EMA decay 0.999),
    from `start_step`; its AdamW at lr 1e-4 with the generator's settings and schedule
    (`titok_disc_optim`). Call after the generator's optimizer is set."""
    d = config.discriminator
    d.name, d.start_step, d.loss, d.lecam, d.lecam_decay = "titok", start_step, "hinge", 1e-3, 0.999
    titok_disc_optim(config, 1e-4, config.optim.lr, config.optim.end_lr, num_processes)


def titok_disc_optim(config: ml_collections.ConfigDict, lr: float, base_lr: float,
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


# ---------------------------------------------------------------------------------- GigaTok

# preset -> (global batch, epochs, warm-up steps, warm-up loss end step, entropy ratio)
# Official configs/vq/VQ_*.yaml; epochs from the README recipes (the 2D models follow the 1D
# model of the same size). Steps = epochs x 5000 x 256 / batch.
GIGATOK = {
    "s_s": (128, 100, 0, 15_000, 0.0), "s_b": (128, 200, 0, 15_000, 0.0),
    "b_l": (256, 200, 0, 15_000, 0.0), "xl_xxl": (256, 300, 5_000, 0, 0.005),
    "s_s_2d": (128, 100, 0, 15_000, 0.0), "s_b_2d": (128, 200, 0, 15_000, 0.0),
    "b_l_2d": (256, 200, 0, 15_000, 0.005),
}
# README: rFID (50k ImageNet val) and gFID of GPT-B on the tokens.
GIGATOK_TARGETS = {"s_s": (1.01, 4.05), "s_b": (0.89, 3.83), "b_l": (0.81, 3.26),
                   "b_l_dino_disc": (0.51, 3.33), "xl_xxl": (0.79, 3.15)}


def gigatok(preset: str, dino_disc: bool = False,
            train_new: bool = False) -> ml_collections.ConfigDict:
    """GigaTok tokenizer (configs/vq/VQ_{preset}.yaml):

    L2 (on [-1, 1]) 1.0 + LPIPS-VGG 1.0 + VQ (codebook + 0.25 commitment) + entropy (ratio per
    preset) + 0.5 x semantic (-cos vs DINOv2-B/14 patch tokens, decoder layer 3), warm-up terms
    (feature reconstruction + shortcut L2/LPIPS) until step 15k (XL-XXL: none), PatchGAN hinge
    with weight 0.5 on G and D from step 20k, no LeCam, no adaptive weight. AdamW (0.9, 0.95),
    lr 1e-4, wd 1e-4 on every parameter, clip 10, `cosine_v2` (warm-up from lr/100, cosine to
    1e-5), the same for D. ADM random crop (shorter side 256..320) + flip. No EMA (the release
    scripts do not pass --ema; set ema_decay=0.9999 for the official option). The training
    step's semantics are vq_train.py's (`gigatok_vq_train`: LPIPS dropout, step thresholds,
    scheduler stepping, D call order and BatchNorm statistics).

    `dino_disc`: VQ_BL256_dino_disc (the DINO-v1 ViT-S/16 discriminator with DiffAugment from
    step 80k). `train_new`: VQ_BL256_train_new (no rotation trick, entropy 0.005, 5k warm-up,
    no shortcut reconstruction)."""
    if preset not in GIGATOK:
        raise ValueError(f"Unknown GigaTok preset {preset!r}; choose from {sorted(GIGATOK)}.")
    batch, epochs, warmup, aux_end, entropy = GIGATOK[preset]
    config = config_lib.base_config()
    config.total_steps = epochs * 5000 * 256 // batch
    config.batch_size = batch
    config.eval_batch_size = 256
    config.precision = "bfloat16"  # fp16 gives NaN semantic losses (GigaTok issue #6)
    config.ema_decay = 0.0
    imagenet(config)
    config.data.augment, config.data.min_scale = "adm_random_crop", 0.8
    big = preset in ("b_l", "xl_xxl", "b_l_2d")
    # B-L and larger rematerialise the transformer blocks and the CNN halves' ResnetBlocks:
    # B-L's saved activations at batch 32 are 127 GiB without cnn_remat, 39 GiB with it
    # (tok1d.cli.bench --compile_only), for 8% more FLOPs.
    config.model = dict(name="gigatok", preset=preset, remat="full" if big else "none",
                        cnn_remat="full" if big else "none")
    shortcut = 1.0
    if train_new:
        config.model["rotation_trick"] = False
        entropy, warmup, shortcut = 0.005, 5_000, 0.0
    config.losses.update(l2=1.0, quantizer=1.0, entropy=entropy, perceptual=1.0, gan=0.5,
                         semantic=0.5, fea_rec=1.0 if aux_end else 0.0,
                         shortcut=shortcut if aux_end else 0.0)
    config.aux_loss_end_step = gigatok_step(aux_end)
    config.perceptual.kind = "lpips"
    config.teacher.name = "dinov2"
    config.teacher.model = ml_collections.ConfigDict(dict(size="vitb14"))
    for o in (config.optim, config.disc_optim):
        o.lr, o.end_lr, o.warmup_steps, o.warmup_init, o.schedule = (1e-4, 1e-5, warmup, 0.01,
                                                                     "cosine")
        o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip = 0.9, 0.95, 1e-8, 1e-4, 10.0
        o.decay_mask = "no_norm" if preset == "xl_xxl" else "all"
    d = config.discriminator
    d.name, d.loss, d.lecam, d.d_weight = "patchgan", "hinge", 0.0, 0.5
    d.start_step = gigatok_step(20_000)
    if dino_disc:  # VQ_BL256_dino_disc: frozen DINO ViT-S/16 trunk, trainable heads, DiffAug
        d.name, d.diffaug_prob, d.diffaug_cutout = "dino", 1.0, 0.2
        d.start_step = gigatok_step(80_000)
        config.disc_optim.freeze = "trunk"
    gigatok_vq_train(config)
    pod_run(config)
    return config


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


# --------------------------------------------------------------------------- generators

# TiTok generators (configs/infer/TiTok/*.yaml): arch, tokens, released sampling settings, and
# the paper's gFID (ImageNet 256, 50k samples) with those settings.
MASKGIT = {
    "l32": ("vit", 32, dict(num_steps=8, guidance_scale=4.5, guidance_schedule="linear",
                            randomize_temperature=9.5, softmax_annealing=True), 2.77),
    "b64": ("vit", 64, dict(num_steps=8, guidance_scale=3.0, guidance_schedule="linear",
                            randomize_temperature=11.0, softmax_annealing=True), 2.48),
    "s128": ("uvit", 128, dict(num_steps=64, guidance_scale=6.9,
                               guidance_schedule="power-cosine", guidance_pow=3.0,
                               randomize_temperature=2.8, softmax_annealing=True), 1.97),
}


def generator_base(total_steps: int, batch: int) -> ml_collections.ConfigDict:
    """Generator trainer defaults: token dataset in `generator.tokens`, ImageNet's 1000
    classes, bf16 compute, FSDP over all devices."""
    config = config_lib.base_config()
    config.trainer = "generator"
    config.total_steps = total_steps
    config.batch_size = batch
    config.eval_batch_size = 256
    config.precision = "bfloat16"
    config.data.train_split, config.data.eval_split = "train", "validation"
    config.data.eval_examples = 10_000
    config.generator.num_sample_classes = 10
    config.num_grid_images = 80
    pod_run(config)
    config.eval_every_steps = 25_000
    return config


def maskgit_titok(variant: str) -> ml_collections.ConfigDict:
    """MaskGIT on TiTok tokens (configs/training/generator/maskgit.yaml, scripts/
    train_maskgit.py): masks drawn with the arccos schedule, CE with label smoothing 0.1 on all
    positions (masked weight 1, unmasked 0.1), class label dropout 0.1; AdamW lr 2e-4, betas
    (0.9, 0.96), wd 0.03 (official decay split), 10k warm-up from 0, cosine to 1e-5, clip 1.0,
    EMA 0.999 with EMAModel's warm-up (`titok_train_utils`); batch 2048 for 500k steps; center
    crop 256 + flip (tokenize with --flip). Sampling: the released settings of
    configs/infer/TiTok/titok_{variant}.yaml. `tok1d.official.maskgit.config_from_official`
    maps any official generator YAML the same way."""
    if variant not in MASKGIT:
        raise ValueError(f"Unknown TiTok generator {variant!r}; choose from {sorted(MASKGIT)}.")
    arch, tokens, sampling, _ = MASKGIT[variant]
    config = generator_base(500_000, 2048)
    config.ema_decay = 0.999
    # The BERT generators use dropout 0.1 (their default); UViTBert has none.
    config.model = dict(name="maskgit", arch=arch, size=variant, codebook_size=4096,
                        num_tokens=tokens, num_classes=1000)
    g = config.generator
    g.label_dropout, g.mask_schedule, g.label_smoothing, g.unmasked_weight = (
        0.1, "arccos", 0.1, 0.1)
    titok_train_utils(config)
    o = config.optim
    o.lr, o.end_lr, o.warmup_steps, o.schedule = 2e-4, 1e-5, 10_000, "cosine"
    o.b1, o.b2, o.weight_decay, o.grad_clip = 0.9, 0.96, 0.03, 1.0
    config.sampling = ml_collections.ConfigDict(sampling)
    return config


# GigaTok's AR generators (LlamaGen GPT, 1D, 256 tokens of a 16384-code tokenizer):
# size: (batch, steps, warm-up, CFG scale start of the gFID search).
GPT = {"B": (256, 1_500_000, 5_000, 2.5), "L": (256, 1_500_000, 5_000, 1.75),
       "XL": (256, 1_500_000, 5_000, 1.25), "XXL": (512, 750_000, 200, 1.25)}


def gpt_gigatok(size: str) -> ml_collections.ConfigDict:
    """LlamaGen-style GPT on GigaTok tokens (autoregressive/train/train_c2i.py as GigaTok's
    scripts/composite_cmd/train_c2i_and_eval.sh calls it): next-token CE, class dropout 0.1,
    token / residual dropout 0.1; AdamW lr 1e-4, betas (0.9, 0.95), wd 0.05 on >= 2-D params
    incl. embeddings, clip 1.0, WSD schedule (warm-up from lr/100, constant, 1 - sqrt decay over
    the last 20%) read as train_c2i does (step 1 at the base LR: `llamagen_train_c2i`); 300
    epochs; no EMA (the script does not pass --ema; ema_decay=0.9999 is the official option).
    Sampling: CFG with the `step` schedule (window_start 0.18), temperature 1, no top-k / top-p.
    `tok1d.official.gpt.config_from_official` maps any train_c2i run the same way."""
    if size not in GPT:
        raise ValueError(f"Unknown GPT size {size!r}; choose from {sorted(GPT)}.")
    batch, steps, warmup, cfg = GPT[size]
    config = generator_base(steps, batch)
    config.ema_decay = 0.0
    # Remat from tok1d.cli.bench --compile_only at batch 64 per device: GPT-B saves 14 GiB of
    # activations without remat; from L up the "dots" policy needs ~19% fewer FLOPs than "full"
    # (L: 10 vs 3 GiB saved, XXL: 30 vs 9 GiB, next to 16 GiB of unsharded state).
    config.model = dict(name="gpt", size=size, vocab_size=16384, num_tokens=256,
                        num_classes=1000, token_dropout=0.1, dropout_rate=0.1,
                        remat="none" if size == "B" else "dots")
    config.generator.label_dropout = 0.1
    llamagen_train_c2i(config)
    o = config.optim
    o.lr, o.warmup_steps, o.schedule, o.decay_fraction = 1e-4, warmup, "wsd", 0.2
    o.b1, o.b2, o.weight_decay, o.grad_clip = 0.9, 0.95, 0.05, 1.0
    config.sampling = ml_collections.ConfigDict(dict(
        cfg_scale=cfg, cfg_schedule="step", cfg_kwargs=dict(window_start=0.18),
        temperature=1.0, top_k=0, top_p=1.0))
    return config
