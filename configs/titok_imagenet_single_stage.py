"""TiTok trained single-stage on ImageNet-1k (256x256): the VQ-8k and VAE variants.

    python -m tok1d.main --config=configs/titok_imagenet_single_stage.py:bl64 \
        --workdir=gs://BUCKET/titok_bl64 --config.data.data_dir=/path/to/tensorflow_datasets \
        --config.perceptual.weights=lpips_convnext_converted/

Variants (`:NAME` after the file): bl64, bl128, sl256 (8192 x 64 codebook without l2; small or
base encoder, large decoder) and ll32_vae, bl64_vae, bl128_vae (16-channel KL bottleneck), as
in the official releases. Data: TFDS `imagenet2012` in array_record format (TiTok's
augmentation: resize the shorter side to 256 + random crop + flip).

Recipe (maintainers, issues #67 / #82; loss settings of the TA-TiTok configs): L2 1.0 +
perceptual 1.1 x (LPIPS + 0.1 ConvNeXt-S logits) / 1.1 + 0.1 hinge GAN from step 200k with
LeCam 0.001; VQ losses (commitment 0.25) or KL 1e-6. AdamW lr 1e-4, betas (0.9, 0.999),
wd 1e-4, 10k warm-up, cosine to 1e-5, clip 1.0, EMA 0.999, batch 256, 1M steps (200 epochs),
bf16 compute. Perceptual weights: python -m tok1d.cli.convert.perceptual (LPIPS-VGG + ConvNeXt-S).
(The official VQ-8k runs also re-anchored rarely used codes (clustering_vq); not included.)

Targets (README rFID, 50k val): BL-64 2.06, BL-128 1.49, SL-256 1.03, LL-32 VAE 1.61,
BL-64 VAE 1.25, BL-128 VAE 0.84. Compute: TiTok-BL-64 at batch 256 is ~0.3 PFLOP per step
(6 x 390M params x ~320 tokens x 256 images); 1M steps is of the order of a v4-64 week.

Evaluate (rFID, IS, precision-recall, PSNR, SSIM, LPIPS, codebook usage; 50k val images):

    python -m tok1d.cli.evaluate --config=configs/titok_imagenet_single_stage.py --checkpoint=DIR --out=eval/ \
        --inception=inception_fid/ --config.data.eval_examples=50000
"""

from tok1d import recipes


def get_config(arg: str = "bl64"):
    return recipes.titok_single_stage(arg)
