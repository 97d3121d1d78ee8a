"""LlamaGen-style GPT generators (AR, 1D) on GigaTok tokens (256 codes of 16384), ImageNet-1k
256x256. `--config=configs/gpt_gigatok.py:ARG`:

| arg | what it is                         | paper target (50k samples, README)              |
|-----|------------------------------------|-------------------------------------------------|
| b   | GPT-B, 111.1M parameters           | gFID 3.26 on GigaTok B-L tokens                 |
| l   | GPT-L, 343.2M parameters           | (not reported for GPT-L)                        |
| xl  | GPT-XL, 775.0M parameters          | gFID 2.13 on B-L tokens                         |
| xxl | GPT-XXL, 1411.4M parameters        | gFID 2.03 on B-L tokens, 1.98 on XL-XXL tokens  |

gFID with the CFG scale from a line search with the `step` schedule (the search starts at
`sampling.cfg_scale`). Run (b shown; `gigatok_b_l/` is the converted or trained tokenizer):

    python -m tok1d.main --config=configs/gpt_gigatok.py:b --workdir=/gcs/BUCKET/gpt_b \\
        --config.generator.tokenizer=gigatok_b_l/
    python -m tok1d.cli.sample --config=configs/gpt_gigatok.py:b --checkpoint=/gcs/BUCKET/gpt_b \\
        --tokenizer=gigatok_b_l/ --num_images=50000 --out=samples_gpt_b/
    # gFID / IS / precision-recall of 50k samples (GigaTok's linear probe too with
    # --config.evaluation.linear_probe_epochs=90: on ImageNet's images, as lin_probe.py)
    python -m tok1d.cli.evaluate --config=configs/gpt_gigatok.py:b --checkpoint=DIR \\
        --tokenizer=TOK --out=eval/ --inception=inception_fid/ \\
        --reference=VIRTUAL_imagenet256_labeled.npz

Training sequences (`generator.token_source`), both official:
- "images" (the default, as GigaTok's Detailed_instructions and composite script run it,
  `DATASET=imagenet`): every step encodes an ADM random crop (256..320 px shorter side) +
  flip of each ImageNet image with the frozen tokenizer; the validation loss encodes center
  crops (val_loss_cal.py).
- "dataset" (GigaTok's "pre-computed indices for acceleration", which it suggests for the
  large GPTs): the ten crops of its code extraction (scripts/extract_code_c2i.sh:
  `extract_codes_c2i.py --ten-crop --crop-range 1.1`; ADM's center crop to 281 px, then the
  four corner and center 256 crops and their mirrors), one drawn per example each time, as
  its `CustomDataset` does:

    python -m tok1d.cli.tokenize --tokenizer=gigatok_b_l/ --data=tfds:imagenet2012 --split=train \\
        --crop=ten_crop --batch_size=64 --out=/gcs/BUCKET/tokens_gigatok_b_l
    python -m tok1d.cli.tokenize --tokenizer=gigatok_b_l/ --data=tfds:imagenet2012 \\
        --split=validation --out=/gcs/BUCKET/tokens_gigatok_b_l
    ... --config.generator.token_source=dataset \\
        --config.generator.tokens=/gcs/BUCKET/tokens_gigatok_b_l

Recipe (GigaTok's autoregressive/train/train_c2i.py as scripts/composite_cmd/
train_c2i_and_eval.sh calls it): next-token CE, class dropout 0.1, token / residual dropout
0.1; AdamW lr 1e-4, betas (0.9, 0.95), wd 0.05 on >= 2-D params incl. embeddings, clip 1.0,
WSD schedule (warm-up from lr/100, constant, 1 - sqrt decay over the last 20%) read as
train_c2i does (step 1 at the base LR: `tok1d.recipes.llamagen_train_c2i`, checked against the
official step by tests/test_train_parity_gpt.py); 300 epochs; no EMA (the script does not pass
--ema; ema_decay=0.9999 is the official option). Sampling: CFG with the `step` schedule
(window_start 0.18), temperature 1, no top-k / top-p, in float32 (the gFID runs'
PRECISION="none"). GigaTok's AR probing stops GPT-B at 250k steps in the constant phase,
without warm-up (--config.total_steps=250000
--config.optim.decay_fraction=0 --config.optim.warmup_steps=0: train_vq_and_eval.sh's
WARM_ITER=0).
Released GPT checkpoints convert with `tok1d convert gpt --checkpoint=GPT_B.pt --out=gpt_b/`;
`tok1d.official.gpt.config_from_official` maps any train_c2i run the same way.
"""

from tok1d import recipes

# Per size: batch, steps (300 epochs), LR warm-up, the CFG scale the gFID search starts at, and
# remat from tok1d.cli.bench --compile_only at batch 64 per device: GPT-B saves 14 GiB of
# activations without remat; from L up the "dots" policy needs ~19% fewer FLOPs than "full"
# (L: 10 vs 3 GiB saved, XXL: 30 vs 9 GiB, next to 16 GiB of unsharded state).
VARIANTS = {
    "b": dict(size="B", batch_size=256, total_steps=1_500_000, warmup_steps=5_000,
              cfg_scale=2.5, remat="none"),
    "l": dict(size="L", batch_size=256, total_steps=1_500_000, warmup_steps=5_000,
              cfg_scale=1.75, remat="dots"),
    "xl": dict(size="XL", batch_size=256, total_steps=1_500_000, warmup_steps=5_000,
               cfg_scale=1.25, remat="dots"),
    "xxl": dict(size="XXL", batch_size=512, total_steps=750_000, warmup_steps=200,
                cfg_scale=1.25, remat="dots"),
}


# Training sequences: "images" (encoded in every step, the official default) or "dataset"
# (generator.tokens), e.g. --config.generator.token_source=dataset.
TOKEN_SOURCE = "images"

# Where the frozen tokenizer's decoder lives while the GPT trains on images: "host" (its
# params in host memory, put on the devices only while an evaluation decodes the sample grid:
# upstream deletes its decoder; 7.2 GiB in float32 for XL-XXL, whole on every device of a
# data-parallel mesh otherwise) or "device".
TOKENIZER_DECODER = "host"

# Attention kernel: "xla", or "cudnn" (cuDNN's fused attention on NVIDIA GPUs; a decoding step
# then reads the KV cache by its filled length), e.g. --config.model.attention_impl=cudnn.
ATTENTION = "xla"

# Compute dtype of the sampler and of the decode of its samples (grids, gFID): "float32"
# as the official sample scripts (GigaTok's gFID runs, PRECISION="none": fp32 with TF32 matmuls),
# "bfloat16" (faster; the official speed baselines'), or "" (the run's `precision`),
# e.g. --config.sampling_precision=bfloat16.
SAMPLING_PRECISION = "float32"


def get_config(arg: str = ""):
    if arg not in VARIANTS:
        raise recipes.unknown_variant("gpt_gigatok.py", arg, VARIANTS)
    v = VARIANTS[arg]
    config = recipes.generator_base(total_steps=v["total_steps"], batch_size=v["batch_size"])
    config.ema_decay = 0.0
    recipes.imagenet_adm(config)  # random_crop_arr + flip; center_crop_arr for the val loss
    config.generator.token_source = TOKEN_SOURCE
    config.generator.tokenizer_decoder = TOKENIZER_DECODER
    config.model = dict(name="gpt", size=v["size"], vocab_size=16384, num_tokens=256,
                        num_classes=1000, token_dropout=0.1, dropout_rate=0.1,
                        remat=v["remat"], attention_impl=ATTENTION)
    config.generator.label_dropout = 0.1
    recipes.llamagen_train_c2i(config)
    o = config.optim
    o.lr = 1e-4
    o.warmup_steps = v["warmup_steps"]
    o.schedule = "wsd"
    o.decay_fraction = 0.2
    o.b1 = 0.9
    o.b2 = 0.95
    o.weight_decay = 0.05
    o.grad_clip = 1.0
    config.sampling = dict(cfg_scale=v["cfg_scale"], cfg_schedule="step",
                           cfg_kwargs=dict(window_start=0.18), temperature=1.0, top_k=0,
                           top_p=1.0,
                           # decode in chunks of 32 cache positions (0: one loop, whole cache)
                           cache_chunk=32)
    config.sampling_precision = SAMPLING_PRECISION
    return config
