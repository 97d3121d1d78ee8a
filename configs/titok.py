"""TiTok tokenizers on ImageNet-1k (256x256): the official two-stage recipe and the
single-stage VQ-8k / VAE recipe. `--config=configs/titok.py:ARG`:

| arg         | what it is                                            | paper target (50k val) |
|-------------|-------------------------------------------------------|------------------------|
| l32_stage1  | TiTok-L-32 stage 1: large/large ViT, 32 tokens        | rFID ~5.5 (stage 1 alone) |
| b64_stage1  | TiTok-B-64 stage 1: base/base ViT, 64 tokens          | see stage 2            |
| s128_stage1 | TiTok-S-128 stage 1: small/small ViT, 128 tokens      | see stage 2            |
| l32_stage2  | TiTok-L-32 stage 2: decoder + pixel decoder on pixels | rFID 2.21              |
| b64_stage2  | TiTok-B-64 stage 2                                    | rFID 1.70              |
| s128_stage2 | TiTok-S-128 stage 2                                   | rFID 1.71              |
| bl64        | single stage, VQ-8k, base/large ViT, 64 tokens        | rFID 2.06              |
| bl128       | single stage, VQ-8k, base/large ViT, 128 tokens       | rFID 1.49              |
| sl256       | single stage, VQ-8k, small/large ViT, 256 tokens      | rFID 1.03              |
| ll32_vae    | single stage, VAE (16 ch), large/large ViT, 32 tokens | rFID 1.61              |
| bl64_vae    | single stage, VAE (16 ch), base/large ViT, 64 tokens  | rFID 1.25              |
| bl128_vae   | single stage, VAE (16 ch), base/large ViT, 128 tokens | rFID 0.84              |

Commands (`--config.data.data_dir=/path/to/tensorflow_datasets` on every run):

    # stage 1 (l32 / b64 / s128): the frozen MaskGIT-VQGAN teacher's file (HF fun-research/TiTok)
    python -m tok1d.main --config=configs/titok.py:l32_stage1 --workdir=/gcs/BUCKET/titok_l32_s1 \\
        --config.teacher.weights=maskgit-vqgan-imagenet-f16-256.bin
    # stage 2: from the stage-1 run, the converted MaskGIT-VQGAN and ConvNeXt-S
    python -m tok1d.main --config=configs/titok.py:l32_stage2 --workdir=/gcs/BUCKET/titok_l32_s2 \\
        --config.init.checkpoint=/gcs/BUCKET/titok_l32_s1 \\
        --config.init.pixel_decoder=maskgit_vqgan_converted/ \\
        --config.perceptual.weights=convnext_s_converted/
    # single stage (bl64 ... bl128_vae): LPIPS-VGG + ConvNeXt-S weights
    python -m tok1d.main --config=configs/titok.py:bl64 --workdir=/gcs/BUCKET/titok_bl64 \\
        --config.perceptual.weights=lpips_convnext_converted/
    # evaluate any of them (rFID, IS, precision-recall, PSNR, SSIM, LPIPS, codebook usage)
    python -m tok1d.cli.evaluate --config=configs/titok.py:l32_stage2 --checkpoint=DIR \\
        --out=eval/ --inception=inception_fid/ --config.data.eval_examples=50000

Stage 1 (configs/training/TiTok/stage1/titok_*.yaml): 4096 x 12 l2-normalised codebook; the
decoder's 1024-way head predicts the frozen MaskGIT-VQGAN's 16 x 16 codes (cross-entropy) +
VQ codebook / commitment (0.25) losses; AdamW betas (0.9, 0.99), 10k warm-up, 1M steps. CE
starts at ln 1024 = 6.9 and ends near 3.0 (maintainers, S-128). The teacher file is read
directly or after `tok1d convert maskgit_vqgan --checkpoint=FILE --out=DIR`. The official
stage-1 / stage-2 YAMLs leave `is_legacy` at its default True, so the encoder's projection to
the token dim reads the raw reshape of the latents (tokens mixed; research/titok.md 1.3), as the
released weights do: legacy_reshape=True here (`--config.model.legacy_reshape=False`: the
per-token projection of the single-stage models).

Stage 2 (configs/training/TiTok/stage2/titok_*.yaml): starts from the stage-1 weights (EMA)
and the MaskGIT-VQGAN decoder + codebook; encoder, latent tokens and codebook frozen; L2 +
0.1 x ConvNeXt-S logit MSE (`--config.perceptual.weights=convnext_s`) + 0.01 x
hinge GAN from step 20k (NLayer + BlurPool discriminator, LeCam 0.001, its own AdamW 1e-4 with
the official scheduler's quirks for 8 GPUs); betas (0.9, 0.999), 5k warm-up, 500k steps.

Single stage (maintainers, issues #67 / #82; loss settings of the TA-TiTok configs): L2 1.0 +
perceptual 1.1 x (LPIPS + 0.1 ConvNeXt-S logits) / 1.1 + 0.1 hinge GAN from step 200k with
LeCam 0.001; VQ losses (8192 x 64 codebook, no l2, commitment 0.25, rarely used codes
re-anchored on the batch's features: TA-TiTok's `clustering_vq: True`) or KL 1e-6 (VAE);
betas (0.9, 0.999), 10k warm-up, 1M steps.

All: AdamW lr 1e-4, wd 1e-4, cosine to 1e-5, clip 1.0, EMA 0.999, batch 256, bf16 compute,
FSDP over all devices, with the official step's semantics (`tok1d.recipes.titok_train_utils`,
checked by tests/test_train_parity_titok*.py). Compute: the official two-stage runs are
8 x A100 for several days (on TPU a v4-64 or larger slice); single-stage BL-64 is ~0.3 PFLOP
per step (6 x 390M params x ~320 tokens x 256 images), 1M steps of the order of a v4-64 week.
"""

from tok1d import recipes
from tok1d.train import config_lib

# Two-stage TiTok: ViT sizes and latent tokens of the released tokenizers.
TWO_STAGE = {
    "l32": dict(encoder_size="large", decoder_size="large", num_latent_tokens=32),
    "b64": dict(encoder_size="base", decoder_size="base", num_latent_tokens=64),
    "s128": dict(encoder_size="small", decoder_size="small", num_latent_tokens=128),
}
# Single-stage TiTok: sizes, tokens and bottleneck ("vq": VQ-8k, "vae": 16-channel KL).
SINGLE_STAGE = {
    "bl64": dict(encoder_size="base", decoder_size="large", num_latent_tokens=64,
                 quantizer="vq"),
    "bl128": dict(encoder_size="base", decoder_size="large", num_latent_tokens=128,
                  quantizer="vq"),
    "sl256": dict(encoder_size="small", decoder_size="large", num_latent_tokens=256,
                  quantizer="vq"),
    "ll32_vae": dict(encoder_size="large", decoder_size="large", num_latent_tokens=32,
                     quantizer="vae"),
    "bl64_vae": dict(encoder_size="base", decoder_size="large", num_latent_tokens=64,
                     quantizer="vae"),
    "bl128_vae": dict(encoder_size="base", decoder_size="large", num_latent_tokens=128,
                      quantizer="vae"),
}
VARIANTS = tuple(f"{name}_stage{stage}" for stage in (1, 2) for name in TWO_STAGE) + tuple(
    SINGLE_STAGE)


def get_config(arg: str = ""):
    if arg in SINGLE_STAGE:
        return single_stage(SINGLE_STAGE[arg])
    name, _, stage = arg.rpartition("_stage")
    if name in TWO_STAGE and stage == "1":
        return stage1(TWO_STAGE[name])
    if name in TWO_STAGE and stage == "2":
        return stage2(TWO_STAGE[name])
    raise recipes.unknown_variant("titok.py", arg, VARIANTS)


def common(*, total_steps: int, warmup_steps: int, b2: float):
    """Every TiTok recipe: batch 256, AdamW lr 1e-4 (wd 1e-4), warm-up then cosine to 1e-5,
    clip 1.0, EMA 0.999, bf16 compute, with the official step's semantics. The models
    rematerialise their blocks with the "dots" policy (matmul outputs kept): at batch 64 per
    device TiTok-L-32 stage 1 saves 18 GiB of activations for its backward pass (83 GiB with
    no remat, 4.8 GiB with "full") for 16% fewer FLOPs than "full" (benchmarks/RESULTS.md)."""
    config = config_lib.base_config("tokenizer")
    config.total_steps = total_steps
    config.batch_size = 256
    config.eval_batch_size = 256
    config.precision = "bfloat16"
    # The official loss module (perceptual nets, discriminator) runs in float32 with autocast
    # disabled; "bfloat16" is faster and not the official step.
    config.loss_precision = "float32"
    config.ema_decay = 0.999
    recipes.imagenet(config)
    recipes.titok_train_utils(config)
    recipes.adm_evaluation(config)  # IS over 5,000-image parts
    o = config.optim
    o.lr = 1e-4
    o.end_lr = 1e-5
    o.warmup_steps = warmup_steps
    o.schedule = "cosine"
    o.b1 = 0.9
    o.b2 = b2
    o.weight_decay = 1e-4
    o.grad_clip = 1.0
    recipes.pod_run(config)
    return config


# Ordered variable-length tokens (not in the official recipes): "uniform" or "pow2" trains with
# nested tail dropout (tok1d.models.tokenizers.nested), e.g. --config.model.nested_dropout=pow2.
NESTED_DROPOUT = "none"


# Attention kernel: "xla" (XLA's own: materialises the 289 x 289 scores) or "cudnn" (cuDNN's
# fused attention, NVIDIA GPUs; sequences padded to a multiple of 64, see
# tok1d.layers.transformer.attend), e.g. --config.model.attention_impl=cudnn.
ATTENTION = "xla"

# The bottleneck (tok1d.models.quantizers, README "Quantizers"): any quantizer by name with its
# own fields, e.g. --config.model.quantizer=fsq --config.model.token_dim=6
# --config.model.quantizer_options='{"levels": [8, 8, 8, 5, 5, 5]}'.
QUANTIZER_OPTIONS = {}


def two_stage_model(sizes: dict) -> dict:
    """4096 x 12 l2-normalised codebook and the 1024-way proxy-code head; the official
    `is_legacy` default (True: the raw-reshape token projection)."""
    return dict(name="titok", patch_size=16, codebook_size=4096, token_dim=12, l2_norm=True,
                decoder_head="logits", num_proxy_codes=1024, legacy_reshape=True, remat="dots",
                nested_dropout=NESTED_DROPOUT, attention_impl=ATTENTION, quantizer="vq",
                quantizer_options=dict(QUANTIZER_OPTIONS), **sizes)


def stage1(sizes: dict):
    """Proxy codes of the frozen MaskGIT-VQGAN (CE) + VQ losses; 1M steps."""
    config = common(total_steps=1_000_000, warmup_steps=10_000, b2=0.99)
    config.model = two_stage_model(sizes)
    config.teacher.name = "maskgit_vqgan"
    config.losses.l2 = 0.0
    config.losses.l1 = 0.0
    config.losses.quantizer = 1.0
    config.losses.entropy = 0.0
    config.losses.proxy_ce = 1.0
    return config


def stage2(sizes: dict):
    """Decoder + pixel decoder fine-tuned on pixels; encoder, latent tokens, codebook frozen."""
    config = common(total_steps=500_000, warmup_steps=5_000, b2=0.999)
    # cnn_remat="full" rematerialises the pixel decoder's blocks, for batch 64 per 80 GB
    # device: the step's saved activations are 77 GiB at 64 without it, 32 GiB with it
    # (tok1d.cli.bench --compile_only; 39 / 17 GiB at 32) for 4% more FLOPs.
    config.model = dict(two_stage_model(sizes), pixel_decoder=True, finetune_decoder=True,
                        cnn_remat="none")
    config.optim.freeze = "encoder,latent_tokens,quantize"
    config.losses.l2 = 1.0
    config.losses.quantizer = 0.0
    config.losses.perceptual = 0.1
    config.losses.gan = 0.01
    config.perceptual.kind = "convnext_s"
    gan(config, start_step=20_000, num_processes=8)  # README_TiTok: 8 GPUs
    return config


def single_stage(sizes: dict):
    """L2 + LPIPS + 0.1 ConvNeXt-S + GAN from step 200k, VQ losses or KL; 1M steps."""
    config = common(total_steps=1_000_000, warmup_steps=10_000, b2=0.999)
    config.model = dict(name="titok", patch_size=16, decoder_head="pixels", remat="dots",
                        nested_dropout=NESTED_DROPOUT, attention_impl=ATTENTION,
                        quantizer_options=dict(QUANTIZER_OPTIONS), **sizes)
    vae = sizes["quantizer"] == "vae"
    if vae:
        config.model["token_dim"] = 16
    else:
        config.model.update(quantizer="clustering_vq", codebook_size=8192, token_dim=64,
                            l2_norm=False)
    config.losses.l2 = 1.0
    config.losses.quantizer = 0.0 if vae else 1.0
    config.losses.kl = 1e-6 if vae else 0.0
    config.losses.perceptual = 1.1
    config.losses.gan = 0.1
    config.perceptual.kind = "lpips+convnext_s"
    gan(config, start_step=200_000, num_processes=1)
    return config


def gan(config, *, start_step: int, num_processes: int) -> None:
    """TiTok's discriminator (NLayer + BlurPool), hinge loss, LeCam 0.001 (EMA decay 0.999)
    from `start_step`; its AdamW at lr 1e-4 with the generator's settings and schedule
    (`recipes.titok_disc_optim`; set after the generator's optimizer)."""
    d = config.discriminator
    d.name = "titok"
    d.start_step = start_step
    d.loss = "hinge"
    d.lecam = 1e-3
    d.lecam_decay = 0.999
    recipes.titok_disc_optim(config, lr=1e-4, base_lr=config.optim.lr,
                             end_lr=config.optim.end_lr, num_processes=num_processes)
