"""GPT-XL (775.0M parameters, LlamaGen-style AR, 1D) on GigaTok tokens (256 codes of 16384),
ImageNet-1k 256x256.

    python -m tok1d.cli.tokenize --tokenizer=gigatok_b_l/ --data=tfds:imagenet2012 --split=train \
        --crop adm --flip --out=gs://BUCKET/tokens_gigatok_b_l
    python -m tok1d.cli.tokenize --tokenizer=gigatok_b_l/ --data=tfds:imagenet2012 \
        --split=validation --out=gs://BUCKET/tokens_gigatok_b_l
    python -m tok1d.main --config=configs/gpt_xl_gigatok.py --workdir=gs://BUCKET/gpt_xl \
        --config.generator.tokens=gs://BUCKET/tokens_gigatok_b_l \
        --config.generator.tokenizer=gigatok_b_l/
    python -m tok1d.cli.sample --config=configs/gpt_xl_gigatok.py --checkpoint=gs://BUCKET/gpt_xl \
        --tokenizer=gigatok_b_l/ --num_images=50000 --out=samples_gpt_xl/

Recipe: `tok1d.recipes.gpt_gigatok` (GigaTok's autoregressive/train/train_c2i.py settings:
AdamW 1e-4, betas (0.9, 0.95), wd 0.05, WSD schedule, 300 epochs, class dropout 0.1, and its
training-step semantics, checked against the official step by tests/test_train_parity_gpt.py).
GigaTok's AR probing stops GPT-B at 250k steps in the constant phase
(--config.total_steps=250000 --config.optim.decay_fraction=0). Released GPT checkpoints
convert with `python -m tok1d.cli.convert gpt GPT_XL.pt gpt_xl/`.
Target gFID (README, CFG scale from a line search with the step schedule): 2.13 on GigaTok B-L tokens.

Evaluate (gFID / IS / precision-recall of 50k samples; the linear probe too with
--config.evaluation.linear_probe_epochs=90):

    python -m tok1d.cli.evaluate --config=configs/gpt_xl_gigatok.py --checkpoint=DIR --tokenizer=TOK \
        --out=eval/ --inception=inception_fid/ --reference=VIRTUAL_imagenet256_labeled.npz
"""

from tok1d import recipes


def get_config():
    return recipes.gpt_gigatok("XL")
