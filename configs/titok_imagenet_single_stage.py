"""TiTok tokenizer trained single-stage on ImageNet-1k (256x256) with L2 + VQ losses.

    python -m tok1d.main --config=configs/titok_imagenet_single_stage.py:bl64 \
        --workdir=gs://BUCKET/titok_bl64 --config.data.data_dir=/path/to/tensorflow_datasets

Variants (`:NAME` after the file): s128, b64, l32 (4096 x 12 l2-normalised codebook, encoder =
decoder size) and bl64, bl128, sl256 (8192 x 64 codebook without l2, small/base encoder with a
large decoder), as in the official releases. Data: TFDS `imagenet2012` prepared in array_record
format (TiTok's augmentation: resize the shorter side to 256 + random crop + flip).

Recipe: batch 256, AdamW (0.9, 0.999), lr 1e-4, wd 1e-4, 10k warm-up, cosine to 1e-5, EMA,
grad clip 1.0, bf16 compute; 1M steps (200 epochs; the official single-stage schedule).
This config has the pixel losses available today (L2 + quantizer); the official single-stage
weights also use perceptual (LPIPS + ConvNeXt) and GAN terms (rFID: BL-64 2.06, BL-128 1.49,
SL-256 1.03), which come with the perceptual/GAN losses. Expect blurrier reconstructions
(better PSNR, worse rFID) from L2 alone. Compute: TiTok-BL-64 at batch 256 is ~0.3 PFLOP per
step (6 x 390M params x ~320 tokens x 256 images); 1M steps is of the order of a v4-64 week.
"""

from tok1d import config_lib

VARIANTS = {
    # name: encoder, decoder, tokens, codebook, code dim, l2-normalised codes
    "s128": ("small", "small", 128, 4096, 12, True),
    "b64": ("base", "base", 64, 4096, 12, True),
    "l32": ("large", "large", 32, 4096, 12, True),
    "bl64": ("base", "large", 64, 8192, 64, False),
    "bl128": ("base", "large", 128, 8192, 64, False),
    "sl256": ("small", "large", 256, 8192, 64, False),
}


def get_config(arg: str = "bl64"):
    if arg not in VARIANTS:
        raise ValueError(f"Unknown TiTok variant {arg!r}; choose from {sorted(VARIANTS)}.")
    enc, dec, tokens, codes, dim, l2 = VARIANTS[arg]
    config = config_lib.base_config()
    config.total_steps = 1_000_000
    config.batch_size = 256
    config.eval_batch_size = 256
    config.precision = "bfloat16"
    config.ema_decay = 0.999
    config.model = dict(name="titok", patch_size=16, num_latent_tokens=tokens,
                        encoder_size=enc, decoder_size=dec, codebook_size=codes,
                        token_dim=dim, l2_norm=l2, remat="full")
    config.data.name = "tfds:imagenet2012"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 256
    config.data.augment = "random_crop"
    config.data.num_workers = 16
    config.data.eval_examples = 10_000
    config.optim.lr = 1e-4
    config.optim.end_lr = 1e-5
    config.optim.warmup_steps = 10_000
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 1e-4
    config.optim.grad_clip = 1.0
    config.mesh.data, config.mesh.fsdp = 1, -1   # FSDP over all devices by default
    config.log_every_steps = 100
    config.eval_every_steps = 10_000
    config.checkpoint.every_steps = 5_000
    config.checkpoint.keep = 3
    return config
