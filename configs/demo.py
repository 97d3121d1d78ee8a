"""Demo: a small TiTok tokenizer on the embedded photo crops, on any machine (CPU is fine).

    python -m tok1d.main --config=configs/demo.py --workdir=/tmp/tok1d_demo

Trains 1800 steps at batch 32 (about 11 minutes on a 2-core CPU, ~3 steps/s, 1.6 GB RAM),
then writes to the workdir:
  reconstructions.png   held-out crops (rows of originals) above their reconstructions
  metrics.json          eval PSNR, L2, codebook usage and perplexity
  events.out.tfevents.* TensorBoard logs (`tensorboard --logdir /tmp/tok1d_demo`)
  checkpoints/          orbax checkpoints (rerunning the command resumes / is a no-op)
Expected result (measured on the 2-core CI machine, jax 0.10.2): eval PSNR 19.7 dB on 256
held-out 64x64 crops (the bottom quarter of every photo, never trained on), L2 0.0176, codebook
usage 11% (114 of 1024 codes), perplexity 102; train PSNR 18.9. 32 tokens of 10 bits for a 64x64
image is a strong bottleneck and 1800 steps is short: reconstructions keep layout and colours but
are blurry. The run leaves TiTok's cold start (uniform attention, mean-colour outputs) after
~700 steps.
"""

from tok1d import config_lib


def get_config():
    config = config_lib.base_config()
    config.seed = 0
    config.total_steps = 1800
    config.batch_size = 32
    config.eval_batch_size = 32
    config.precision = "float32"   # bf16 matmuls are slow on most CPUs.
    config.ema_decay = 0.99

    config.model = dict(
        name="titok",
        patch_size=8,
        num_latent_tokens=32,
        encoder_size="tiny",
        decoder_size="tiny",
        codebook_size=1024,
        token_dim=8,
        l2_norm=True,
        scan=True,
    )
    config.data.name = "demo"
    config.data.image_size = 64
    config.data.augment = "random_resized_crop"
    config.data.min_scale = 0.5
    config.data.eval_examples = 256
    config.data.demo_size = 8192

    # GigaTok's entropy loss keeps the codebook from collapsing onto one code per position.
    config.losses.entropy = 0.01

    config.optim.lr = 1e-3
    config.optim.end_lr = 1e-4
    config.optim.warmup_steps = 200
    config.optim.b2 = 0.99
    config.optim.weight_decay = 1e-4

    config.log_every_steps = 50
    config.eval_every_steps = 600
    config.checkpoint.every_steps = 600
    config.checkpoint.keep = 2
    return config
