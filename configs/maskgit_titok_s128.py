"""MaskGIT generator on TiTok-S-128 (128 tokens, U-ViT generator, 295M), ImageNet-1k 256x256.

    python -m tok1d.cli.tokenize --tokenizer=titok_s128/ --data=tfds:imagenet2012 --split=train \
        --flip --out=gs://BUCKET/tokens_titok_s128
    python -m tok1d.cli.tokenize --tokenizer=titok_s128/ --data=tfds:imagenet2012 \
        --split=validation --out=gs://BUCKET/tokens_titok_s128
    python -m tok1d.main --config=configs/maskgit_titok_s128.py --workdir=gs://BUCKET/maskgit_s128 \
        --config.generator.tokens=gs://BUCKET/tokens_titok_s128 --config.generator.tokenizer=titok_s128/
    python -m tok1d.cli.sample --config=configs/maskgit_titok_s128.py --checkpoint=gs://BUCKET/maskgit_s128 \
        --tokenizer=titok_s128/ --num_images=50000 --out=samples_s128/

`titok_s128/` is the converted tokenizer (python -m tok1d.cli.convert titok tokenizer_titok_s128.bin
titok_s128/). Recipe: `tok1d.recipes.maskgit_titok` (the official
configs/training/generator/maskgit.yaml: batch 2048, 500k steps, AdamW 2e-4, arccos masking,
label smoothing 0.1, unmasked weight 0.1, class dropout 0.1, EMA; the training step is
checked against the official one by tests/test_train_parity_maskgit.py). Sampling: the released
settings of configs/infer/TiTok/titok_s128.yaml. The released generator converts with
`python -m tok1d.cli.convert maskgit generator_titok_s128.bin maskgit_s128/`.
Target (paper, 50k samples vs the ADM reference batch): gFID 1.97.

Evaluate (gFID / IS / precision-recall of 50k samples):

    python -m tok1d.cli.evaluate --config=configs/maskgit_titok_s128.py --checkpoint=DIR --tokenizer=TOK \
        --out=eval/ --inception=inception_fid/ --reference=VIRTUAL_imagenet256_labeled.npz
"""

from tok1d import recipes


def get_config():
    return recipes.maskgit_titok("s128")
