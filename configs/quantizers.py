"""Tiny TiTok with any quantizer: the quantizer comparison on the embedded demo data
(`benchmarks/quantizers.py` runs every variant and writes the README's table and a plot).

    python -m tok1d.main --config=configs/quantizers.py:fsq --workdir=/tmp/tok1d_q_fsq

| arg            | quantizer                      | code size | vocabulary        |
|----------------|--------------------------------|-----------|-------------------|
| vq             | l2-normalised VQ               | 6         | 64                |
| clustering_vq  | VQ + TiTok's re-anchoring      | 6         | 64                |
| simvq          | frozen base x learned map      | 6         | 64                |
| residual_vq    | 2 levels of 64 (no l2)         | 6         | 64 (2 per token)  |
| fsq            | levels (4, 4, 4)               | 3         | 64                |
| lfq            | 6 bits, entropy weight 0.1     | 6         | 64                |
| bsq            | 6 bits, entropy weight 0.1     | 6         | 64                |
| vae            | KL bottleneck (weight 1e-4)    | 6         | continuous        |

Same model (32x32 demo crops, 1-layer width-32 ViT halves, 8 tokens), optimizer and steps for
all; `steps` below. At the end the AR probe (`config.ar_probe`, tok1d.probes.ar) encodes 2048
training crops and the 256 validation crops with the trained tokenizer and fits a small GPT
(width 64, 2 layers, 300 steps) on those codes: its validation loss (nats per code, every
discrete vocabulary here has 64 entries; residual VQ's 2 codes per token are one flattened
sequence of 16) says how learnable each quantizer's codes are for a generator.
"""

from tok1d.train import config_lib

OPTIONS = {
    "vq": ({}, 6),
    "clustering_vq": ({}, 6),
    "simvq": ({}, 6),
    "residual_vq": ({"depth": 2, "l2_norm": False}, 6),
    "fsq": ({"levels": [4, 4, 4]}, 3),
    "lfq": ({}, 6),
    "bsq": ({}, 6),
    "vae": ({}, 6),
}


def get_config(arg: str = "vq"):
    if arg not in OPTIONS:
        raise ValueError(f"configs/quantizers.py:{arg}: expected one of {sorted(OPTIONS)}")
    options, token_dim = OPTIONS[arg]
    steps = 300
    config = config_lib.base_config("tokenizer")
    config.total_steps = steps
    config.batch_size = 16
    config.eval_batch_size = 16
    config.precision = "float32"
    config.ema_decay = 0.0
    config.model = dict(name="titok", patch_size=8, num_latent_tokens=8, encoder_size="nano",
                        decoder_size="nano", codebook_size=64, token_dim=token_dim,
                        quantizer=arg, quantizer_options=options)
    config.losses.entropy = 0.1 if arg in ("lfq", "bsq") else 0.0
    if arg == "vae":
        config.losses.quantizer = 0.0
        config.losses.kl = 1e-4
    config.data.image_size = 32
    config.data.eval_examples = 256
    config.data.demo_size = 2048
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 20
    config.log_every_steps = 50
    config.eval_every_steps = steps
    config.checkpoint.every_steps = steps
    config.checkpoint.keep = 1
    config.num_grid_images = 4
    if arg != "vae":  # continuous latents: no codes to model
        config.ar_probe.every_steps = steps
        config.ar_probe.train_examples = 2048
        config.ar_probe.steps = 300
        config.ar_probe.model = dict(width=64, depth=2, num_heads=2)
    return config
