"""TiTok-S-128 stage 1: learn 128 tokens by predicting the frozen MaskGIT-VQGAN's proxy codes.

    python -m tok1d.main --config=configs/titok_s128_stage1.py --workdir=gs://BUCKET/titok_s128_s1 \
        --config.teacher.weights=maskgit-vqgan-imagenet-f16-256.bin \
        --config.data.data_dir=/path/to/tensorflow_datasets

Official recipe (configs/training/TiTok/stage1/titok_s128.yaml): small ViT encoder and decoder,
128 latent tokens, 4096 x 12 l2-normalised codebook; the decoder's 1024-way head predicts the
teacher's 16 x 16 codes (cross-entropy) + VQ codebook/commitment (0.25) losses. AdamW lr 1e-4,
betas (0.9, 0.99), wd 1e-4, 10k warm-up, cosine to 1e-5, clip 1.0, EMA 0.999, batch 256,
1M steps (200 epochs), bf16 compute (the teacher and the quantizer run in float32).
The teacher file (HF fun-research/TiTok) is read directly or after
`python -m tok1d.cli.convert maskgit_vqgan FILE DIR`. New models use the clean per-token
projection (legacy_reshape=False); the released weights need legacy_reshape=True.

Expected: CE starts at ln 1024 = 6.9 and ends near 3.0 (maintainers, S-128); the eval reports
proxy-code accuracy and PSNR of teacher.decode(argmax). Stage 1 alone reaches rFID ~5.5 for
L-32 (paper ablation); stage 2 (titok_s128_stage2.py) brings it to 1.71.
Compute: the official run is 8 x A100 for several days; on TPU use a v4-64 or larger slice.

Evaluate (rFID, IS, precision-recall, PSNR, SSIM, LPIPS, codebook usage; 50k val images):

    python -m tok1d.cli.evaluate --config=configs/titok_s128_stage1.py --checkpoint=DIR --out=eval/ \
        --inception=inception_fid/ --config.data.eval_examples=50000
"""

from tok1d import recipes


def get_config():
    return recipes.titok_stage1("s128")
