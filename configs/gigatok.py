"""GigaTok tokenizers on ImageNet-1k (256x256). `--config=configs/gigatok.py:ARG`:

| arg           | what it is (official configs/vq/*.yaml)     | params  | paper target (50k val) |
|---------------|---------------------------------------------|---------|------------------------|
| s_s           | 1D Q-Former, S (512x6) / S (VQ_SS256)       | 136.07M | rFID 1.01, gFID 4.05   |
| s_b           | 1D, S / B (768x12) (VQ_SB256)               | 232.40M | rFID 0.89, gFID 3.83   |
| b_l           | 1D, B / L (1024x24) (VQ_BL256)              | 621.64M | rFID 0.81, gFID 3.26   |
| b_l_train_new | b_l's easier start (VQ_BL256_train_new)     | 621.64M | -                      |
| b_l_dino_disc | b_l + DINO discriminator (VQ_BL256_dino_disc) | 621.64M | rFID 0.51, gFID 3.33 |
| xl_xxl        | 1D, XL (1280x36) / XXL (1536x48)            | 2.89B   | rFID 0.79, gFID 3.15   |
| s_s_2d        | 2D grid, DETR-style layers, S / S           | 135.55M | - (2D: scaling curves) |
| s_b_2d        | 2D grid, ViT layers, S / B                  | 197.13M | -                      |
| b_l_2d        | 2D grid, ViT layers, B / L, entropy 0.005   | 491.41M | -                      |

gFID: GPT-B trained on the variant's tokens (README). Encoder / decoder widths x depths.
Run (any arg; the teacher and LPIPS weights are needed):

    python -m tok1d.main --config=configs/gigatok.py:b_l --workdir=/gcs/BUCKET/gigatok_b_l \\
        --config.data.data_dir=/path/to/tensorflow_datasets \\
        --config.teacher.weights=dinov2_vitb14_pretrain.pth \\
        --config.perceptual.weights=lpips_vgg/
    # b_l_dino_disc also: --config.discriminator.weights=dino_deitsmall16_pretrain.pth
    # evaluate (rFID, IS, precision-recall, PSNR, SSIM, LPIPS, codebook usage; 50k val images)
    python -m tok1d.cli.evaluate --config=configs/gigatok.py:b_l --checkpoint=DIR --out=eval/ \\
        --inception=inception_fid/ --config.data.eval_examples=50000

(`configs/gigatok_b_l.py`, the design card's command, is `configs/gigatok.py:b_l`.)
Weights: DINOv2 ViT-B/14 (`dinov2_vitb14_pretrain.pth`, or a directory from `tok1d convert
dinov2 --checkpoint=dinov2_vitb14_pretrain.pth --out=DIR --pos_grid=16`), LPIPS-VGG (the
released name `lpips_vgg`, or `tok1d convert lpips --vgg=vgg16-397923af.pth --checkpoint=vgg.pth
--out=DIR`), for b_l_dino_disc the DINO (v1) ViT-S/16 trunk.

Recipe: L2 on [-1, 1] 1.0 + LPIPS-VGG 1.0 + VQ (16384 x 8, l2-normalised, rotation trick,
codebook + 0.25 commitment) + entropy (per variant) + 0.5 x semantic regularisation (-cos of
decoder layer 3 vs DINOv2-B/14 patch tokens at 224 px); feature-reconstruction and shortcut
(L2 + LPIPS) warm-up losses until step 15k (XL-XXL: none); PatchGAN hinge with weight 0.5 on
G and D from step 20k, no LeCam, no adaptive weight. AdamW (0.9, 0.95), lr 1e-4, wd 1e-4 on
every parameter (XL-XXL: not on norms, the official FSDP trainer), clip 10, warm-up from
lr/100 then cosine to 1e-5, the same for D. ADM random crop (shorter side 256..320) + flip.
No EMA (the release scripts do not pass --ema; ema_decay=0.9999 is the official option).
Steps = epochs x 5000 x 256 / batch; bf16 compute (fp16 gives NaN semantic losses, GigaTok
issue #6), FSDP over all devices. The step's semantics are vq_train.py's
(`tok1d.recipes.gigatok_vq_train`: LPIPS dropout, step thresholds, scheduler stepping, D call
order and BatchNorm statistics), checked by tests/test_train_parity_gigatok*.py.

b_l_train_new: no rotation trick, entropy 0.005, 5k LR warm-up, no shortcut reconstruction.
b_l_dino_disc: PatchGAN replaced by a frozen DINO (v1) ViT-S/16 trunk (21.7M, under "trunk",
frozen by `disc_optim.freeze="trunk"`) whose tokens (embedding + blocks 3, 6, 9, 12) feed five
trainable spectral-norm heads (7.39M), DiffAugment (translation, colour, cutout 0.2,
probability 1) on real and fake inputs, from step 80k; D called on the fake batch first, and
in a warm-up + GAN overlap step the "direct" GAN terms on the reconstruction x_hat.

Compute (the tokenizer's forward + backward per image from XLA's cost analysis; the run before
LPIPS, DINOv2 and the discriminator; H100-hours at 40% of the bf16 peak):
s_s 1.24 TFLOP, 1.6e20 FLOP, ~111 h; s_b 1.38 TFLOP, 3.5e20, ~249 h; b_l 2.00 TFLOP, 5.1e20,
~360 h (b_l_dino_disc adds ~3 x 4.6 GFLOP per image and D call from step 80k); xl_xxl 5.60
TFLOP, 2.2e21, ~1,510 h; s_s_2d 1.24 TFLOP, ~111 h; s_b_2d 1.32 TFLOP, ~237 h; b_l_2d 1.78
TFLOP, 4.5e20, ~319 h. Other README targets: LPIPS s_s 0.2226, s_b 0.2121, b_l 0.2059,
b_l_dino_disc 0.2056, xl_xxl 0.1947; linear probe 62.6 / 62.9 / 67.6 / 67.7 / 72.0%; gFID
of larger GPTs on b_l tokens: XL 2.13, XXL 2.03 (XXL on xl_xxl tokens: 1.98).
"""

from tok1d import recipes
from tok1d.train import config_lib

# Per preset (official configs/vq/VQ_*.yaml; epochs from the README recipes, the 2D models
# following the 1D model of the same size). remat: B-L and larger rematerialise the
# transformer blocks and the CNN halves' ResnetBlocks (B-L's saved activations at batch 32:
# 127 GiB without cnn_remat, 39 GiB with it, tok1d.cli.bench --compile_only; 8% more FLOPs).
PRESETS = {
    "s_s": dict(batch_size=128, epochs=100, warmup_steps=0, aux_loss_end=15_000,
                entropy=0.0, remat="none", decay_mask="all"),
    "s_b": dict(batch_size=128, epochs=200, warmup_steps=0, aux_loss_end=15_000,
                entropy=0.0, remat="none", decay_mask="all"),
    "b_l": dict(batch_size=256, epochs=200, warmup_steps=0, aux_loss_end=15_000,
                entropy=0.0, remat="full", decay_mask="all"),
    "xl_xxl": dict(batch_size=256, epochs=300, warmup_steps=5_000, aux_loss_end=0,
                   entropy=0.005, remat="full", decay_mask="no_norm"),
    "s_s_2d": dict(batch_size=128, epochs=100, warmup_steps=0, aux_loss_end=15_000,
                   entropy=0.0, remat="none", decay_mask="all"),
    "s_b_2d": dict(batch_size=128, epochs=200, warmup_steps=0, aux_loss_end=15_000,
                   entropy=0.0, remat="none", decay_mask="all"),
    "b_l_2d": dict(batch_size=256, epochs=200, warmup_steps=0, aux_loss_end=15_000,
                   entropy=0.005, remat="full", decay_mask="all"),
}
# ImageNet-1k epochs are counted as 5000 steps of 256 images (vq_train's --epochs).
STEPS_PER_EPOCH_AT_256 = 5000
# Attention kernel of the tokenizer's transformers: "xla" (XLA's own) or "cudnn" (cuDNN's fused
# attention, NVIDIA GPUs; see tok1d.layers.transformer.attend), e.g.
# --config.model.attention_impl=cudnn.
ATTENTION = "xla"

VARIANTS = ("s_s", "s_b", "b_l", "b_l_train_new", "b_l_dino_disc", "xl_xxl", "s_s_2d",
            "s_b_2d", "b_l_2d")


# The bottleneck (tok1d.models.quantizers, README "Quantizers"): any quantizer by name with its
# own fields, e.g. --config.model.quantizer=fsq --config.model.token_dim=6
# --config.model.quantizer_options='{"levels": [8, 8, 8, 5, 5, 5]}'.
QUANTIZER_OPTIONS = {}


def get_config(arg: str = ""):
    if arg in PRESETS:
        return tokenizer(arg)
    if arg == "b_l_train_new":
        return tokenizer("b_l", train_new=True)
    if arg == "b_l_dino_disc":
        return tokenizer("b_l", dino_disc=True)
    raise recipes.unknown_variant("gigatok.py", arg, VARIANTS)


def tokenizer(preset: str, *, train_new: bool = False, dino_disc: bool = False):
    """`train_new`: VQ_BL256_train_new (no rotation trick, entropy 0.005, 5k LR warm-up, no
    shortcut reconstruction). `dino_disc`: VQ_BL256_dino_disc (frozen DINO ViT-S/16 trunk,
    trainable heads, DiffAugment, from step 80k)."""
    p = dict(PRESETS[preset])
    shortcut = 1.0
    if train_new:
        p.update(entropy=0.005, warmup_steps=5_000)
        shortcut = 0.0
    config = config_lib.base_config("tokenizer")
    config.total_steps = p["epochs"] * STEPS_PER_EPOCH_AT_256 * 256 // p["batch_size"]
    config.batch_size = p["batch_size"]
    config.eval_batch_size = 256
    config.precision = "bfloat16"
    # The official step computes its loss (LPIPS, the discriminator) inside the model's bf16
    # autocast, so the loss networks run in bf16 too (float32: slower, not the official step).
    config.loss_precision = "bfloat16"
    config.ema_decay = 0.0
    recipes.imagenet_adm(config)  # random_crop_arr + flip, center_crop_arr
    # PSNR / SSIM as reconstruction_ddp.py computes them (8-bit reconstructions, scikit-image's
    # default SSIM at data_range 2): comparable with GigaTok's tables; "standard" is the
    # Gaussian SSIM of the other recipes.
    config.evaluation.pixel_metrics = "gigatok"
    config.evaluation.tokenizer_precision = "float32"  # its reconstruction eval: no autocast
    # nested_dropout: ordered variable-length tokens (1D presets; not in the official recipes):
    # "uniform" / "pow2" (tok1d.models.tokenizers.nested), e.g. --config.model.nested_dropout=pow2
    # scan: each transformer half compiles one layer (XL-XXL: 36 + 48 layers unrolled otherwise).
    config.model = dict(name="gigatok", preset=preset, scan=True, remat=p["remat"],
                        cnn_remat=p["remat"], nested_dropout="none", attention_impl=ATTENTION,
                        quantizer="vq", quantizer_options=dict(QUANTIZER_OPTIONS),
                        code_dim=8)  # codebook_embed_dim of every released GigaTok
    if train_new:
        config.model["rotation_trick"] = False

    aux_on = p["aux_loss_end"] > 0
    config.losses.l2 = 1.0
    config.losses.quantizer = 1.0
    config.losses.entropy = p["entropy"]
    config.losses.perceptual = 1.0
    config.losses.gan = 0.5
    config.losses.semantic = 0.5
    config.losses.fea_rec = 1.0 if aux_on else 0.0
    config.losses.shortcut = shortcut if aux_on else 0.0
    config.aux_loss_end_step = recipes.gigatok_step(p["aux_loss_end"])
    config.perceptual.kind = "lpips"
    config.teacher.name = "dinov2"
    # scan: DINOv2's 12 blocks compile as one (the converted weights are stacked at load time).
    config.teacher.model = dict(size="vitb14", scan=True)

    for o in (config.optim, config.disc_optim):
        o.lr = 1e-4
        o.end_lr = 1e-5
        o.warmup_steps = p["warmup_steps"]
        o.warmup_init = 0.01
        o.schedule = "cosine"
        o.b1 = 0.9
        o.b2 = 0.95
        o.eps = 1e-8
        o.weight_decay = 1e-4
        o.grad_clip = 10.0
    # The FSDP trainer (XL-XXL) groups the tokenizer's params by name; both trainers give the
    # discriminator a plain AdamW that decays every parameter.
    config.optim.decay_mask = p["decay_mask"]
    config.disc_optim.decay_mask = "all"
    d = config.discriminator
    d.name = "patchgan"
    d.loss = "hinge"
    d.lecam = 0.0
    d.d_weight = 0.5
    d.start_step = recipes.gigatok_step(20_000)
    if dino_disc:
        d.name = "dino"
        # the frozen ViT-S/16 trunk's 12 blocks compile as one, and so do the 5 heads
        d.model = dict(scan=True, scan_heads=True)
        d.diffaug_prob = 1.0
        d.diffaug_cutout = 0.2
        d.start_step = recipes.gigatok_step(80_000)
        config.disc_optim.freeze = "trunk"
    recipes.gigatok_vq_train(config)
    recipes.pod_run(config)
    recipes.adm_evaluation(config)  # IS over 5,000-image parts
    return config
