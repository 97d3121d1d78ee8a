"""GigaTok B-L with the DINO discriminator (official configs/vq/VQ_BL256_dino_disc.yaml): the B-L
recipe (`configs/gigatok_b_l.py`) with PatchGAN replaced by a frozen DINO (v1) ViT-S/16 trunk
whose tokens (embedding + blocks 3, 6, 9, 12) feed five trainable spectral-norm heads, DiffAugment
(translation, colour, cutout 0.2, probability 1) on real and fake inputs, hinge losses with
weight 0.5, from step 80k.

    python -m tok1d.main --config=configs/gigatok_b_l_dino_disc.py --workdir=gs://BUCKET/bl_dd \
        --config.data.data_dir=/path/to/tensorflow_datasets \
        --config.teacher.weights=dinov2_vitb14_pretrain.pth \
        --config.perceptual.weights=lpips_vgg/ \
        --config.discriminator.weights=dino_deitsmall16_pretrain.pth

The trunk (21.7M parameters) lives in the discriminator params under "trunk", frozen by
`disc_optim.freeze="trunk"` (no update, no weight decay, no Adam state); the heads have
7.39M parameters, the spectral-norm vectors are the `disc_state` of the train state.
Training-step semantics are vq_train.py's (`tok1d.recipes.gigatok_vq_train`): D called on the
fake batch first, every D call (the generator's too) with fresh DiffAugment draws and a power
iteration, D's first step at the construction LR, and in a warm-up + GAN overlap step the
"direct" GAN terms on the reconstruction x_hat (`discriminator.direct_fake="reconstruction"`,
the official dinodisc branch); checked against the official step by
tests/test_train_parity_gigatok_dino.py.

Compute: as B-L (2.00 TFLOP per image for the tokenizer's forward + backward, 5.1e+20 FLOP for
the run, about 360 H100-hours at 40% of the bf16 peak) plus the ViT-S/16 discriminator from
step 80k (about 3 x 4.6 GFLOP per image and call).
Targets (README, 50k ImageNet val): rFID 0.51, LPIPS 0.2056; GPT-B gFID 3.33, linear probe 67.7%.

Evaluate (rFID, IS, precision-recall, PSNR, SSIM, LPIPS, codebook usage; 50k val images):

    python -m tok1d.cli.evaluate --config=configs/gigatok_b_l_dino_disc.py --checkpoint=DIR --out=eval/ \
        --inception=inception_fid/ --config.data.eval_examples=50000
"""

from tok1d import recipes


def get_config():
    return recipes.gigatok("b_l", dino_disc=True)
