"""MaskGIT generators on TiTok tokens, ImageNet-1k 256x256. `--config=configs/maskgit_titok.py:ARG`:

| arg  | what it is                                            | paper target (50k samples) |
|------|-------------------------------------------------------|----------------------------|
| l32  | ViT/BERT generator (177M) on TiTok-L-32's 32 tokens    | gFID 2.77                  |
| b64  | ViT/BERT generator (177M) on TiTok-B-64's 64 tokens    | gFID 2.48                  |
| s128 | U-ViT generator (295M) on TiTok-S-128's 128 tokens     | gFID 1.97                  |

gFID against the ADM reference batch, with the released sampling settings
(configs/infer/TiTok/titok_{arg}.yaml). Run (l32 shown; `titok_l32/` is the converted
tokenizer: tok1d convert titok --checkpoint=tokenizer_titok_l32.bin --out=titok_l32/):

    python -m tok1d.cli.tokenize --tokenizer=titok_l32/ --data=tfds:imagenet2012 --split=train \\
        --flip --out=/gcs/BUCKET/tokens_titok_l32
    python -m tok1d.cli.tokenize --tokenizer=titok_l32/ --data=tfds:imagenet2012 \\
        --split=validation --out=/gcs/BUCKET/tokens_titok_l32
    python -m tok1d.main --config=configs/maskgit_titok.py:l32 --workdir=/gcs/BUCKET/maskgit_l32 \\
        --config.generator.tokens=/gcs/BUCKET/tokens_titok_l32 --config.generator.tokenizer=titok_l32/
    python -m tok1d.cli.sample --config=configs/maskgit_titok.py:l32 \\
        --checkpoint=/gcs/BUCKET/maskgit_l32 --tokenizer=titok_l32/ --num_images=50000 \\
        --out=samples_l32/
    # gFID / IS / precision-recall of 50k samples
    python -m tok1d.cli.evaluate --config=configs/maskgit_titok.py:l32 --checkpoint=DIR \\
        --tokenizer=TOK --out=eval/ --inception=inception_fid/ \\
        --reference=VIRTUAL_imagenet256_labeled.npz

Recipe (configs/training/generator/maskgit.yaml, scripts/train_maskgit.py): masks drawn with
the arccos schedule, CE with label smoothing 0.1 on all positions (masked weight 1, unmasked
0.1), class label dropout 0.1; AdamW lr 2e-4, betas (0.9, 0.96), wd 0.03 (official decay
split), 10k warm-up from 0, cosine to 1e-5, clip 1.0, EMA 0.999 with EMAModel's warm-up
(`tok1d.recipes.titok_train_utils`); batch 2048 for 500k steps; center crop 256 + flip
(tokenize with --flip). The training step is checked against the official one by
tests/test_train_parity_maskgit.py; `tok1d.official.maskgit.config_from_official` maps any
official generator YAML the same way. The released generators convert with
`tok1d convert maskgit --checkpoint=generator_titok_l32.bin --out=maskgit_l32/`.
"""

from tok1d import recipes

# Generator architecture, the tokenizer's token count, and the released sampling settings.
# The BERT generators ("vit") use dropout and attention dropout 0.1 (their defaults); UViTBert
# has none.
VARIANTS = {
    "l32": dict(arch="vit", num_tokens=32,
                sampling=dict(num_steps=8, guidance_scale=4.5, guidance_schedule="linear",
                              randomize_temperature=9.5, softmax_annealing=True)),
    "b64": dict(arch="vit", num_tokens=64,
                sampling=dict(num_steps=8, guidance_scale=3.0, guidance_schedule="linear",
                              randomize_temperature=11.0, softmax_annealing=True)),
    "s128": dict(arch="uvit", num_tokens=128,
                 sampling=dict(num_steps=64, guidance_scale=6.9,
                               guidance_schedule="power-cosine", guidance_pow=3.0,
                               randomize_temperature=2.8, softmax_annealing=True)),
}

# Compute dtype of the sampler and of the decode of its samples (grids, gFID): "float32"
# as the official sample scripts (sample_imagenet_titok.py: fp32 with TF32 matmuls),
# "bfloat16" (faster; the official speed baselines'), or "" (the run's `precision`),
# e.g. --config.sampling_precision=bfloat16.
SAMPLING_PRECISION = "float32"


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise recipes.unknown_variant("maskgit_titok.py", arg, VARIANTS)
    v = VARIANTS[arg]
    config = recipes.generator_base(total_steps=500_000, batch_size=2048)
    config.ema_decay = 0.999
    config.model = dict(name="maskgit", arch=v["arch"], size=arg, codebook_size=4096,
                        num_tokens=v["num_tokens"], num_classes=1000)
    g = config.generator
    g.label_dropout = 0.1
    g.mask_schedule = "arccos"
    g.label_smoothing = 0.1
    g.unmasked_weight = 0.1
    recipes.titok_train_utils(config)
    o = config.optim
    o.lr = 2e-4
    o.end_lr = 1e-5
    o.warmup_steps = 10_000
    o.schedule = "cosine"
    o.b1 = 0.9
    o.b2 = 0.96
    o.weight_decay = 0.03
    o.grad_clip = 1.0
    config.sampling = v["sampling"]
    config.sampling_precision = SAMPLING_PRECISION
    return config
