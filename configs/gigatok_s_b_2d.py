"""GigaTok S-B 2D on ImageNet-1k (256x256): 2D raster-grid tokenizer with ViT layers, small / base,
197.13M parameters.

    python -m tok1d.main --config=configs/gigatok_s_b_2d.py --workdir=gs://BUCKET/gigatok_s_b_2d \
        --config.data.data_dir=/path/to/tensorflow_datasets \
        --config.teacher.weights=dinov2_vitb14_pretrain.pth \
        --config.perceptual.weights=lpips_vgg/

Recipe: the official configs/vq/VQ_SB256_2d.yaml (details in `tok1d.recipes.gigatok`). L2 on
[-1, 1] + LPIPS-VGG + VQ (16384 x 8, l2-normalised, rotation trick, commitment 0.25) + 0.5 x
semantic regularisation (decoder layer 3 vs DINOv2-B/14 patch tokens at 224 px) + PatchGAN
hinge (weight 0.5, from step 20k); feature-reconstruction and shortcut warm-up losses
until step 15k.
AdamW (0.9, 0.95) lr 1e-4, wd 1e-4, clip 10, warm-up from lr/100 then cosine to 1e-5; batch
128, 200 epochs = 2.0M steps; bf16 compute, FSDP over all devices.
Training-step semantics are vq_train.py's (`tok1d.recipes.gigatok_vq_train`: LPIPS with its
dropout active, step 1 at the base LR, the D's BatchNorm statistics and call order), checked
against the official step by tests/test_train_parity_gigatok.py.
Weights to supply: DINOv2 ViT-B/14 (`dinov2_vitb14_pretrain.pth`, or a directory from
`python -m tok1d.cli.convert dinov2 ... --pos_grid 16`) and LPIPS-VGG (`python -m
tok1d.weights.convert.perceptual`).

Compute: the tokenizer's forward + backward is 1.32 TFLOP per image (XLA cost
analysis), 3.4e+20 FLOP for the run before LPIPS, DINOv2 and the discriminator: about
237 H100-hours at 40% of the bf16 peak.
Targets (paper / README, 50k ImageNet val): the README gives none for the 2D models (the paper
compares 2D and 1D scaling curves).

Evaluate (rFID, IS, precision-recall, PSNR, SSIM, LPIPS, codebook usage; 50k val images):

    python -m tok1d.cli.evaluate --config=configs/gigatok_s_b_2d.py --checkpoint=DIR --out=eval/ \
        --inception=inception_fid/ --config.data.eval_examples=50000
"""

from tok1d import recipes


def get_config():
    return recipes.gigatok("s_b_2d")
