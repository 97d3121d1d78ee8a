"""TiTok-B-64 stage 2: fine-tune the decoder (+ MaskGIT-VQGAN pixel decoder) on pixels.

    python -m tok1d.main --config=configs/titok_b64_stage2.py --workdir=gs://BUCKET/titok_b64_s2 \
        --config.init.checkpoint=gs://BUCKET/titok_b64_s1 \
        --config.init.pixel_decoder=maskgit_vqgan_converted/ \
        --config.perceptual.weights=convnext_s_converted/ \
        --config.data.data_dir=/path/to/tensorflow_datasets

Official recipe (configs/training/TiTok/stage2/titok_b64.yaml): starts from the stage-1 weights
(EMA) and the MaskGIT-VQGAN decoder + codebook (python -m tok1d.cli.convert maskgit_vqgan ...);
encoder, latent tokens and codebook frozen; loss = L2 + 0.1 x ConvNeXt-S logit MSE
(python -m tok1d.cli.convert.perceptual --kind convnext_s ...) + 0.01 x hinge GAN from step 20k
(TiTok NLayer discriminator with BlurPool, LeCam 0.001, its own AdamW 1e-4). AdamW lr 1e-4,
betas (0.9, 0.999), wd 1e-4, 5k warm-up, cosine to 1e-5, clip 1.0, EMA 0.999, batch 256,
500k steps (100 epochs).

Target (paper / README): rFID 1.70 on ImageNet 256 val.

Evaluate (rFID, IS, precision-recall, PSNR, SSIM, LPIPS, codebook usage; 50k val images):

    python -m tok1d.cli.evaluate --config=configs/titok_b64_stage2.py --checkpoint=DIR --out=eval/ \
        --inception=inception_fid/ --config.data.eval_examples=50000
"""

from tok1d import recipes


def get_config():
    return recipes.titok_stage2("b64")
