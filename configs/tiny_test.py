"""Tiny TiTok for tests and smoke runs (seconds on a CPU).

    python -m tok1d.main --config=configs/tiny_test.py --workdir=/tmp/tok1d_tiny

Not a recipe: 32x32 demo crops, a 1-layer width-32 ViT, 8 tokens, 64 codes.
`configs/tiny_test.py:vae`: the KL bottleneck (4 channels, KL weight 1e-6) instead of the VQ.
"""

from tok1d.train import config_lib


def get_config(arg: str = ""):
    config = config_lib.base_config("tokenizer")
    config.total_steps = 8
    config.batch_size = 16
    config.eval_batch_size = 16
    config.precision = "float32"
    config.ema_decay = 0.9
    config.model = dict(name="titok", patch_size=8, num_latent_tokens=8, encoder_size="nano",
                        decoder_size="nano", codebook_size=64, token_dim=8,
                        nested_dropout="none",  # "uniform" / "pow2": ordered tokens
                        quantizer="vq", quantizer_options={})  # tok1d.models.quantizers
    config.data.image_size = 32
    config.data.eval_examples = 32
    config.data.demo_size = 256
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 1000
    config.checkpoint.every_steps = 4
    config.checkpoint.keep = 10
    config.checkpoint.async_save = True
    config.num_grid_images = 4
    if arg == "vae":
        config.model.update(quantizer="vae", token_dim=4)
        config.losses.quantizer = 0.0
        config.losses.kl = 1e-6
    elif arg:
        raise ValueError(f"configs/tiny_test.py: unknown variant {arg!r} (expected '' or 'vae').")
    return config
