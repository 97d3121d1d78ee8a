"""Demo: tokenizer -> tokens -> class-conditional generator, on scikit-learn's bundled
handwritten digits (no download), on any machine (CPU is fine).

    python -m tok1d.main --config=configs/demo.py --workdir=/tmp/tok1d_demo

Stages (tok1d.cli.demo): a small TiTok (16 tokens of 8 bits for a 32x32 digit) on the
1618 training digits; both splits encoded to tokens; a small MaskGIT generator on the tokens;
then samples of every class. Writes to the workdir: `tokenizer/reconstructions.png`
(validation digits above their reconstructions), `generator/samples.png` and
`samples_per_class.png` (one row per requested class 0..9), `metrics.json` (tokenizer PSNR and
code usage, generator validation loss, classifier accuracies), TensorBoard logs in each stage
directory (`tensorboard --logdir /tmp/tok1d_demo`), checkpoints (rerunning resumes / is a no-op).

The generated digits are judged by a classifier of the real ones (logistic regression on the
8x8 grey levels, scikit-learn): the fraction of samples recognised as the class that was
asked for - and by a LeNet-style CNN trained by the demo on the real training digits
(tok1d.evaluation.digit_features), whose features give FID-digits (rFID of the
reconstructions, gFID of the samples), precision / recall and intra-class diversity against
the 179 held-out digits: demo metrics, NOT comparable with Inception FID. A guidance x
temperature sweep (`demo.sweep`, tok1d.cli.sample.sweep; WORKDIR/sweep/) picks the sampling
setting: the lowest gFID-digits among those with class accuracy >= 0.9.

Measured (seed 0, one CPU device; a fresh clone of 2026-12-03, `pip install -e ".[test]"`,
the command above: 7 min 18 s wall on an idle 2-core CPU, 1.5 GB peak memory): tokenizer eval
PSNR 20.1 dB on the 179 held-out digits, 134 of 256 codes used (perplexity 103); generator
validation loss 1.47, masked-token accuracy 0.74; logistic-regression classifier 95.0% on the
real held-out digits, 87.7% on their reconstructions. Digit CNN: 97.8% on the held-out digits;
rFID-digits 19.2. The sweep (25 settings x 300 samples; sweep/sweep.md, sweep/sweep.png;
held-out digits' diversity: 15.7):
  the old fixed setting (guidance 2, temperature 1): gFID-digits 30.4, precision 1.00, recall
    0.03, diversity 3.7, 100% of the requested class - ten near-copies per row;
  the sweep's best (guidance 0, temperature 2.5): gFID-digits 18.1, precision 0.98, recall
    0.39, diversity 11.6, 93% of the requested class (logistic regression: 90% of the 100
    shown) - varied slant, width and stroke (samples_per_class.png; a few are the wrong
    digit), still less diverse than the real digits: temperature 4 reaches their diversity
    (16.8) but only 75% of the requested class. The previous 3 x 4 grid (no 0.5 / 2.5 / 3)
    picked guidance 0 at temperature 2 (here gFID 20.3, diversity 9.2).
"""

from tok1d.train import config_lib


def get_config():
    config = config_lib.base_config("demo")
    config.seed = 0
    config.total_steps = 1500
    config.batch_size = 32            # ~2x the steps/s of 64 on a 2-core CPU
    config.eval_batch_size = 64
    config.precision = "float32"   # bf16 matmuls are slow on most CPUs.
    config.ema_decay = 0.99

    config.model = dict(
        name="titok",
        patch_size=8,
        num_latent_tokens=16,
        encoder_size="tiny",
        decoder_size="tiny",
        codebook_size=256,
        token_dim=8,
        l2_norm=True,
        # A soft entropy temperature (distances on the unit sphere are in [0, 4]): at the
        # default 0.01 the softmax is one-hot, the entropy loss is already met by one code per
        # token position and the tokens stay image-independent (TiTok's cold start).
        entropy_temperature=0.1,
        scan=True,
    )
    config.data.name = "digits"
    config.data.image_size = 32
    config.data.augment = "center_crop"
    config.data.flip = False           # a mirrored digit is not the same digit
    config.data.eval_examples = -1

    # GigaTok's entropy loss keeps the codebook from collapsing onto one code per position.
    config.losses.entropy = 0.01

    config.optim.lr = 1e-3
    config.optim.end_lr = 1e-4
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 1e-4

    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint.every_steps = 500
    config.num_grid_images = 16

    # The generator stage: a small MaskGIT (BERT-style) on the 16 tokens, 10 classes.
    config.demo.generator = dict(
        total_steps=1500,
        batch_size=64,
        eval_batch_size=64,
        ema_decay=0.99,
        log_every_steps=50,
        eval_every_steps=500,
        num_grid_images=40,
        model=dict(name="maskgit", arch="vit", codebook_size=256, num_tokens=16,
                   num_classes=10, width=128, depth=4, num_heads=4, mlp_dim=512,
                   dropout_rate=0.1, attention_dropout=0.0),
        optim=dict(lr=1e-3, end_lr=1e-5, warmup_steps=100, b2=0.96, weight_decay=0.03),
        sampling=dict(num_steps=8, guidance_scale=2.0, guidance_schedule="constant",
                      randomize_temperature=1.0),
        checkpoint=dict(every_steps=500),
    )
    config.demo.samples_per_class = 10
    # The digit CNN of the demo metrics and the sweep that picks the sampling setting above's
    # guidance / temperature: 25 settings x 300 samples, scored by FID-digits.
    config.demo.feature_net = dict(steps=300, batch_size=128, learning_rate=2e-3, feature_dim=64)
    config.demo.sweep = dict(guidance_scales=(0.0, 0.5, 1.0, 2.0, 3.0),
                             temperatures=(1.0, 2.0, 2.5, 3.0, 4.0),
                             samples_per_class=30, min_class_accuracy=0.9)
    return config
