"""RAR generators (randomized autoregressive, bytedance/1d-tokenizer) on MaskGIT-VQGAN tokens
(256 codes of 1024 per image), ImageNet-1k 256x256. `--config=configs/rar.py:ARG`:

| arg | what it is                       | sampling: g, pow, temperature | paper target (50k)  |
|-----|----------------------------------|-------------------------------|---------------------|
| b   | RAR-B, 261M parameters (24 x 768) | 16.0, 2.75, 1.0               | gFID 1.95           |
| l   | RAR-L, 461M (24 x 1024)          | 15.5, 2.5, 1.02               | gFID 1.70           |
| xl  | RAR-XL, 955M (32 x 1280)         | 6.9, 1.5, 1.02                | gFID 1.50           |
| xxl | RAR-XXL, 1499M (40 x 1408)       | 8.0, 1.2, 1.02                | gFID 1.48           |

(parameters as upstream counts them, incl. table rows it never reads; 16 heads; MLP width
3072 / 4096 / 5120 / 6144.) gFID
against the ADM reference batch with the released sampling settings (README_RAR.md, the
`sample_imagenet_rar.py` commands): guidance scale g with the power-cosine schedule of
exponent pow, temperature `randomize_temperature`. Run (b shown; `maskgit_vqgan/` is the
converted tokenizer: python -m tok1d.cli.convert maskgit_vqgan
--checkpoint=maskgit-vqgan-imagenet-f16-256.bin --out=maskgit_vqgan/):

    python -m tok1d.cli.tokenize --tokenizer=maskgit_vqgan/ --data=tfds:imagenet2012 \\
        --split=train --image_size=256 --crop=center --flip --out=/gcs/BUCKET/tokens_maskgit_vqgan
    python -m tok1d.cli.tokenize --tokenizer=maskgit_vqgan/ --data=tfds:imagenet2012 \\
        --split=validation --image_size=256 --crop=center --out=/gcs/BUCKET/tokens_maskgit_vqgan
    python -m tok1d.main --config=configs/rar.py:b --workdir=/gcs/BUCKET/rar_b \\
        --config.generator.tokens=/gcs/BUCKET/tokens_maskgit_vqgan \\
        --config.generator.tokenizer=maskgit_vqgan/
    python -m tok1d.cli.sample --config=configs/rar.py:b --checkpoint=/gcs/BUCKET/rar_b \\
        --tokenizer=maskgit_vqgan/ --num_images=50000 --out=samples_rar_b/
    # gFID / IS / precision-recall of 50k samples
    python -m tok1d.cli.evaluate --config=configs/rar.py:b --checkpoint=DIR \\
        --tokenizer=maskgit_vqgan/ --out=eval/ --inception=inception_fid/ \\
        --reference=VIRTUAL_imagenet256_labeled.npz

The released generators convert with `python -m tok1d.cli.convert rar --checkpoint=rar_b.bin
--out=rar_b/ --size=B` (sample / evaluate them with --checkpoint=rar_b/).

Recipe (configs/training/generator/rar.yaml, scripts/train_rar.py): next-token cross-entropy
(`ARLoss`) on sequences read in a random order with probability 1 until step 125k (200
epochs), falling linearly to 0 at step 187.5k (300 epochs), raster order after; class label
dropout 0.1, dropout and attention dropout 0.1; AdamW lr 4e-4, betas (0.9, 0.96), wd 0.03
(the official name-based decay rule, `tok1d.recipes.rar_train_utils`), 62.5k warm-up from 0,
cosine to 1e-5, clip 1.0, no EMA; batch 2048 (64 x 32 GPUs) for 250k steps (400 epochs of
ImageNet's 1.28M images); bf16. Tokens: upstream pre-tokenizes with the ADM center crop and its
horizontal flip (`scripts/pretokenization.py` without --ten_crop), hence --crop=center --flip.
The training step is checked against the official one by tests/test_train_parity_rar.py;
`tok1d.official.rar.config_from_official` maps any official RAR YAML the same way.

Compute (6 x parameters x tokens, 257 positions a sequence, attention not counted): about
2.1e20 FLOPs for RAR-B, 3.6e20 L, 7.5e20 XL, 1.2e21 XXL over the 250k steps; upstream trained on
32 GPUs. Sampling: 256 cached decoding steps per image, each on the doubled CFG batch.
"""

from tok1d import recipes

# Per size: the RAR size, the released sampling settings (README_RAR.md) and remat (upstream
# trains without gradient checkpointing: `use_checkpoint: False`; not measured here -- check a
# batch with `tok1d bench --config=configs/rar.py:ARG --compile_only`).
VARIANTS = {
    "b": dict(size="B", remat="none",
              sampling=dict(guidance_scale=16.0, guidance_scale_pow=2.75,
                            randomize_temperature=1.0)),
    "l": dict(size="L", remat="none",
              sampling=dict(guidance_scale=15.5, guidance_scale_pow=2.5,
                            randomize_temperature=1.02)),
    "xl": dict(size="XL", remat="none",
               sampling=dict(guidance_scale=6.9, guidance_scale_pow=1.5,
                             randomize_temperature=1.02)),
    "xxl": dict(size="XXL", remat="none",
                sampling=dict(guidance_scale=8.0, guidance_scale_pow=1.2,
                              randomize_temperature=1.02)),
}


# Attention kernel: "xla", or "cudnn" (cuDNN's fused attention on NVIDIA GPUs; a decoding step
# then reads the KV cache by its filled length), e.g. --config.model.attention_impl=cudnn.
ATTENTION = "xla"

# Compute dtype of the sampler and of the decode of its samples (grids, gFID): "float32"
# as the official sample scripts (sample_imagenet_rar.py: fp32 with TF32 matmuls),
# "bfloat16" (faster; the official speed baselines'), or "" (the run's `precision`),
# e.g. --config.sampling_precision=bfloat16.
SAMPLING_PRECISION = "float32"


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise recipes.unknown_variant("rar.py", arg, VARIANTS)
    v = VARIANTS[arg]
    config = recipes.generator_base(total_steps=250_000, batch_size=2048)
    config.ema_decay = 0.0
    config.model = dict(name="rar", size=v["size"], vocab_size=1024, num_tokens=256,
                        num_classes=1000, dropout_rate=0.1, attention_dropout=0.1,
                        remat=v["remat"], attention_impl=ATTENTION)
    g = config.generator
    g.label_dropout = 0.1
    g.randomness_anneal_start = 125_000
    g.randomness_anneal_end = 187_500
    recipes.rar_train_utils(config)
    o = config.optim
    o.lr = 4e-4
    o.end_lr = 1e-5
    o.warmup_steps = 62_500
    o.schedule = "cosine"
    o.b1 = 0.9
    o.b2 = 0.96
    o.weight_decay = 0.03
    o.grad_clip = 1.0
    # cache_chunk: decode in chunks of 32 cache positions (0: one loop over the whole cache)
    config.sampling = dict(v["sampling"], top_k=0, top_p=1.0, cache_chunk=32)
    config.sampling_precision = SAMPLING_PRECISION
    return config
