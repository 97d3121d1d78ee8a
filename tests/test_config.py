"""Config loading and start-up validation."""

import glob
import importlib.util
import os
import subprocess

import pytest

from conftest import REPO, main_command, subprocess_env
from tok1d.train import config_lib


def load_config(path):
    return config_lib.load(path)


def config_module(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config_specs():
    """Every config file, with each of its variants (`path:arg`) for the recipe families."""
    specs = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        variants = getattr(config_module(path), "VARIANTS", None)
        specs += [f"{path}:{arg}" for arg in variants] if variants else [path]
    return specs


@pytest.mark.parametrize("spec", config_specs(), ids=os.path.basename)
def test_every_config_validates_and_documents_its_command(spec):
    config = load_config(spec)
    config_lib.validate(config, num_devices=8)
    path, _, arg = spec.partition(":")
    mod_doc = open(path).read().split('"""')[1]
    command = f"--config=configs/{os.path.basename(path)}" + (":" if arg else "")
    assert "python -m tok1d.main" in mod_doc and command in mod_doc
    if arg:  # a row of the docstring's table of variants
        assert f"| {arg} " in mod_doc


def test_family_without_a_variant_names_the_variants():
    with pytest.raises(ValueError, match="no variant given.*l32_stage1, b64_stage1"):
        load_config(os.path.join(REPO, "configs", "titok.py"))
    with pytest.raises(ValueError, match="unknown variant 'B'.*b, l, xl, xxl"):
        load_config(os.path.join(REPO, "configs", "gpt_gigatok.py:B"))


def test_design_card_config_is_gigatok_b_l():
    card = load_config(os.path.join(REPO, "configs", "gigatok_b_l.py"))
    assert card == load_config(os.path.join(REPO, "configs", "gigatok.py:b_l"))


def test_each_trainer_has_its_own_schema():
    tokenizer, generator = config_lib.base_config("tokenizer"), config_lib.base_config("generator")
    for key in ("losses", "teacher", "perceptual", "discriminator", "disc_optim", "ar_probe"):
        assert key in tokenizer and key not in generator
    for key in ("generator", "sampling"):
        assert key in generator and key not in tokenizer
    assert "demo" in config_lib.base_config("demo") and "demo" not in tokenizer
    gpt = load_config(os.path.join(REPO, "configs", "gpt_gigatok.py:b"))
    assert "discriminator" not in gpt and "teacher" not in gpt
    with pytest.raises(config_lib.ConfigError, match="trainer='gan'"):
        config_lib.base_config("gan")


def test_another_trainers_keys_are_named_with_every_other_problem():
    config = config_lib.base_config("tokenizer")
    config.trainer = "generator"
    config.batch_size = 12
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, num_devices=8)
    msg = str(e.value)
    assert "config key 'discriminator' is a tokenizer key: trainer 'generator' does not" in msg
    assert "missing config key 'sampling'" in msg
    assert "base_config('generator')" in msg
    assert "batch_size=12 is not divisible" in msg  # the common checks still ran
    assert "discriminator.name" not in msg  # one line per section, not per key


def test_periods_take_zero_for_only_at_the_end_and_refuse_negatives():
    config = config_lib.base_config("tokenizer")
    config.eval_every_steps, config.checkpoint.every_steps = 0, 0
    config_lib.validate(config, num_devices=8)
    config.eval_every_steps, config.checkpoint.every_steps = -1, -5
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, num_devices=8)
    assert "eval_every_steps=-1 must be >= 0" in str(e.value)
    assert "checkpoint.every_steps=-5 must be >= 0" in str(e.value)


def test_sizes_decays_and_counts_out_of_range_are_named():
    """Values that failed deep inside (a ZeroDivisionError in the model or the grain pipeline)
    or were silently bent (checkpoint.keep 0 kept one; an ema_decay of 2 ran): each named."""
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config_lib.validate(config, num_devices=8)
    config.model.codebook_size, config.model.token_dim = 0, -1
    config.data.image_size, config.ema_decay, config.checkpoint.keep = 0, 2.0, 0
    config.optim.warmup_steps = -3
    # (a negative probe epoch count read as "off", a negative lr trained, a batch of 0 said
    # the training set does not fill one batch)
    e = config.evaluation
    e.linear_probe_epochs, e.linear_probe_lr, e.linear_probe_batch_size = -1, -1.0, 0
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, num_devices=8)
    for text in ("model.codebook_size=0 must be positive", "model.token_dim=-1 must be positive",
                 "data.image_size=0 must be positive", "ema_decay=2.0 must be in [0, 1)",
                 "checkpoint.keep=0 must be >= 1", "optim.warmup_steps=-3 must be >= 0",
                 "evaluation.linear_probe_epochs=-1 must be >= 0",
                 "evaluation.linear_probe_lr=-1.0 must be positive",
                 "evaluation.linear_probe_batch_size=0 must be positive"):
        assert text in str(e.value), text


def test_data_values_are_checked_before_the_first_batch():
    """data.min_scale above 1 failed at the first batch ("high - low < 0"), num_workers=-2 was
    taken, eval_examples=0 said the evaluation split was empty: each named by the config check."""
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    for min_scale in (1.5, 0.0):
        config.data.min_scale = min_scale
        config.data.num_workers, config.data.eval_examples = -2, 0
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.validate(config, num_devices=8)
        for text in (f"data.min_scale={min_scale} must be in (0, 1]",
                     "data.num_workers=-2 must be >= 0, or -1",
                     "data.eval_examples=0 must be positive, or -1"):
            assert text in str(e.value), text
    config.data.min_scale, config.data.num_workers, config.data.eval_examples = 1.0, -1, 5
    config_lib.validate(config, num_devices=8)
    assert config_lib.data_problems(config.data) == []


def test_for_trainer_keeps_the_values_of_that_trainers_keys():
    demo = load_config(os.path.join(REPO, "configs", "demo.py"))
    tok = config_lib.for_trainer(demo, "tokenizer")
    assert tok.trainer == "tokenizer" and "demo" not in tok
    assert tok.model == demo.model and tok.losses == demo.losses
    config_lib.validate(tok, num_devices=8)


def test_unknown_key_in_config_file_is_named_with_suggestion():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.optim.warmup_step = 5
    with pytest.raises(config_lib.ConfigError, match=r"optim\.warmup_step.*optim\.warmup_steps"):
        config_lib.validate(config, num_devices=8)


def test_unknown_model_argument_is_named_with_suggestion():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.model.num_latnt_tokens = 4
    with pytest.raises(config_lib.ConfigError, match="num_latnt_tokens.*num_latent_tokens"):
        config_lib.validate(config, num_devices=8)


def test_impossible_shapes_fail_with_clear_messages():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.data.image_size = 36          # patch size 8
    config.batch_size = 12               # 8 devices on the data axis
    config.mesh.fsdp = 3                 # does not divide 8 devices
    config.evaluation.fid_method = "svd"
    config.data.resize_on = "gpu"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, num_devices=8)
    msg = str(e.value)
    assert "image_size=36 is not divisible by model.patch_size=8" in msg
    assert "evaluation.fid_method='svd' must be one of eigh, sqrtm" in msg
    assert "data.resize_on='gpu' is not one of ('host', 'device')" in msg
    config.evaluation.fid_method, config.data.resize_on = "sqrtm", "device"
    assert "mesh" in msg and "does not fit 8 devices" in msg

    config.mesh.fsdp = 2
    with pytest.raises(config_lib.ConfigError, match=r"batch_size=12 is not divisible by the "
                       r"data-parallel size 8"):
        config_lib.validate(config, num_devices=8)


def test_narrow_lpips_is_for_random_stand_ins_only():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.perceptual.lpips_channels = (8, 16, 32, 32)
    config.perceptual.weights = "lpips_vgg"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, num_devices=8)
    assert "must be 5 positive VGG16 block widths" in str(e.value)
    assert "sizes a random LPIPS stand-in" in str(e.value)
    config.perceptual.update(lpips_channels=(8, 16, 32, 32, 32), weights="",
                             allow_random_init=True)
    config_lib.validate(config, num_devices=8)


def test_grad_accumulation_must_divide_the_per_step_batch():
    config = load_config(os.path.join(REPO, "configs", "tiny_test.py"))
    config.optim.grad_accum_steps = 3
    with pytest.raises(config_lib.ConfigError, match="grad_accum_steps=3"):
        config_lib.validate(config, num_devices=8)


def test_cli_rejects_mistyped_override_and_bad_shapes(tmp_path):
    env = subprocess_env(8)
    bad_key = subprocess.run(main_command("configs/tiny_test.py", str(tmp_path / "a"),
                                          "--config.optim.lrr=0.1"),
                             env=env, capture_output=True, text=True, timeout=120)
    assert bad_key.returncode != 0
    assert "lrr" in bad_key.stderr
    bad_shape = subprocess.run(main_command("configs/tiny_test.py", str(tmp_path / "b"),
                                            "--config.data.image_size=36"),
                               env=env, capture_output=True, text=True, timeout=120)
    assert bad_shape.returncode == 2, bad_shape.stderr[-2000:]
    assert "not divisible by model.patch_size" in bad_shape.stderr
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


def test_cli_loads_a_family_variant_with_overrides(tmp_path):
    """--config=configs/FAMILY.py:ARG picks the variant; --config.x=y overrides still apply."""
    run = subprocess.run(main_command("configs/titok.py:l32_stage1", str(tmp_path / "a"),
                                      "--config.data.image_size=36"),
                         env=subprocess_env(8), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "data.image_size=36 is not divisible by model.patch_size=16" in run.stderr




def test_generator_token_source_and_the_official_dataset_flag():
    """generator.token_source: "dataset" by default, "images" in the GPT recipe and for
    train_c2i.py's default --dataset imagenet (ADM random crop + flip, encoded in the step),
    "dataset" for --dataset imagenet_code; anything else is refused."""
    from tok1d.official import gpt
    assert config_lib.base_config("generator").generator.token_source == "dataset"
    recipe = load_config(os.path.join(REPO, "configs", "gpt_gigatok.py:b"))
    args = dict(dim=64, n_layer=2, n_head=2, vocab_size=64, block_size=8)
    mapped = gpt.config_from_official(args, {})
    for c in (recipe, mapped):
        assert c.generator.token_source == "images"
        assert (c.data.augment, c.data.resize_rule, c.data.min_scale, c.data.flip,
                c.data.image_size) == ("adm_random_crop", "adm", 0.8, True, 256)
    codes = gpt.config_from_official(args, dict(dataset="imagenet_code", image_size=384))
    assert codes.generator.token_source == "dataset" and codes.data.image_size == 384
    with pytest.raises(config_lib.ConfigError, match="dataset='coco'"):
        gpt.config_from_official(args, dict(dataset="coco"))
    with pytest.raises(config_lib.ConfigError, match="image_size=300 is not one of"):
        gpt.config_from_official(args, dict(image_size=300))
    codes.generator.token_source = "codes"
    with pytest.raises(config_lib.ConfigError, match="generator.token_source='codes'"):
        config_lib.validate(codes, num_devices=8)
