"""Small TiTok with any quantizer: the quantizer comparison on the embedded digits
(`benchmarks/quantizers.py` runs every variant and writes the README's table and a plot).

    python -m tok1d.main --config=configs/quantizers.py:fsq --workdir=/tmp/tok1d_q_fsq

| arg            | quantizer                                   | code size | vocabulary        |
|----------------|---------------------------------------------|-----------|-------------------|
| vq             | l2-normalised VQ, usage entropy 0.01        | 6         | 64                |
| clustering_vq  | VQ + TiTok's re-anchoring, entropy 0.01     | 6         | 64                |
| simvq          | frozen base x learned map, entropy 0.01     | 6         | 64                |
| residual_vq    | 2 levels of 64 (no l2)                      | 6         | 64 (2 per token)  |
| fsq            | levels (4, 4, 4)                            | 3         | 64                |
| lfq            | 6 bits, entropy weight 0.1                  | 6         | 64                |
| bsq            | 6 bits, entropy weight 0.1                  | 6         | 64                |
| vae            | KL bottleneck (weight 1e-4)                 | 6         | continuous        |

Same model for all (32x32 digits, the demo's "tiny" ViT halves, 16 tokens), optimizer
(AdamW 1e-3 -> 1e-4, batch 32) and 1500 steps; evaluated on the 179 held-out digits. The VQ
family gets the demo's usage-entropy term at temperature 0.1: without it (and with the 1-layer
"nano" halves) every quantizer here collapses to one code per token position and decodes the
mean digit (PSNR 14.3 for all eight, measured), TiTok's cold start. At the end the AR probe
(`config.ar_probe`, tok1d.probes.ar) encodes the 1618 training and 179 held-out digits with
the trained tokenizer and fits a small GPT (width 64, 2 layers, 300 steps) on those codes:
its validation loss (nats per code; every discrete vocabulary here has 64 entries; residual
VQ's 2 codes per token are one flattened sequence of 32) says how predictable each
quantizer's codes are for a generator (lower is easier, but a collapsed codebook is trivially
predictable: read it beside the usage).
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
    steps = 1500
    vq_family = arg in ("vq", "clustering_vq", "simvq")
    config = config_lib.base_config("tokenizer")
    config.total_steps = steps
    config.batch_size = 32
    config.eval_batch_size = 64
    config.precision = "float32"
    config.ema_decay = 0.0
    config.model = dict(name="titok", patch_size=8, num_latent_tokens=16, encoder_size="tiny",
                        decoder_size="tiny", codebook_size=64, token_dim=token_dim,
                        quantizer=arg, quantizer_options=options,
                        nested_dropout="none")  # "uniform" / "pow2": ordered tokens
    if vq_family:
        # The demo's soft usage entropy (distances on the unit sphere lie in [0, 4]; at the
        # default temperature 0.01 the entropy term is met by one code per token position).
        config.model.entropy_temperature = 0.1
    config.losses.entropy = {"lfq": 0.1, "bsq": 0.1}.get(arg, 0.01 if vq_family else 0.0)
    if arg == "vae":
        config.losses.quantizer = 0.0
        config.losses.kl = 1e-4
    config.data.name = "digits"
    config.data.image_size = 32
    config.data.augment = "center_crop"
    config.data.flip = False
    config.data.eval_examples = -1     # the 179 held-out digits
    config.optim.lr = 1e-3
    config.optim.end_lr = 1e-4
    config.optim.warmup_steps = 100
    config.log_every_steps = 100
    config.eval_every_steps = steps
    config.checkpoint.every_steps = steps
    config.checkpoint.keep = 1
    config.num_grid_images = 8
    if arg != "vae":  # continuous latents: no codes to model
        config.ar_probe.every_steps = steps
        config.ar_probe.train_examples = 1618  # every training digit
        config.ar_probe.steps = 300
        config.ar_probe.model = dict(width=64, depth=2, num_heads=2)
    return config
