"""TiTok training recipes on the embedded data: stage 1 (proxy codes from a frozen teacher),
stage 2 (from the stage-1 run + a pixel decoder, frozen encoder, GAN from a configured step),
single-stage VQ / VAE with perceptual + GAN, and every paper config validating."""

import os

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from tok1d.train import config_lib
from tok1d.weights import loaders, pretrained
from tok1d.models.tokenizers.vqgan import MaskGITVQGAN
from tok1d.train import tokenizer

TEACHER = dict(hidden_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32,
               codebook_size=64)


def load_config(spec):
    return config_lib.load(os.path.join(REPO, "configs", spec))


def tiny(config, steps=12):
    """Shrinks a recipe to the tiny test model on 32x32 demo crops (same losses and stages)."""
    config.total_steps = steps
    config.batch_size = config.eval_batch_size = 16
    config.precision = "float32"
    config.ema_decay = 0.5
    config.model.update(patch_size=8, num_latent_tokens=8, encoder_size="nano",
                        decoder_size="nano", remat="none")
    if config.model.get("quantizer", "vq") == "vq":
        config.model.update(codebook_size=64, token_dim=8)
    if config.model.get("decoder_head") == "logits":
        config.model.num_proxy_codes = TEACHER["codebook_size"]
    if config.model.get("pixel_decoder"):
        config.model.update(pixel_channels=32, pixel_channel_mult=(1, 1, 1, 1),
                            pixel_res_blocks=1, pixel_z_channels=32)
    config.data.update(name="demo", image_size=32, eval_examples=32, demo_size=512,
                       num_workers=0, augment="random_resized_crop")
    config.optim.update(lr=3e-3, warmup_steps=2)
    config.disc_optim.update(lr=1e-3, warmup_steps=0)
    config.mesh.update(data=-1, fsdp=1)
    config.log_every_steps = 4
    config.eval_every_steps = 1000
    config.checkpoint.update(every_steps=1000, keep=1, async_save=False)
    config.num_grid_images = 4
    if config.discriminator.name == "titok":
        config.discriminator.model = dict(hidden_channels=32, num_stages=2, pool_size=4)
    config.perceptual.allow_random_init = True
    config.perceptual.image_size = 32
    config.perceptual.lpips_channels = (8, 16, 32, 32, 32)  # a narrow random LPIPS
    return config


def train_losses(workdir, key="loss"):
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r[f"train/{key}"] for r in rows if f"train/{key}" in r]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random MaskGIT-VQGAN saved as a pretrained directory (stands in for the converted
    official teacher, which cannot be downloaded here)."""
    model = MaskGITVQGAN(**TEACHER)
    params = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))["params"]
    out = tmp_path_factory.mktemp("teacher") / "maskgit_vqgan"
    return pretrained.save_pretrained(str(out), "maskgit_vqgan", TEACHER,
                                      jax.device_get(params))


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, teacher_dir):
    config = tiny(load_config("titok.py:s128_stage1"), steps=24)
    config.teacher.weights = teacher_dir
    workdir = str(tmp_path_factory.mktemp("stage1"))
    result = tokenizer.train_and_evaluate(config, workdir)
    return workdir, result


def test_teacher_precision_is_an_option(teacher_dir):
    """`teacher.model.dtype`: the stage-1 teacher runs in float32 as the official code
    (the recipes' default) or, faster and not official, in bfloat16: the same proxy codes
    except where two codes are nearly tied."""
    config = tiny(load_config("titok.py:s128_stage1"))
    config.teacher.weights = teacher_dir
    student = tokenizer.build_model(config)
    images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
    codes = {}
    for dtype in ("", "bfloat16"):
        if dtype:
            config.teacher.model = dict(dtype=dtype)
        teacher, params = tokenizer.build_teacher(config, student)
        assert teacher.dtype == (jnp.bfloat16 if dtype else jnp.float32)
        codes[dtype] = np.asarray(teacher.apply({"params": params}, images,
                                                method=type(teacher).encode))
    agree = np.mean(codes[""] == codes["bfloat16"])
    assert agree > 0.9, agree  # 0.98 with this random teacher


def test_stage1_learns_the_teacher_codes(stage1_run):
    workdir, result = stage1_run
    ce = train_losses(workdir, "loss_proxy_ce")
    assert ce[0] > ce[-1] + 0.3, ce
    assert ce[0] == pytest.approx(np.log(TEACHER["codebook_size"]), abs=0.6)
    assert 0.0 <= result["proxy_accuracy"] <= 1.0 and result["psnr"] > 0
    assert os.path.exists(os.path.join(workdir, "reconstructions.png"))


def test_stage2_starts_from_stage1_and_gan_starts_on_time(stage1_run, teacher_dir, tmp_path):
    s1_dir, _ = stage1_run
    config = tiny(load_config("titok.py:s128_stage2"), steps=8)
    config.init.checkpoint = s1_dir
    config.init.pixel_decoder = teacher_dir
    config.discriminator.start_step = 4
    config.losses.perceptual = 0.0  # the ConvNeXt path is covered by the single-stage test
    workdir = str(tmp_path / "stage2")
    tokenizer.train_and_evaluate(config, workdir)

    s1 = loaders.load_params(s1_dir)
    s2_state = loaders.load_training_state(workdir)
    teacher = loaders.load_params(teacher_dir)
    # Frozen parts are exactly the stage-1 EMA weights; the pixel decoder started from the
    # teacher's decoder and was trained.
    for group in ("encoder", "latent_tokens", "quantize"):
        jax.tree.map(np.testing.assert_array_equal, s2_state["params"][group], s1[group])
    dec = tu.flatten_dict(s2_state["params"]["pixel_decoder"])
    t_dec = tu.flatten_dict(teacher["decoder"])
    assert dec.keys() == t_dec.keys()
    assert any(not np.array_equal(dec[k], t_dec[k]) for k in dec)
    # The discriminator trains only from start_step: its optimizer counted steps 4..7.
    lecam = s2_state["extras"]["gan"]["lecam"]
    assert float(lecam["ema_real_logits_mean"]) != 0.0
    counts = [np.asarray(x) for x in jax.tree.leaves(s2_state["extras"]["gan"]["opt_state"])
              if np.asarray(x).dtype == np.int32 and np.asarray(x).ndim == 0]
    assert counts and all(int(c) == 4 for c in counts), counts
    active = train_losses(workdir, "gan_active")
    assert active == [0.0, 1.0], active  # mean over steps 1-4 (off) and 5-8 (on)


@pytest.mark.parametrize("variant", ["bl64", "bl64_vae"])
def test_single_stage_with_perceptual_and_gan(variant, tmp_path):
    config = tiny(load_config(f"titok.py:{variant}"), steps=12)
    config.discriminator.start_step = 6
    # one program with the GAN switch traced (the option's runs; the stage-2 test above and
    # the parity tests run the default, one program per phase)
    config.phase_programs = False
    config.log_every_steps = 3  # four logged means, two of them with the GAN on
    if variant.endswith("vae"):
        config.perceptual.kind = "lpips"  # ConvNeXt is exercised by the VQ variant
    workdir = str(tmp_path / variant)
    result = tokenizer.train_and_evaluate(config, workdir)
    l2 = train_losses(workdir, "loss_l2")
    assert l2[-1] < l2[0], l2
    for term in ("loss_perceptual", "loss_gan", "d_loss"):
        assert all(np.isfinite(train_losses(workdir, term))), term
    assert np.isfinite(result["psnr"])
    if variant.endswith("vae"):
        assert "codebook_usage" not in result
        assert all(np.isfinite(train_losses(workdir, "loss_kl")))


CONFIGS = ["l32_stage1", "b64_stage1", "s128_stage1", "l32_stage2", "b64_stage2",
           "s128_stage2", "bl64", "bl128", "sl256", "ll32_vae", "bl64_vae", "bl128_vae"]


@pytest.mark.parametrize("arg", CONFIGS)
def test_paper_configs_validate(arg):
    config = load_config(f"titok.py:{arg}")
    config_lib.validate(config, num_devices=256)
    assert config.batch_size == 256 and config.optim.lr == 1e-4
    assert config.evaluation.is_split_size == 5000  # ADM's evaluator, as TiTok reports IS
    assert config.evaluation.pixel_metrics == "standard"  # TiTok's code has no PSNR / SSIM
    model = tokenizer.build_model(config)
    assert model.image_size == 256 and model.patch_size == 16


@pytest.mark.parametrize("spec", [f"titok.py:{arg}" for arg in CONFIGS]
                         + ["gigatok.py:s_s", "gigatok.py:b_l_2d", "tiny_test.py"])
def test_any_quantizer_is_one_override_on_every_tokenizer_recipe(spec):
    """README's `--config.model.quantizer=fsq --config.model.quantizer_options='{...}'` works
    on every tokenizer recipe: its model section names both keys (a section holds only the
    arguments it names). FSQ's levels are one per channel of the model's code size."""
    config = load_config(spec)
    assert {"quantizer", "quantizer_options"} <= set(config.model)
    if config.model.quantizer == "vae":
        return
    model = tokenizer.build_model(config)
    size = getattr(model, "token_dim", None) or model.code_dim
    config.model.quantizer = "fsq"
    config.model.quantizer_options = {"levels": [5] * size}
    if "l2_norm" in config.model:  # a VQ setting (bl64's False): FSQ takes none but defaults
        config.model.l2_norm = True
    model = tokenizer.build_model(config)
    size = config.data.image_size
    jax.eval_shape(model.init, jax.random.key(0),  # builds: FSQ takes the model's codes
                   jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    assert model.quantizer_options["levels"] == (5,) * len(config.model.quantizer_options.levels)
